"""The QUIC bridge (node/transports/quic.py), driven directly on loopback.

A small real Inbound (an echo node: it answers each call with its data, later in the
loop as the runtime would) sits behind each QuicTransport; clients are the real
QuicClient / AsyncQuicClient; peers are a second QuicTransport.  Certificates come
from node/transports/certs.py.  Every test bounds its own time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time

import msgpack
import pytest
import structlog
from cryptography import x509

from node.client import CallTimeout, RemoteError
from node.metrics import NodeMetrics
from node.quic_client import AsyncQuicClient, QuicClient, QuicConnectError
from node.transports import quic as quic_module
from node.transports import quic_io
from node.transports.certs import (CertsError, certs_main, write_ca_and_node_cert,
                                   write_client_cert)
from node.transports.framing import encode_frames
from node.transports.quic import QuicTransport
from node.transports.quic_io import unacked_bytes
from protocols import wire

TEST_TIMEOUT_S = 30
MAX_MESSAGE_BYTES = 256 << 10
GOSSIP = [b"SYNP3", b"GOSSIP", b"n1", b"body", b"crc"]  # the shape of a peer message


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("certs")
    write_ca_and_node_cert(directory, ["n1", "n2"])
    write_client_cert(directory, "alice")
    return str(directory)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> str:
    """Another CA, with a node 'n1' and a client 'mallory' of its own."""
    directory = tmp_path_factory.mktemp("other")
    write_ca_and_node_cert(directory, ["n1"])
    write_client_cert(directory, "mallory")
    return str(directory)


class EchoNode:
    """The Inbound a transport delivers to: answers calls with their data (type
    'big' with that many bytes) on a later loop turn, records the rest."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: QuicTransport | None = None
        self.peer_messages: list[list[bytes]] = []
        self.one_way: list[bytes] = []
        self.principals: set[bytes] = set()
        self.failures: list[Exception] = []
        self.replies_dropped = 0

    def client(self, handle, payload: bytes, principal: bytes) -> None:
        self.principals.add(principal)
        try:
            env = msgpack.unpackb(payload)
        except Exception:
            env = None
        if not isinstance(env, dict) or env.get("mode") != wire.MODE_CALL:
            self.one_way.append(payload)
            return
        data = b"x" * env["data"] if env["type"] == "big" else env.get("data")
        self.loop.call_soon(self._answer, handle, wire.reply(env["id"], data, "echo"))

    def _answer(self, handle, reply: bytes) -> None:
        if not self.transport.reply(handle, reply):
            self.replies_dropped += 1

    def peer(self, frames: list[bytes]) -> None:
        self.peer_messages.append(frames)

    def multicast(self, group: str, payload: bytes) -> None:
        raise AssertionError("the QUIC bridge carries no multicast")

    def malformed(self, handle, nframes: int) -> None:
        self.transport.reply(handle, wire.error(None, wire.ErrorCode.BAD_REQUEST,
                                                "empty", "echo"))

    def failed(self, handle, payload, exc: Exception) -> None:
        self.failures.append(exc)


def make_node(loop, certs: str, name: str, ca_dir: str | None = None, **kwargs):
    """A started QuicTransport with its echo node; ``ca_dir`` gives its certificate
    from another directory (while it still trusts ``certs``' CA)."""
    cert_dir = ca_dir or certs
    metrics = NodeMetrics(name)
    options = dict(max_message_bytes=MAX_MESSAGE_BYTES)
    options.update(kwargs)
    transport = QuicTransport(node_id=name, bind="127.0.0.1:0",
                              tls_cert=f"{cert_dir}/{name}.pem", tls_key=f"{cert_dir}/{name}.key",
                              tls_ca=f"{certs}/ca.pem", metrics=metrics,
                              log=structlog.get_logger(), **options)
    node = EchoNode(loop)
    node.transport = transport
    transport.start(loop, node)
    _started.append(transport)
    return transport, node, metrics


def address(transport: QuicTransport) -> str:
    return "%s:%d" % transport.bound_address


def meet(a: QuicTransport, a_id: str, b: QuicTransport, b_id: str) -> None:
    a.set_peers({b_id: b.endpoints()}, [])
    b.set_peers({a_id: a.endpoints()}, [])


