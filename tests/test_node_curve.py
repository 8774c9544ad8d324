"""CURVE on real node processes (issue: who may talk to a node).

Three nodes with keys of their own, peers and clients listed in directories; the
attacks are those a plain client could make before: forged gossip and forwards,
claiming a node id, joining with an unlisted key, and reading traffic on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from node.client import CallTimeout, Client
from node.curve import load_keyring, load_secret, new_certificates, write_public_cert
from protocols import peer
from support import REPO, NodeProcess, child_env, member_states, member_view, wait_until
from test_node_abuse import limited

pytestmark = pytest.mark.timeout(120)


class Keys:
    """Every certificate of one test: node keys, a listed client, strangers."""

    def __init__(self, root: Path):
        self.own = root / "own"          # each party's secret stays here
        self.peers = root / "peers"      # what every node lets in as a peer
        self.clients = root / "clients"  # ... and as a client
        self.peers.mkdir(parents=True)
        self.clients.mkdir()
        for name in ("n1", "n2", "n3", "alice", "mallory", "rogue"):
            new_certificates(str(self.own), name)
        for name in ("n1", "n2", "n3"):
            shutil.copy(self.own / f"{name}.key", self.peers)
        shutil.copy(self.own / "alice.key", self.clients)

    def secret(self, name: str) -> str:
        return str(self.own / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.own / f"{name}.key")

    def node_args(self, name: str) -> tuple[str, ...]:
        return ("--curve-secret", self.secret(name), "--curve-peers", str(self.peers),
                "--curve-clients", str(self.clients))

    def name_seed(self, name: str, address: str) -> None:
        """Write the seed's public certificate with its address, now that it is bound,
        so joining nodes know which key to dial it with."""
        public, _ = load_secret(self.secret(name))
        write_public_cert(self.peers / f"{name}.key", public, endpoint=f"tcp://{address}")


def start(keys: Keys, tmp_path: Path, name: str, seeds=(), key: str | None = None):
    node = NodeProcess(name, tmp_path, seeds=seeds, metrics=True,
                       args=keys.node_args(key or name),
                       client_curve=(keys.secret("alice"), keys.public(key or name)))
    return node


@pytest.fixture
def secured(tmp_path):
    keys = Keys(tmp_path / "keys")
    nodes = []
    try:
        first = start(keys, tmp_path, "n1")
        nodes.append(first)
        first.wait_serving()
        keys.name_seed("n1", first.address)
        for name in ("n2", "n3"):
            nodes.append(start(keys, tmp_path, name, seeds=(first.address,)))
        for node in nodes:
            node.wait_serving()
        for node in nodes:
            wait_until(lambda: sorted(member_states(member_view(node))) == ["n1", "n2", "n3"],
                       timeout_s=15, what=f"{node.name} sees the three nodes")
        yield keys, nodes
    finally:
        for node in nodes:
            node.kill()


def test_an_allowed_client_calls_agents_on_every_node(secured):
    keys, nodes = secured
    with nodes[0].client() as c:
        agents = [f"counter/c{i}" for i in range(30)]
        for i, agent in enumerate(agents):
            assert c.call(agent, "incr", {"n": i}) == {"value": i}
        status = c.status()
    held = {row["node"]: row.get("agents", 0) for row in status["members"]}
    assert sorted(held) == ["n1", "n2", "n3"]
    assert all(count > 0 for count in held.values()), held  # the calls crossed nodes


def test_no_key_or_an_unknown_key_never_reaches_a_handler(secured):
    keys, nodes = secured
    n1 = nodes[0]
    with Client(n1.address, timeout_s=1.0) as plain:
        with pytest.raises(CallTimeout):
            plain.call("counter/x", "incr", {"n": 1})
    with Client(n1.address, timeout_s=1.0, curve_secret=keys.secret("mallory"),
                curve_server=keys.public("n1")) as stranger:
        with pytest.raises(CallTimeout):
            stranger.call("counter/x", "incr", {"n": 1})
    wait_until(lambda: limited(n1, "curve_handshake_refused") >= 1, timeout_s=10,
               what="the unknown key counted")
    with n1.client() as c:
        assert c.call("counter/x", "get") == {"value": 0}  # neither increment ran


def _raw_dealer(ctx: zmq.Context, keys: Keys, key_name: str, node: NodeProcess) -> zmq.Socket:
    """A socket that authenticates with ``key_name``'s key and sends what we like."""
    public, secret = load_secret(keys.secret(key_name))
    server, _ = load_secret(keys.secret(node.name))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server, public, secret
    sock.connect(f"tcp://{node.address}")
    return sock


