"""The bridges beside ZeroMQ on real node processes (issue: pluggable transports).

Peers configured for a bridge forward over it; a bridge that goes away is fallen back
from (ZeroMQ carries on) and its circuit breaker opens, then half-opens and closes
once it is back.  The outage is real: a TCP relay in the test stands between the
nodes, and the test closes it and opens it again.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest

from support import Cluster, NodeProcess, free_port, metric_samples, wait_until

pytestmark = pytest.mark.timeout(120)
HTTP2 = ("--http2", "127.0.0.1:0", "--transport-order", "http2,zmq")


def transport_count(node: NodeProcess, stat: str, transport: str) -> float:
    return metric_samples(node).get(
        (f"synthesis_transport_{stat}_total", (("transport", transport),)), 0.0)


def owned_by(entry: NodeProcess, owner: str, count: int = 5) -> list[str]:
    """Counter agents whose owner is ``owner`` (spawned, and placed by the ring)."""
    found = []
    with entry.client() as c:
        for i in range(200):
            agent = f"counter/x{i}"
            if c.spawn("counter", agent)["node"] == owner:
                found.append(agent)
                if len(found) == count:
                    return found
    raise AssertionError(f"no agents owned by {owner}")


@pytest.fixture
def pair(tmp_path):
    cluster = Cluster(2, tmp_path, args=HTTP2, metrics=True)
    try:
        yield cluster
    finally:
        cluster.close()


def test_forwards_go_over_http2_and_replies_come_back(pair):
    n0, n1 = pair.nodes
    agents = owned_by(n0, "n1")
    before = transport_count(n0, "messages", "http2")
    with n0.client() as c:  # a ZeroMQ client; its calls reach n1 over HTTP/2
        for i, agent in enumerate(agents):
            assert c.call(agent, "incr", {"n": i + 1}) == {"value": i + 1}
    assert transport_count(n0, "messages", "http2") >= before + len(agents)
    assert transport_count(n0, "fallbacks", "zmq") == 0


def test_an_external_http2_client_calls_an_agent(pair):
    n0 = pair.nodes[0]
    endpoint = _advertised_http2(n0)
    with httpx.Client(http1=False, http2=True, base_url=endpoint, timeout=10) as web:
        first = web.post("/v1/agents/counter%2Fweb/messages/incr", json={"n": 5})
        assert (first.status_code, first.json()) == (200, {"value": 5})
        assert first.http_version == "HTTP/2"
        missing = web.post("/v1/agents/nosuch%2Fx/messages/get")
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_agent"
        assert web.post("/v1/agents/counter%2Fweb/messages/incr", content=b"{").status_code == 400
        assert web.get("/v1/nowhere").status_code == 404
        huge = web.post("/v1/agents/counter%2Fweb/messages/incr", content=b"x" * (2 << 20),
                        headers={"content-type": "application/json"})
        assert huge.status_code == 413
        again = web.post("/v1/agents/counter%2Fweb/messages/get")
        assert again.json() == {"value": 5}  # bad input left the node serving
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-X", "POST",
                              "-H", "content-type: application/json", "-d", '{"n": 2}',
                              f"{endpoint}/v1/agents/counter%2Fweb/messages/incr"],
                             capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == '{"value":7}' or '"value": 7' in out.stdout, out


def _advertised_http2(node: NodeProcess) -> str:
    """The node's own HTTP/2 endpoint, as its peers see it in membership."""
    with node.client() as c:
        for row in c.members()["members"]:
            endpoint = (row.get("endpoints") or {}).get("http2")
            if row["node_id"] == node.name and endpoint:
                return endpoint
    raise AssertionError(f"{node.name} advertises no http2 endpoint")


class Relay:
    """A TCP relay on a fixed loopback port that can be closed and opened again."""

    def __init__(self, port: int, target: str):
        self.port, self.target = port, target.removeprefix("http://").rsplit(":", 1)
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.open()

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def breaker_state(node: NodeProcess, peer: str, transport: str) -> float | None:
    return metric_samples(node).get(("synthesis_transport_breaker_state",
                                     (("peer", peer), ("transport", transport))))