def vacant_port() -> int:
    """A UDP port nobody listens on (just released): datagrams to it get ICMP
    port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def limited(metrics: NodeMetrics, reason: str) -> int:
    return metrics._limited.get(reason, 0)


async def until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(0.005)


_started: list[QuicTransport] = []  # what make_node started: run() stops it all


def run(main) -> None:
    """Run a test's coroutine within TEST_TIMEOUT_S, then stop every transport it
    started (stop is idempotent), whatever happened."""
    async def bounded() -> None:
        try:
            await asyncio.wait_for(main(), TEST_TIMEOUT_S)
        finally:
            while _started:
                _started.pop().stop()

    asyncio.run(bounded())


# Clients --------------------------------------------------------------------------


def test_blocking_client_round_trip_anonymous_and_with_a_client_certificate(certs):
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, _ = make_node(loop, certs, "n1")

        def calls() -> tuple:
            with QuicClient(address(node), f"{certs}/ca.pem") as anonymous:
                first = anonymous.call("counter/alice", "echo", {"n": 5})
                anonymous.send("counter/alice", "note", "one way")
            with QuicClient(address(node), f"{certs}/ca.pem", cert=f"{certs}/alice.pem",
                            key=f"{certs}/alice.key") as alice:
                second = alice.call("counter/alice", "echo", [1, "two"])
            return first, second

        first, second = await loop.run_in_executor(None, calls)
        assert first == {"n": 5}
        assert second == [1, "two"]
        await until(lambda: echo.one_way, what="the one-way message")
        assert msgpack.unpackb(echo.one_way[0])["data"] == "one way"
        assert b"CN=alice,OU=client,O=synthesis" in echo.principals
        assert any(p.startswith(b"quic:127.0.0.1:") for p in echo.principals)
        assert not echo.failures

    run(main)


def test_two_hundred_calls_in_flight_on_one_connection(certs):
    """More calls than QUIC's 128 concurrent streams: the rest wait for streams."""
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, _ = make_node(loop, certs, "n1")
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as client:
            results = await asyncio.gather(
                *[client.call(f"a/{i}", "echo", i) for i in range(200)])
        assert results == list(range(200))
        assert len(echo.principals) == 1  # one connection

    run(main)


def test_an_oversize_request_gets_too_large_and_the_connection_keeps_working(certs):
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, metrics = make_node(loop, certs, "n1")
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as client:
            with pytest.raises(RemoteError) as refused:
                await client.call("a/1", "echo", b"x" * (MAX_MESSAGE_BYTES + 1))
            assert refused.value.code == wire.ErrorCode.TOO_LARGE
            assert refused.value.request_id is not None  # matched to its request
            assert await client.call("a/1", "echo", "after") == "after"
            # An empty stream is a malformed request, answered bad_request.
            conn = client._conn
            stream_id = conn.open(b"", unidirectional=False)
            future = conn.calls[stream_id] = loop.create_future()
            answer = msgpack.unpackb(await asyncio.wait_for(future, 5))
            assert answer["data"]["code"] == wire.ErrorCode.BAD_REQUEST
            # A one-way request on a bidirectional stream: the stream is ended
            # with no bytes, so it does not stay open for an answer never sent.
            one_way = wire.encode(wire.request("7", "note", "a/1", 1, wire.MODE_SEND))
            stream_id = conn.open(one_way, unidirectional=False)
            future = conn.calls[stream_id] = loop.create_future()
            assert await asyncio.wait_for(future, 5) == b""
            assert echo.one_way == [one_way]
        assert not echo.failures

    run(main)


def test_a_client_timeout_and_a_node_that_is_not_there(certs):
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, _ = make_node(loop, certs, "n1")
        echo.client = lambda handle, payload, principal: None  # never answers
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as client:
            with pytest.raises(CallTimeout):
                await client.call("a/1", "echo", 1, timeout_s=0.2)
        port = vacant_port()
        started = time.monotonic()
        with pytest.raises(QuicConnectError):
            await AsyncQuicClient(f"127.0.0.1:{port}", f"{certs}/ca.pem").connect()
        assert time.monotonic() - started < 2.0  # refused at once (ICMP), not timed out

    run(main)


# Certificates -----------------------------------------------------------------------


