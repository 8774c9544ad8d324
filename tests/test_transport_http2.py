"""The HTTP/2 bridge (node/transports/http2.py), driven directly: real sockets on
loopback, httpx (and curl when present) as the external client, a second transport as
the peer.  The node's side is ``NodeDouble``: a small Inbound that validates requests
with protocols/wire.py as the node does and answers through ``transport.reply``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import shutil
import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import msgpack
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.metrics import NodeMetrics
from node.transports import http2
from node.transports.http2 import STATUS_BY_CODE, Http2Transport
from protocols import wire
from protocols.wire import ErrorCode, WireError

TIMEOUT_S = 60.0
MAX_BYTES = 64 << 10


_started: list[Http2Transport] = []  # by start_transport; run stops them whatever happens


def run(coro) -> None:
    async def bounded() -> None:
        try:
            await asyncio.wait_for(coro, TIMEOUT_S)
        finally:
            while _started:
                _started.pop().stop()
    asyncio.run(bounded())


class NodeDouble:
    """The node's side of a transport: validates each request as the runtime does and
    answers it through ``transport.reply``.  Types: ``fail`` answers the error named
    in its data, ``slow`` answers after ``data["delay"]`` seconds, anything else
    echoes its data; ``syn.status`` answers a status map."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.transport: Http2Transport | None = None
        self.requests: list[wire.Request] = []
        self.principals: list[bytes] = []
        self.peer_messages: list[list[bytes]] = []
        self.peer_arrived = asyncio.Event()
        self.replies_sent: list[bool] = []
        self.in_flight = 0
        self.in_flight_max = 0
        self.failures: list[Exception] = []

    def client(self, handle, payload: bytes, principal: bytes) -> None:
        self.principals.append(principal)
        try:
            req = wire.parse_request(payload, MAX_BYTES)
        except WireError as exc:
            if not exc.one_way:
                self._answer(handle, wire.error(exc.request_id, exc.code, exc.message,
                                                self.node_id))
            return
        self.requests.append(req)
        if req.mode != wire.MODE_CALL:
            return
        if req.type == wire.TYPE_STATUS:
            self._answer(handle, wire.reply(req.id, {"node": self.node_id, "members": [
                {"node": self.node_id, "agents": 0, "reachable": True}]}, self.node_id))
        elif req.type == "fail":
            self._answer(handle, wire.error(req.id, req.data["code"], "as asked", self.node_id,
                                            retry_after_ms=req.data.get("retry_after_ms")))
        elif req.type == "slow":
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
            asyncio.get_running_loop().call_later(req.data["delay"], self._finish_slow,
                                                  handle, req)
        else:
            self._answer(handle, wire.reply(req.id, req.data, self.node_id))

    def _finish_slow(self, handle, req: wire.Request) -> None:
        self.in_flight -= 1
        self._answer(handle, wire.reply(req.id, req.data, self.node_id))

    def _answer(self, handle, payload: bytes) -> None:
        self.replies_sent.append(self.transport.reply(handle, payload))

    def peer(self, frames: list[bytes]) -> None:
        self.peer_messages.append(frames)
        self.peer_arrived.set()

    def multicast(self, group: str, payload: bytes) -> None:
        raise AssertionError("the HTTP/2 bridge carries no multicast")

    def malformed(self, handle, nframes: int) -> None:
        raise AssertionError("HTTP requests are never malformed frames")

    def failed(self, handle, payload, exc: Exception) -> None:
        self.failures.append(exc)


def start_transport(node_id: str, **kwargs) -> tuple[Http2Transport, NodeDouble]:
    node = NodeDouble(node_id)
    options = {"bind": "127.0.0.1:0", "max_message_bytes": MAX_BYTES}
    options.update(kwargs)
    transport = Http2Transport(node_id=node_id, metrics=NodeMetrics(node_id),
                               log=structlog.get_logger(), **options)
    node.transport = transport
    transport.start(asyncio.get_running_loop(), node)
    _started.append(transport)
    return transport, node