def test_a_bridge_that_goes_away_falls_back_opens_its_breaker_and_recovers(tmp_path):
    """n1 is reached over HTTP/2 through a relay; the relay closes: calls still work
    (over ZeroMQ), n0's breaker for (n1, http2) opens; the relay comes back: after
    the open time a trial goes through and the breaker closes."""
    n0 = NodeProcess("n0", tmp_path, metrics=True,
                     args=(*HTTP2, "--breaker-failures", "2", "--breaker-open-s", "1"))
    nodes = [n0]
    relay = None
    try:
        n0.wait_serving()
        relay_port, bridge_port = free_port(), free_port()
        n1 = NodeProcess("n1", tmp_path, seeds=(n0.address,), metrics=True,
                         args=(*HTTP2, "--http2", f"127.0.0.1:{bridge_port}",
                               "--http2-advertise", f"127.0.0.1:{relay_port}"))
        nodes.append(n1)
        n1.wait_serving()
        relay = Relay(relay_port, f"127.0.0.1:{bridge_port}")
        wait_until(lambda: _sees(n0, "n1"), timeout_s=15, what="n0 sees n1")
        agents = owned_by(n0, "n1")
        with n0.client(timeout_s=10) as c:
            assert c.call(agents[0], "incr") == {"value": 1}
            relay.close()
            for i in range(6):  # each falls back to ZeroMQ and is answered
                assert c.call(agents[1], "incr") == {"value": i + 1}
            wait_until(lambda: breaker_state(n0, "n1", "http2") == 2, timeout_s=10,
                       what="the breaker open")
            assert transport_count(n0, "fallbacks", "zmq") >= 1
            row = next(r for r in c.status()["members"] if r["node"] == "n0")
            assert {(b["peer"], b["transport"], b["state"]) for b in
                    row["transports"]["breakers"]} >= {("n1", "http2", "open")}
            relay.open()
            deadline = time.monotonic() + 20
            while breaker_state(n0, "n1", "http2") != 0 and time.monotonic() < deadline:
                c.call(agents[2], "incr")  # traffic: the half-open trial goes with it
                time.sleep(0.2)
            assert breaker_state(n0, "n1", "http2") == 0, "the breaker never closed again"
    finally:
        if relay is not None:
            relay.close()
        for node in nodes:
            node.kill()


def _sees(node: NodeProcess, other: str) -> bool:
    with node.client() as c:
        return any(m["node_id"] == other and m["state"] == "alive"
                   for m in c.members()["members"])


# --- QUIC ------------------------------------------------------------------------------

def quic_args(certs_dir, name: str, *extra: str) -> tuple[str, ...]:
    return ("--quic", "127.0.0.1:0", "--tls-cert", str(certs_dir / f"{name}.pem"),
            "--tls-key", str(certs_dir / f"{name}.key"), "--tls-ca", str(certs_dir / "ca.pem"),
            "--transport-order", "quic,zmq", *extra)


@pytest.fixture
def certs(tmp_path):
    from node.cli import ctl_main
    directory = tmp_path / "certs"
    assert ctl_main(["certs", str(directory), "n0", "n1", "--client", "ops"]) == 0
    return directory


def test_forwards_go_over_quic_and_a_quic_client_calls_an_agent(tmp_path, certs):
    from node.quic_client import QuicClient
    cluster = Cluster(2, tmp_path, metrics=True, node_args=lambda name: quic_args(certs, name))
    try:
        n0 = cluster.nodes[0]
        agents = owned_by(n0, "n1")
        before = transport_count(n0, "messages", "quic")
        with n0.client() as c:  # a ZeroMQ client; its calls reach n1 over QUIC
            for i, agent in enumerate(agents):
                assert c.call(agent, "incr", {"n": i + 1}) == {"value": i + 1}
        assert transport_count(n0, "messages", "quic") >= before + len(agents)
        assert transport_count(n0, "fallbacks", "zmq") == 0
        quic = _advertised(n0, "quic")
        with QuicClient(quic, str(certs / "ca.pem"), str(certs / "ops.pem"),
                        str(certs / "ops.key")) as qc:
            assert qc.call(agents[0], "get") == {"value": 1}
            assert qc.call("counter/q", "incr", {"n": 4}) == {"value": 4}
    finally:
        cluster.close()