def _forged_entry(node_id: str, address: str) -> dict:
    return {"id": node_id, "gen": time.time_ns() + 10**9,
            "ep": {"zmq": address, "zmq-pub": "tcp://127.0.0.1:10"}}


def _sync(*entries: dict) -> dict:
    return {"v": 2, "kind": "sync", "u": list(entries)}


def test_a_client_key_cannot_send_peer_frames(secured):
    """Gossip and forwards from a client key are refused and counted; the ring and
    the member view do not change."""
    keys, nodes = secured
    n1 = nodes[0]
    before = member_view(n1)
    with zmq.Context() as ctx:
        sock = _raw_dealer(ctx, keys, "alice", n1)
        gossip = _sync(_forged_entry("n2", "tcp://127.0.0.1:9"),
                       _forged_entry("evil", "tcp://127.0.0.1:11"))
        sock.send_multipart(peer.gossip("n2", gossip))
        envelope = b"\x80"
        sock.send_multipart(peer.forward("n2", "n2", 1, os.urandom(16), envelope))
        wait_until(lambda: limited(n1, "curve_peer_frame_from_client") >= 2, timeout_s=10,
                   what="both frames refused")
        sock.close()
    after = member_view(n1)
    assert member_states(after) == member_states(before)
    assert {m["node_id"]: m["address"] for m in after["members"]} == \
        {m["node_id"]: m["address"] for m in before["members"]}


def test_a_peer_key_speaks_only_for_its_own_node_id(secured):
    """n3's key sending gossip as n2 (claiming n2 moved) is refused."""
    keys, nodes = secured
    n1 = nodes[0]
    real = {m["node_id"]: m["address"] for m in member_view(n1)["members"]}
    with zmq.Context() as ctx:
        sock = _raw_dealer(ctx, keys, "n3", n1)
        sock.send_multipart(peer.gossip("n2", _sync(_forged_entry("n2", "tcp://127.0.0.1:9"))))
        wait_until(lambda: limited(n1, "curve_sender_mismatch") >= 1, timeout_s=10,
                   what="the mismatch refused")
        sock.close()
    assert {m["node_id"]: m["address"] for m in member_view(n1)["members"]} == real


def test_a_peer_cannot_introduce_a_member_no_certificate_binds(secured):
    """A listed peer (n3's key, as n3) gossiping a made-up member "evil", or n2 at
    another key: membership refuses both entries."""
    keys, nodes = secured
    n1 = nodes[0]
    before = {m["node_id"]: m["address"] for m in member_view(n1)["members"]}
    evil = _forged_entry("evil", "tcp://127.0.0.1:11")
    evil["ep"]["zmq-key"] = load_secret(keys.secret("rogue"))[0].decode()
    moved = _forged_entry("n2", "tcp://127.0.0.1:9")
    moved["ep"]["zmq-key"] = evil["ep"]["zmq-key"]
    with zmq.Context() as ctx:
        sock = _raw_dealer(ctx, keys, "n3", n1)
        sock.send_multipart(peer.gossip("n3", _sync(evil, moved)))
        wait_until(lambda: limited(n1, "gossip_entry_refused") >= 2, timeout_s=10,
                   what="both entries refused")
        sock.close()
    assert {m["node_id"]: m["address"] for m in member_view(n1)["members"]} == before


def test_a_node_with_an_unlisted_key_cannot_join(secured, tmp_path):
    keys, nodes = secured
    n1 = nodes[0]
    rogue = start(keys, tmp_path, "rogue", seeds=(n1.address,))
    try:
        rogue.wait_ready()
        wait_until(lambda: limited(n1, "curve_handshake_refused") >= 1, timeout_s=10,
                   what="the rogue node's handshake refused")
        time.sleep(1.0)  # several gossip periods: it would have joined by now
        assert "rogue" not in member_states(member_view(n1))
    finally:
        rogue.kill()