@contextlib.asynccontextmanager
async def serving(**kwargs):
    """A transport with its node double, and an h2c client to call it."""
    transport, node = start_transport("n1", **kwargs)
    async with h2c_client() as client:
        yield transport, node, client


def h2c_client(**kwargs) -> httpx.AsyncClient:
    """httpx speaking HTTP/2 with prior knowledge (no HTTP/1.1 upgrade)."""
    return httpx.AsyncClient(http1=False, http2=True, timeout=10.0, **kwargs)


def agent_url(transport: Http2Transport, agent: str, mtype: str) -> str:
    return f"{transport.endpoints()['http2']}/v1/agents/{agent}/messages/{mtype}"


# Client API --------------------------------------------------------------------

def test_call_json_msgpack_and_status():
    async def main():
        async with serving() as (transport, node, client):
            resp = await client.post(agent_url(transport, "echo%2Falice", "say"),
                                     json={"text": "hi", "n": [1, 2]},
                                     headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})
            assert resp.http_version == "HTTP/2"
            assert resp.status_code == 200 and resp.json() == {"text": "hi", "n": [1, 2]}
            assert resp.headers["synthesis-node"] == "n1"
            req = node.requests[-1]
            assert (req.subject, req.type, req.mode) == ("echo/alice", "say", "call")
            assert req.raw["traceparent"].startswith("00-111")
            assert node.principals[-1].startswith(b"http2:127.0.0.1:")

            packed = msgpack.packb({"blob": b"\x00\xff"}, use_bin_type=True)
            resp = await client.post(agent_url(transport, "echo%2Fbob", "say"), content=packed,
                                     headers={"content-type": "application/msgpack"})
            assert resp.headers["content-type"] == "application/msgpack"
            assert msgpack.unpackb(resp.content, raw=False) == {"blob": b"\x00\xff"}

            # bin data in a JSON reply is base64 text
            resp = await client.post(agent_url(transport, "echo%2Fbob", "say"), content=packed,
                                     headers={"content-type": "application/msgpack",
                                              "accept": "application/json"})
            assert resp.status_code == 200

            resp = await client.post(agent_url(transport, "echo%2Fempty", "say"))
            assert resp.status_code == 200 and resp.json() is None

            resp = await client.get(f"{transport.endpoints()['http2']}/v1/status")
            assert resp.status_code == 200
            assert resp.json()["node"] == "n1"
            assert node.requests[-1].type == wire.TYPE_STATUS
        assert all(node.replies_sent) and not node.failures
    run(main())


def test_send_and_publish_are_accepted_at_once():
    async def main():
        async with serving() as (transport, node, client):
            base = transport.endpoints()["http2"]
            resp = await client.post(agent_url(transport, "counter%2Fa", "incr") + "?mode=send",
                                     json={"n": 2})
            assert resp.status_code == 202 and resp.content == b""
            resp = await client.post(f"{base}/v1/groups/room%2F1/publish?type=note&routing=gossip",
                                     json="hello")
            assert resp.status_code == 202
            resp = await client.post(f"{base}/v1/groups/room/publish", json="no type")
            assert resp.status_code == 400 and resp.json()["code"] == "bad_request"
        sent, published = node.requests
        assert (sent.mode, sent.subject, sent.data) == ("send", "counter/a", {"n": 2})
        assert (published.mode, published.subject, published.type, published.routing,
                published.data) == ("publish", "room/1", "note", "gossip", "hello")
        assert node.replies_sent == []  # one-way: the node answers nothing
    run(main())


@pytest.mark.parametrize("code", sorted(ErrorCode.ALL))
def test_error_codes_map_to_statuses(code):
    async def main():
        async with serving() as (transport, _, client):
            resp = await client.post(agent_url(transport, "a", "fail"), json={"code": code})
        assert resp.status_code == STATUS_BY_CODE[code]
        assert resp.json() == {"code": code, "message": "as asked"}
    run(main())