def test_certificates_of_another_ca_cannot_connect_and_the_listener_keeps_serving(
        certs, other_ca):
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, metrics = make_node(loop, certs, "n2")
        # A node whose certificate another CA signed (it trusts ours, so it gets as
        # far as presenting its certificate): the listener closes its connection.
        rogue, _, _ = make_node(loop, certs, "n1", ca_dir=other_ca)
        # A client trusting another CA refuses the node's certificate.
        with pytest.raises(QuicConnectError):
            await AsyncQuicClient(address(node), f"{other_ca}/ca.pem",
                                  timeout_s=2).connect()
        # A client presenting another CA's certificate is closed by the node.
        with pytest.raises((QuicConnectError, RemoteError, CallTimeout)):
            async with AsyncQuicClient(address(node), f"{certs}/ca.pem",
                                       cert=f"{other_ca}/mallory.pem",
                                       key=f"{other_ca}/mallory.key",
                                       timeout_s=2) as mallory:
                await mallory.call("a/1", "echo", 1)
        rogue.set_peers({"n2": node.endpoints()}, [])
        rogue.send("n2", GOSSIP, None, loop.time())
        await until(lambda: limited(metrics, "quic_bad_certificate") >= 2,
                    what="both rogue certificates refused")
        await asyncio.sleep(0.2)
        assert echo.peer_messages == []
        # The listener still serves good clients.
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as client:
            assert await client.call("a/1", "echo", "still here") == "still here"

    run(main)


def test_a_client_certificate_cannot_send_peer_frames(certs):
    """A CA-signed client (clientAuth only) is a client: what it sends on a
    unidirectional stream is a one-way envelope, never peer frames."""
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, _ = make_node(loop, certs, "n1")
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem",
                                   cert=f"{certs}/alice.pem",
                                   key=f"{certs}/alice.key") as alice:
            await alice.connect()
            framed = encode_frames(GOSSIP)
            alice._conn.open(framed, unidirectional=True)
            await until(lambda: echo.one_way, what="the stream's arrival")
        assert echo.one_way == [framed]
        assert echo.peer_messages == []

    run(main)