class _Recorder:
    """A TCP relay on loopback that keeps every byte it passes: the capture."""

    def __init__(self, target: str):
        self.captured = bytearray()
        self._target = target.rsplit(":", 1)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        upstream = socket.create_connection((self._target[0], int(self._target[1])))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.captured += data
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()


def test_traffic_on_the_wire_is_not_plaintext(secured):
    keys, nodes = secured
    n1 = nodes[0]
    relay = _Recorder(n1.address)
    marker = "plaintext-marker-" + os.urandom(6).hex()
    try:
        with Client(relay.address, timeout_s=5.0, curve_secret=keys.secret("alice"),
                    curve_server=keys.public("n1")) as c:
            assert c.call("echo/wire", "say", marker) == marker
    finally:
        relay.close()
    assert len(relay.captured) > 200, "the relay saw the call"
    assert marker.encode() not in relay.captured
    assert b"echo/wire" not in relay.captured


def test_keys_reload_on_sighup_revokes_and_admits_clients(secured):
    """Removing alice's certificate and sending SIGHUP stops her calls on the
    connection she already has; adding a new client's makes it work, no restart."""
    keys, nodes = secured
    n1 = nodes[0]
    new_certificates(str(keys.own), "bob")
    with n1.client() as alice:
        assert alice.call("counter/r", "incr", {"n": 1}) == {"value": 1}
        os.remove(keys.clients / "alice.key")
        shutil.copy(keys.own / "bob.key", keys.clients)
        n1.signal(signal.SIGHUP)
        wait_until(lambda: "keys_reloaded" in n1.log(), timeout_s=10, what="the reload")
        with pytest.raises(CallTimeout):
            alice.call("counter/r", "incr", {"n": 1}, timeout_s=1.0)
    assert limited(n1, "curve_key_revoked") >= 1
    with Client(n1.address, timeout_s=5.0, curve_secret=keys.secret("bob"),
                curve_server=keys.public("n1")) as bob:
        assert bob.call("counter/r", "get") == {"value": 1}  # alice's second call never ran


def test_a_broken_certificate_keeps_the_old_keys(secured):
    keys, nodes = secured
    n1 = nodes[0]
    (keys.clients / "junk.key").write_text("not a certificate\n")
    n1.signal(signal.SIGHUP)
    wait_until(lambda: "keys_reload_failed" in n1.log(), timeout_s=10, what="the refusal")
    with n1.client() as c:
        assert c.call("counter/k", "incr", {"n": 2}) == {"value": 2}


def test_multicast_reaches_members_on_every_node_over_curve(secured):
    """PUB and SUB run CURVE too: the SUBs dial each PUB with its node's key."""
    keys, nodes = secured
    agents = [f"member/m{i}" for i in range(12)]
    with nodes[0].client() as c:
        owners = {c.spawn("member", a, init={"group": "g"})["node"] for a in agents}
    assert owners == {"n1", "n2", "n3"}, owners
    deadline = time.monotonic() + 10
    with nodes[1].client() as pub, nodes[2].client() as reader:
        while time.monotonic() < deadline:  # SUBs connect asynchronously: probe first
            pub.publish("g", "note", "probe")
            time.sleep(0.1)
            if all("probe" in reader.call(a, "seen")["seen"] for a in agents):
                break
        else:
            pytest.fail("multicast never reached every member over CURVE")


def test_a_client_key_cannot_subscribe_to_multicast(secured):
    """The PUB's ZAP domain takes peer keys only: a client key's SUB is refused."""
    keys, nodes = secured
    n1 = nodes[0]
    pub_address = n1.wait_ready()["pub"]
    before = limited(n1, "curve_handshake_refused")
    with zmq.Context() as ctx:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        public, secret = load_secret(keys.secret("alice"))
        sub.curve_serverkey = load_secret(keys.secret("n1"))[0]
        sub.curve_publickey, sub.curve_secretkey = public, secret
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub_address)
        wait_until(lambda: limited(n1, "curve_handshake_refused") > before, timeout_s=10,
                   what="the client's SUB refused")
        sub.close()