def test_error_mapping_table_and_retry_after():
    assert STATUS_BY_CODE == {"bad_request": 400, "unknown_agent": 404, "unknown_type": 404,
                              "too_large": 413, "overloaded": 429, "timeout": 504,
                              "unavailable": 503, "internal": 500}

    async def main():
        async with serving() as (transport, _, client):
            resp = await client.post(agent_url(transport, "a", "fail"),
                                     json={"code": "overloaded", "retry_after_ms": 1500})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
            assert resp.json()["retry_after_ms"] == 1500
            resp = await client.post(agent_url(transport, "a", "fail"), json={"code": "new_code"})
            assert resp.status_code == 500  # an unknown code is internal, as clients treat it
    run(main())


def test_bad_input_gets_clear_errors_and_the_transport_keeps_serving():
    async def chunks(total: int):
        for _ in range(total // 8192):
            yield b"x" * 8192

    async def main():
        async with serving() as (transport, node, client):
            base = transport.endpoints()["http2"]
            url = agent_url(transport, "echo%2Fa", "say")
            cases = [
                (client.post(f"{base}/v2/agents/a/messages/t", json=1), 404, "not_found"),
                (client.post(f"{base}/v1/agents/a/messages/", json=1), 404, "not_found"),
                (client.get(url), 405, "method_not_allowed"),
                (client.post(f"{base}/v1/status"), 405, "method_not_allowed"),
                (client.post(url, content=b"{nope"), 400, "bad_request"),
                (client.post(url, content=b"\xc1", headers={"content-type": "application/msgpack"}),
                 400, "bad_request"),
                (client.post(url, content=b"1", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type"),
                (client.post(url + "?colour=red", json=1), 400, "bad_request"),
                (client.post(url + "?mode=publish", json=1), 400, "bad_request"),
                (client.post(url, json=2 ** 70), 400, "bad_request"),  # no msgpack int form
                (client.post(f"{base}/v1/agents/%FF/messages/t", json=1), 400, "bad_request"),
                # too large: by content-length, and counted as DATA without one
                (client.post(url, content=b"1" * (MAX_BYTES + 1)), 413, "too_large"),
                (client.post(url, content=chunks(4 * MAX_BYTES)), 413, "too_large"),
                (client.post(f"{base}/v1/peer", content=b"\x05\x00"), 400, "bad_request"),
            ]
            for request, status, code in cases:
                resp = await request
                assert (resp.status_code, resp.json()["code"]) == (status, code), resp.text
            # the node itself refuses a request the transport let through (a long type)
            resp = await client.post(agent_url(transport, "echo%2Fa", "%20" * 200), json=1)
            assert resp.status_code == 400 and "type" in resp.json()["message"]
            resp = await client.post(url, json={"still": "serving"})
            assert resp.status_code == 200 and resp.json() == {"still": "serving"}
        health = transport.health()
        assert health["refused"] == len(cases) and health["inbound_body_bytes"] == 0
    run(main())


def test_http1_client_is_told_to_use_http2():
    async def main():
        transport, _ = start_transport("n1")
        port = int(transport.endpoints()["http2"].rpartition(":")[2])
        await asyncio.sleep(0)  # the listener starts serving on the loop's next turn
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 505 ")
    run(main())


def test_inbound_body_budget_refuses_with_overloaded():
    async def main():
        async with serving(max_message_bytes=1 << 20, inbound_bytes_max=100 << 10) as (
                transport, _, client):
            resp = await client.post(agent_url(transport, "a", "say"),
                                     content=json.dumps("x" * (200 << 10)))
            assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
            resp = await client.post(agent_url(transport, "a", "say"), content=b'"small"')
            assert resp.json() == "small"
        assert transport.health()["inbound_body_bytes"] == 0
    run(main())


def test_more_than_100_concurrent_streams_on_one_connection():
    async def main():
        transport, node = start_transport("n1")
        limits = httpx.Limits(max_connections=1)
        async with h2c_client(limits=limits) as client:
            async def call(i: int) -> httpx.Response:
                return await client.post(agent_url(transport, f"echo%2F{i}", "slow"),
                                         json={"delay": 0.2, "i": i})
            responses = await asyncio.gather(*(call(i) for i in range(250)))
        assert [r.json()["i"] for r in responses] == list(range(250))
        assert transport.health()["connections"] == 1
        # the streams the server allows (SETTINGS_MAX_CONCURRENT_STREAMS) were all used
        assert node.in_flight_max == 100
    run(main())


def test_curl_prior_knowledge():
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")

    async def main():
        transport, _ = start_transport("n1")
        url = agent_url(transport, "echo%2Fcurl", "say")
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--http2-prior-knowledge", "--max-time", "10",
            "-H", "content-type: application/json", "-d", '{"from": "curl"}',
            "-w", "\n%{http_code} %{http_version}", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        body, _, tail = out.decode().rpartition("\n")
        assert tail == "200 2", err
        assert json.loads(body) == {"from": "curl"}
    run(main())


class RawH2:
    """A bare h2 client, for what httpx will not do: reset streams, break the protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.flush()

    @classmethod
    async def open(cls, transport: Http2Transport) -> "RawH2":
        await asyncio.sleep(0)  # the listener serves from the loop's next turn
        port = int(transport.endpoints()["http2"].rpartition(":")[2])
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    def post(self, path: str, body: bytes) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
            (b":path", path.encode()), (b"content-type", b"application/json")])
        self.h2.send_data(stream_id, body, end_stream=True)
        self.flush()
        return stream_id

    async def status_of(self, stream_id: int) -> int:
        """Read until ``stream_id``'s response headers come."""
        while True:
            data = await self.reader.read(65536)
            assert data, "the server closed the connection"
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    self.flush()
                    return int(dict(event.headers)[b":status"])
            self.flush()


def test_a_stream_reset_before_the_reply_drops_the_reply_only():
    async def main():
        transport, node = start_transport("n1")
        raw = await RawH2.open(transport)
        slow = raw.post("/v1/agents/a/messages/slow", b'{"delay": 0.3}')
        await asyncio.sleep(0.1)
        raw.h2.reset_stream(slow, h2.errors.ErrorCodes.CANCEL)
        raw.flush()
        while node.replies_sent == []:
            await asyncio.sleep(0.02)
        assert node.replies_sent == [False]  # the node is told; nothing is written
        assert transport.health()["streams_reset"] == 1
        assert await raw.status_of(raw.post("/v1/agents/a/messages/x", b"1")) == 200
        raw.writer.close()
    run(main())


def test_a_protocol_violation_costs_only_that_connection():
    async def main():
        transport, node = start_transport("n1")
        broken = await RawH2.open(transport)
        broken.writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
        answer = await asyncio.wait_for(broken.reader.read(), 5)  # all, until closed
        events = broken.h2.receive_data(answer)
        assert isinstance(events[-1], h2.events.ConnectionTerminated)
        raw = await RawH2.open(transport)
        assert await raw.status_of(raw.post("/v1/agents/a/messages/x", b"1")) == 200
        raw.writer.close()
    run(main())


# Peers ------------------------------------------------------------------------

def endpoints_of(*transports: Http2Transport) -> dict[str, dict[str, str]]:
    return {t.node_id: t.endpoints() for t in transports}


def test_peer_round_trip_and_a_2_mib_message():
    async def main():
        a, node_a = start_transport("a")
        b, node_b = start_transport("b")
        outcomes: list[tuple[str, bool]] = []
        a.set_outcome(lambda peer, ok: outcomes.append((peer, ok)))
        a.set_peers(endpoints_of(b), [])
        b.set_peers(endpoints_of(a), [])
        given_up: list[tuple[str, str]] = []
        frames = [b"SYNP3", b"GOSSIP", b"a", b"body", b"\x00\x00\x00\x00"]
        now = asyncio.get_running_loop().time()
        assert a.send("b", frames, lambda *why: given_up.append(why), now)
        await asyncio.wait_for(node_b.peer_arrived.wait(), 10)
        assert node_b.peer_messages == [frames]

        # bigger than every window (64 KiB initial, 1 MiB per stream): it moves
        # only if the sender waits for the window and the receiver acknowledges
        big = [b"SYNP3", b"REPL", b"a", bytes(range(256)) * (8 << 10), b"crc!"]
        node_b.peer_arrived.clear()
        assert a.send("b", big, lambda *why: given_up.append(why))
        await asyncio.wait_for(node_b.peer_arrived.wait(), 20)
        assert node_b.peer_messages[-1] == big

        # and the other way, many at once on one connection
        for i in range(300):
            b.send("a", [b"SYNP3", b"STATQ", b"b", str(i).encode(), b"crc!"])
        while len(node_a.peer_messages) < 300:
            await asyncio.sleep(0.01)
        assert [m[3] for m in node_a.peer_messages] == [str(i).encode() for i in range(300)]
        assert given_up == [] and outcomes == [("b", True), ("b", True)]
        assert a.health()["peer_sent"] == 2 and b.health()["peers_connected"] == 1
        assert not a.has_queued and not b.has_queued
    run(main())


def test_peer_send_to_an_unreachable_endpoint_gives_up():
    async def main():
        a, _ = start_transport("a")
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        a.set_peers({"gone": {"http2": dead}, "zmq-only": {"zmq": "tcp://127.0.0.1:1"}}, [])
        outcomes: list[tuple[str, bool]] = []
        a.set_outcome(lambda peer, ok: outcomes.append((peer, ok)))
        given_up: list[tuple[str, str]] = []
        assert not a.send("zmq-only", [b"SYNP3", b"x"], lambda *why: given_up.append(why))
        assert given_up[-1][0] == "unavailable"
        assert a.send("gone", [b"SYNP3", b"x"], lambda *why: given_up.append(why))
        assert a.has_queued
        while len(given_up) < 2:  # the queue's deadline, applied by the transport's tick
            await asyncio.sleep(0.05)
        assert given_up[1][0] == "unavailable" and not a.has_queued
        assert outcomes == [("zmq-only", False), ("gone", False)]
        # stop tells the callers of what still waits
        a.send("gone", [b"SYNP3", b"x"], lambda *why: given_up.append(why))
        a.stop()
        assert len(given_up) == 3 and "shutting down" in given_up[2][1]
    run(main())


def test_idle_connections_close_and_the_next_send_reconnects(monkeypatch):
    monkeypatch.setattr(http2, "IDLE_S", 1.0)  # ticks are 0.25 s apart: no overlap

    async def main():
        a, _ = start_transport("a")
        b, node_b = start_transport("b")
        a.set_peers(endpoints_of(b), [])
        async with h2c_client() as client:  # a client connection, idle after one call
            resp = await client.post(agent_url(b, "a", "x"), json=1)
            assert resp.status_code == 200
            assert a.send("b", [b"SYNP3", b"GOSSIP", b"a", b"1", b"crc!"])
            await asyncio.wait_for(node_b.peer_arrived.wait(), 10)
            assert b.health()["connections_open"] == 2
            while b.health()["connections_open"] > 0:  # the link after 0.5 s, the client's after 1
                await asyncio.sleep(0.05)
        assert a.health()["peers_connected"] == 0
        node_b.peer_arrived.clear()
        assert a.send("b", [b"SYNP3", b"GOSSIP", b"a", b"2", b"crc!"])
        await asyncio.wait_for(node_b.peer_arrived.wait(), 10)
        assert [m[3] for m in node_b.peer_messages] == [b"1", b"2"]
        assert b.health()["idle_closed"] == 1 and a.health()["peer_failed"] == 0
    run(main())


# TLS ----------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture
def pki(tmp_path):
    """A CA, certificates it signed (two nodes, a client), and a rogue self-signed one."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test-ca", ca_key, "test-ca", ca_key, ca=True)
    files = {"ca": _write(tmp_path / "ca", ca, ca_key)[0]}
    for name in ("node-a", "node-b", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, "test-ca", ca_key, False)
        files[name] = _write(tmp_path / name, cert, key)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    files["rogue"] = _write(tmp_path / "rogue", _certificate(
        "rogue", rogue_key, "rogue", rogue_key, False), rogue_key)
    return files


def _client_context(ca: str | None, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if cert:
        ctx.load_cert_chain(*cert)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def test_tls_clients_peers_and_bad_handshakes(pki):
    async def main():
        def tls(name: str) -> dict:
            cert, key = pki[name]
            return {"tls_cert": cert, "tls_key": key, "tls_ca": pki["ca"]}
        a, node_a = start_transport("a", **tls("node-a"))
        b, node_b = start_transport("b", **tls("node-b"))
        base = a.endpoints()["http2"]
        assert base.startswith("https://127.0.0.1:")
        url = f"{base}/v1/agents/echo%2Ftls/messages/say"

        async with httpx.AsyncClient(http2=True, verify=_client_context(pki["ca"], None)) as client:
            resp = await client.post(url, json={"secure": True})
            assert resp.http_version == "HTTP/2" and resp.json() == {"secure": True}
            assert node_a.principals[-1].startswith(b"http2:127.0.0.1:")
            # /v1/peer wants a client certificate of the CA
            resp = await client.post(f"{base}/v1/peer", content=b"\x01\x00\x00\x00\x01x")
            assert resp.status_code == 403 and resp.json()["code"] == "forbidden"

        async with httpx.AsyncClient(http2=True, verify=_client_context(
                pki["ca"], pki["client"])) as client:
            resp = await client.post(url, json=1)
            assert resp.status_code == 200
            assert node_a.principals[-1] == b"http2-cert:commonName=client"

        bad_clients = [
            httpx.AsyncClient(http2=True, verify=_client_context(None, None)),  # unknown CA
            httpx.AsyncClient(http2=True, verify=_client_context(pki["ca"], pki["rogue"])),
            h2c_client(),  # cleartext to a TLS port
        ]
        for bad in bad_clients:
            async with bad:
                target = url.replace("https://", "http://") if bad is bad_clients[2] else url
                with pytest.raises(httpx.TransportError):
                    await bad.post(target, json=1, timeout=5.0)

        # peers verify each other against the CA, in both directions
        a.set_peers(endpoints_of(b), [])
        frames = [b"SYNP3", b"GOSSIP", b"node-a", b"over tls", b"crc!"]  # its CN
        assert a.send("b", frames)
        await asyncio.wait_for(node_b.peer_arrived.wait(), 10)
        assert node_b.peer_messages == [frames]
        # a node certificate speaks only for the node it names
        refused = asyncio.Event()
        assert a.send("b", [b"SYNP3", b"GOSSIP", b"node-b", b"forged", b"crc!"],
                      lambda code, reason: refused.set())
        await asyncio.wait_for(refused.wait(), 10)
        assert node_b.peer_messages == [frames]

        async with httpx.AsyncClient(http2=True, verify=_client_context(pki["ca"], None)) as client:
            resp = await client.post(url, json="still serving")
            assert resp.json() == "still serving"
    run(main())


def test_a_peer_with_a_certificate_of_another_ca_is_refused(pki):
    async def main():
        a, _ = start_transport("a", tls_cert=pki["rogue"][0], tls_key=pki["rogue"][1],
                               tls_ca=pki["ca"])
        b, node_b = start_transport("b", tls_cert=pki["node-b"][0], tls_key=pki["node-b"][1],
                                    tls_ca=pki["ca"])
        a.set_peers(endpoints_of(b), [])
        given_up: list[tuple[str, str]] = []
        a.send("b", [b"SYNP3", b"GOSSIP", b"a", b"x", b"crc!"], lambda *why: given_up.append(why))
        while not given_up:
            await asyncio.sleep(0.05)
        assert given_up[0][0] == "unavailable" and node_b.peer_messages == []
    run(main())