def test_write_certificates(tmp_path):
    written = write_ca_and_node_cert(tmp_path, ["n1", "127.0.0.1:7400"],
                                     hosts=["127.0.0.1", "node1.example"])
    names = {path.name for path in written}
    assert names == {"ca.pem", "ca.key", "n1.pem", "n1.key",
                     "127.0.0.1:7400.pem", "127.0.0.1:7400.key"}
    for key in ("ca.key", "n1.key", "127.0.0.1:7400.key"):
        assert stat.S_IMODE(os.stat(tmp_path / key).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "n1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["node1.example"]
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 364 <= days <= 366
    ca = (tmp_path / "ca.pem").read_bytes()
    # A second run keeps the CA: nodes added later trust and are trusted the same.
    assert certs_main([str(tmp_path), "n3", "--client", "bob"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert (tmp_path / "n3.pem").exists() and (tmp_path / "bob.key").exists()
    with pytest.raises(CertsError):
        write_ca_and_node_cert(tmp_path, ["../escape"])
    assert certs_main([str(tmp_path), "ca"]) == 2


# Peers ---------------------------------------------------------------------------------


def test_peer_frames_both_ways_and_a_two_mib_message(certs):
    async def main():
        loop = asyncio.get_running_loop()
        a, echo_a, _ = make_node(loop, certs, "n1")
        b, echo_b, _ = make_node(loop, certs, "n2")
        outcomes: list[tuple[str, bool]] = []
        a.set_outcome(lambda peer, ok: outcomes.append((peer, ok)))
        meet(a, "n1", b, "n2")
        given_up = []
        give_up = lambda code, reason: given_up.append((code, reason))  # noqa: E731
        assert a.send("n2", GOSSIP, give_up, loop.time())  # queued for the handshake
        assert a.has_queued
        assert b.send("n1", [b"SYNP3", b"RPL", b"n2", b"t", b"reply", b"crc"], give_up,
                      loop.time())
        await until(lambda: echo_b.peer_messages and echo_a.peer_messages,
                    what="a message each way")
        assert echo_b.peer_messages == [GOSSIP]
        assert echo_a.peer_messages == [[b"SYNP3", b"RPL", b"n2", b"t", b"reply", b"crc"]]
        big = [b"SYNP3", b"REPL", b"n1", os.urandom(2 << 20), b"crc"]
        assert a.send("n2", big, give_up, loop.time())
        await until(lambda: len(echo_b.peer_messages) == 2, what="the 2 MiB message")
        assert echo_b.peer_messages[1] == big
        assert given_up == [] and not a.has_queued
        assert outcomes == [("n2", True), ("n2", True)]
        assert a.health()["peers_up"] == 1
        # Frames that are not a peer message are counted, never delivered.
        assert a.send("n2", [b"NOPE", b"x"], give_up, loop.time())
        await asyncio.sleep(0.1)
        assert len(echo_b.peer_messages) == 2
        assert not echo_a.failures and not echo_b.failures

    run(main)


def test_sends_to_a_peer_without_a_listener_give_up_fast(certs):
    async def main():
        loop = asyncio.get_running_loop()
        a, _, metrics = make_node(loop, certs, "n1")
        gone = f"127.0.0.1:{vacant_port()}"
        a.set_peers({"n2": {"quic": gone}, "n3": {"zmq": "tcp://127.0.0.1:1"}}, [])
        outcomes, given_up = [], []
        a.set_outcome(lambda peer, ok: outcomes.append((peer, ok)))
        assert not a.send("n3", GOSSIP, lambda c, r: given_up.append(c), loop.time())
        assert given_up == ["unavailable"]  # no QUIC endpoint: the next transport's turn
        assert a.send("n2", GOSSIP, lambda c, r: given_up.append(c), loop.time())
        await until(lambda: len(given_up) == 2, timeout_s=2.0, what="the refusal")
        assert given_up == ["unavailable", "unavailable"]
        assert not a.has_queued
        # Until the redial pause ends, sends fail at once.
        assert not a.send("n2", GOSSIP, lambda c, r: given_up.append(c), loop.time())
        assert outcomes == [("n3", False), ("n2", False), ("n2", False)]
        assert a.health()["send_failures"] == 1
        # A queued send past its deadline is given up by retry.
        a.set_peers({"n4": {"quic": "192.0.2.1:9"}}, [])  # TEST-NET: never answers
        assert a.send("n4", GOSSIP, lambda c, r: given_up.append(c), loop.time())
        a.retry(loop.time() + quic_module.PEER_QUEUE_DEADLINE_S + 0.01)
        assert given_up[-1] == "unavailable" and not a.has_queued

    run(main)


# Back-pressure -----------------------------------------------------------------------


HIGH, LOW = 256 << 10, 64 << 10
CHUNK = 64 << 10


def test_a_peer_that_does_not_read_makes_sends_give_up_overloaded_with_memory_bounded(certs):
    async def main():
        loop = asyncio.get_running_loop()
        a, _, metrics = make_node(loop, certs, "n1", high_water_bytes=HIGH,
                                  low_water_bytes=LOW)
        b, echo_b, _ = make_node(loop, certs, "n2")
        meet(a, "n1", b, "n2")
        given_up = []
        a.send("n2", GOSSIP, None, loop.time())
        await until(lambda: echo_b.peer_messages, what="the link")
        b._server._transport.pause_reading()  # b reads no more datagrams: no acks
        accepted = 0
        for i in range(200):
            frames = [b"SYNP3", b"REPL", b"n1", i.to_bytes(4, "big") * (CHUNK // 4), b"c"]
            if a.send("n2", frames, lambda code, reason: given_up.append(code),
                      loop.time()):
                accepted += 1
            await asyncio.sleep(0)  # the loop runs: packets leave, none are acked
        link = a._links[b.endpoints()["quic"]]
        assert given_up and set(given_up) == {"overloaded"}
        assert accepted < 200
        assert unacked_bytes(link.conn._quic) <= HIGH + CHUNK + 1024
        assert limited(metrics, "quic_peer_overloaded") == len(given_up)
        # Once b reads again, acks drain the backlog and sends resume.
        b._server._transport.resume_reading()
        await until(lambda: len(echo_b.peer_messages) == 1 + accepted,
                    what="every accepted message delivered")
        await until(lambda: a.send("n2", GOSSIP, None, loop.time()),
                    what="sends accepted again")

    run(main)


def test_a_client_that_does_not_read_gets_overloaded_instead_of_replies(certs):
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, metrics = make_node(loop, certs, "n1", high_water_bytes=HIGH,
                                        low_water_bytes=LOW)
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as client:
            client._conn._transport.pause_reading()
            calls = [asyncio.ensure_future(client.call("a/1", "big", CHUNK))
                     for _ in range(24)]
            await until(lambda: limited(metrics, "quic_reply_overloaded")
                        + limited(metrics, "quic_client_overloaded") > 0,
                        what="the node's backlog past its mark")
            held = max(unacked_bytes(conn._quic) for conn in node._accepted)
            assert held <= HIGH + CHUNK + 4096
            client._conn._transport.resume_reading()
            results = await asyncio.gather(*calls, return_exceptions=True)
        answered = [r for r in results if r == b"x" * CHUNK]
        refused = [r for r in results if isinstance(r, RemoteError)]
        assert answered and refused and len(answered) + len(refused) == 24
        assert {r.code for r in refused} == {wire.ErrorCode.OVERLOADED}

    run(main)


def test_stop_gives_up_queued_sends_and_closes_the_listener(certs):
    async def main():
        loop = asyncio.get_running_loop()
        a, _, _ = make_node(loop, certs, "n1")
        b, _, _ = make_node(loop, certs, "n2")
        meet(a, "n1", b, "n2")
        given_up = []
        assert a.send("n2", GOSSIP, lambda c, r: given_up.append(c), loop.time())
        a.stop()
        assert given_up == ["unavailable"] and not a.has_queued
        assert not a.send("n2", GOSSIP, lambda c, r: given_up.append(c), loop.time())
        b.stop()
        await asyncio.sleep(0.05)
        with pytest.raises(QuicConnectError):
            await AsyncQuicClient(address(b), f"{certs}/ca.pem", timeout_s=1).connect()

    run(main)


# Limits -------------------------------------------------------------------------------


def test_connections_over_the_limit_and_unfinished_bytes_over_the_budget_are_closed(certs):
    async def main():
        loop = asyncio.get_running_loop()
        node, echo, metrics = make_node(loop, certs, "n1", connections_max=1,
                                        conn_inbound_bytes_max=64 << 10)
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as first:
            assert await first.call("a/1", "echo", 1) == 1
            with pytest.raises((QuicConnectError, RemoteError)):
                async with AsyncQuicClient(address(node), f"{certs}/ca.pem",
                                           timeout_s=2) as second:
                    await second.call("a/1", "echo", 2)
            assert limited(metrics, "quic_connections") == 1
            # One request under max_message_bytes but over the connection's
            # budget for unfinished streams: the connection is closed.
            with pytest.raises(RemoteError) as closed:
                await first.call("a/1", "echo", b"x" * (128 << 10))
            assert closed.value.code == wire.ErrorCode.UNAVAILABLE
            assert limited(metrics, "quic_conn_inbound_bytes") == 1
        await until(lambda: not node._accepted, what="the connection forgotten")
        async with AsyncQuicClient(address(node), f"{certs}/ca.pem") as third:
            assert await third.call("a/1", "echo", 3) == 3

    run(main)


def test_an_idle_link_is_made_again_before_use(certs, monkeypatch):
    """The other side's idle timer runs apart from ours: a link silent for half
    the idle timeout is dialed again rather than written to."""
    monkeypatch.setattr(quic_io, "STALE_AFTER_S", 0.2)

    async def main():
        loop = asyncio.get_running_loop()
        a, _, _ = make_node(loop, certs, "n1")
        b, echo_b, _ = make_node(loop, certs, "n2")
        meet(a, "n1", b, "n2")
        a.send("n2", GOSSIP, None, loop.time())
        await until(lambda: len(echo_b.peer_messages) == 1, what="the first message")
        first = a._links[b.endpoints()["quic"]].conn
        await asyncio.sleep(0.3)
        a.send("n2", GOSSIP, None, loop.time())
        await until(lambda: len(echo_b.peer_messages) == 2, what="the second message")
        assert a._links[b.endpoints()["quic"]].conn is not first
        assert first.closed

    run(main)