def test_an_exposed_node_needs_keys_or_says_loudly_that_it_is_open():
    """No process binds here: the config refuses a non-loopback listen without keys;
    with curve = off the node says so at start and in /health."""
    from node.config import ConfigError, NodeConfig
    from node.runtime import Node

    with pytest.raises(ConfigError, match="curve"):
        NodeConfig(listen="0.0.0.0:0", advertise="127.0.0.1:0", metrics="off")
    node = Node(NodeConfig(listen="0.0.0.0:0", advertise="127.0.0.1:0", metrics="off",
                           curve="off"))
    said = []
    node.log = type("Recorder", (), {"error": lambda self, event, **kw: said.append(event)})()
    node._say_if_open()
    assert said == ["node_open"]
    ok, health = node._health()
    assert health["security"] == "open" and "open" in health["warning"]
    loopback = Node(NodeConfig(listen="127.0.0.1:0", metrics="off"))
    assert "warning" not in loopback._health()[1]


def _ctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from node.cli import ctl_main; "
                           "sys.exit(ctl_main())", *args],
                          capture_output=True, text=True, timeout=30,
                          env=child_env(**(env or {})), cwd=str(REPO))


def test_ctl_keys_new_writes_a_public_and_a_private_certificate(tmp_path):
    done = _ctl("keys", "new", str(tmp_path / "k"), "n9", "--node-id", "node-9",
                "--endpoint", "tcp://127.0.0.1:7400")
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "k" / "n9.key", tmp_path / "k" / "n9.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    ring = load_keyring(str(tmp_path / "k"), "")
    (cert,) = ring.peers.values()
    assert (cert.node_id, cert.endpoint) == ("node-9", "tcp://127.0.0.1:7400")
    assert ring.seed_key("tcp://127.0.0.1:7400") == cert.key
    again = _ctl("keys", "new", str(tmp_path / "k"), "n9")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_ctl_calls_a_curve_node_with_flags_or_environment(secured):
    keys, nodes = secured
    n1 = nodes[0]
    flags = ("--node", n1.address, "--curve-secret", keys.secret("alice"),
             "--curve-server", keys.public("n1"))
    done = _ctl(*flags, "call", "counter/ctl", "incr", '{"n": 3}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"value": 3}
    env = {"SYNTHESIS_CURVE_SECRET": keys.secret("alice"),
           "SYNTHESIS_CURVE_SERVER": keys.public("n1")}
    done = _ctl("--node", n1.address, "call", "counter/ctl", "get", env=env)
    assert json.loads(done.stdout) == {"value": 3}, done.stderr
    without = _ctl("--node", n1.address, "--timeout", "1", "call", "counter/ctl", "get")
    assert without.returncode == 3  # no key: the node never answers


def test_curve_frames_are_counted_as_they_are_on_the_wire(tmp_path):
    """The connection guard compares the kernel's byte count with what the node read.
    CURVE adds 33 bytes per frame: counted as plain ZMTP, a healthy connection's
    reads fell 33 bytes behind per frame and it was cut as a hoarder (seen after
    ~250k forwards).  With a 64 KiB budget, 6,000 calls on one connection would fall
    198 KB behind."""
    keys = Keys(tmp_path / "keys")
    node = NodeProcess("n1", tmp_path, metrics=True,
                       args=(*keys.node_args("n1"), "--conn-inbound-bytes-max", "65536"),
                       client_curve=(keys.secret("alice"), keys.public("n1")))
    try:
        node.wait_serving()
        with node.client(timeout_s=10) as c:  # calls in turn: nothing is ever left unread
            for i in range(6000):
                c.call("echo/wire", "say", i)
            assert c.call("echo/wire", "say", "last") == "last"
        assert limited(node, "conn_inbound_bytes") == 0
        assert "connection_cut" not in node.log()
    finally:
        node.kill()