def _advertised(node: NodeProcess, transport: str) -> str:
    with node.client() as c:
        for row in c.members()["members"]:
            endpoint = (row.get("endpoints") or {}).get(transport)
            if row["node_id"] == node.name and endpoint:
                return endpoint
    raise AssertionError(f"{node.name} advertises no {transport} endpoint")


class UdpRelay:
    """A UDP relay on a fixed loopback port; ``cut`` drops everything (the peer's
    listener is gone, as far as anyone can tell), ``mend`` relays again."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.target = target
        self.cut_off = False
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.bind(("127.0.0.1", port))
        self._backs: dict[tuple, socket.socket] = {}
        self._closed = False
        threading.Thread(target=self._front_loop, daemon=True).start()

    def _front_loop(self) -> None:
        while not self._closed:
            try:
                data, source = self._front.recvfrom(65536)
            except OSError:
                return
            back = self._backs.get(source)
            if back is None:
                back = self._backs[source] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                back.connect(self.target)
                threading.Thread(target=self._back_loop, args=(back, source),
                                 daemon=True).start()
            if not self.cut_off:
                back.send(data)

    def _back_loop(self, back: socket.socket, source: tuple) -> None:
        while not self._closed:
            try:
                data = back.recv(65536)
            except OSError:
                return
            if not self.cut_off:
                try:
                    self._front.sendto(data, source)
                except OSError:  # closed meanwhile
                    return

    def close(self) -> None:
        self._closed = True
        self._front.close()
        for back in self._backs.values():
            back.close()


def test_a_quic_peer_that_goes_silent_falls_back_opens_the_breaker_and_recovers(tmp_path, certs):
    """n1's QUIC endpoint is reached through a UDP relay; the relay goes silent: calls
    go on over ZeroMQ and n0's breaker for (n1, quic) opens; the relay relays again:
    a trial goes through after the open time and the breaker closes."""
    fast = ("--breaker-failures", "2", "--breaker-open-s", "1", "--handler-timeout-s", "2",
            "--forward-margin-s", "1")
    n0 = NodeProcess("n0", tmp_path, metrics=True, args=quic_args(certs, "n0", *fast))
    nodes, relay = [n0], None
    try:
        n0.wait_serving()
        relay_port, quic_port = free_port(), free_port()
        n1 = NodeProcess("n1", tmp_path, seeds=(n0.address,), metrics=True,
                         args=(*quic_args(certs, "n1"), "--quic", f"127.0.0.1:{quic_port}",
                               "--quic-advertise", f"127.0.0.1:{relay_port}"))
        nodes.append(n1)
        relay = UdpRelay(relay_port, ("127.0.0.1", quic_port))
        n1.wait_serving()
        wait_until(lambda: _sees(n0, "n1"), timeout_s=15, what="n0 sees n1")
        agents = owned_by(n0, "n1")
        with n0.client(timeout_s=10) as c:
            assert c.call(agents[0], "incr") == {"value": 1}
            relay.cut_off = True
            _keep_calling(c, agents[1], lambda: breaker_state(n0, "n1", "quic") == 2)
            assert breaker_state(n0, "n1", "quic") == 2, "the breaker never opened"
            before = c.call(agents[1], "get")["value"]
            assert c.call(agents[1], "incr") == {"value": before + 1}  # over ZeroMQ
            assert transport_count(n0, "fallbacks", "zmq") >= 1
            relay.cut_off = False
            _keep_calling(c, agents[2], lambda: breaker_state(n0, "n1", "quic") == 0)
            assert breaker_state(n0, "n1", "quic") == 0, "the breaker never closed again"
            assert c.call(agents[2], "get")["value"] >= 1
    finally:
        if relay is not None:
            relay.close()
        for node in nodes:
            node.kill()


def _keep_calling(client, agent: str, until, timeout_s: float = 30.0) -> None:
    """Call ``agent`` until ``until()`` (at most ``timeout_s``).  A call in flight
    when the path broke may time out: that is what the breaker exists to end."""
    from node.client import CallTimeout, RemoteError
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        try:
            client.call(agent, "incr")
        except (RemoteError, CallTimeout):
            pass
        time.sleep(0.1)
