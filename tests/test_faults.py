"""Fault injection (node/transports/faults.py): two real ZeroMQ transports in one process,
each wrapped in a FaultyTransport reading its own faults file.

Arrival is checked without timing: after the faulted messages, a marker goes out on
the same ZeroMQ link through the inner transport (no faults), named from a sender no
rule names.  One DEALER -> ROUTER connection keeps order, so once the marker is in,
everything sent before it that survived the faults is in too.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import structlog
import zmq

from node import transports
from node.metrics import NodeMetrics
from node.transports import faults
from node.transports.faults import FaultsError, FaultyTransport, write_faults
from protocols import peer
from protocols.membership import ZMQ

TIMEOUT_S = 20.0
MARKER = "marker"        # sender id of the markers: no rule in these tests names it


class Recorder:
    """The node's side of the Inbound interface: keeps what arrives, in order."""

    def __init__(self):
        self.peer_frames: list[list[bytes]] = []
        self.clients: list[tuple] = []
        self.multicasts: list[tuple[str, bytes]] = []
        self.failures: list[Exception] = []
        self.arrived = asyncio.Event()

    def peer(self, frames: list[bytes]) -> None:
        self.peer_frames.append(frames)
        self.arrived.set()

    def client(self, handle, payload: bytes, principal: bytes = b"") -> None:
        self.clients.append((handle, payload))
        self.arrived.set()

    def multicast(self, group: str, payload: bytes) -> None:
        self.multicasts.append((group, payload))
        self.arrived.set()

    def malformed(self, handle, nframes: int) -> None:
        raise AssertionError(f"malformed message of {nframes} frames")

    def failed(self, handle, payload, exc: Exception) -> None:
        self.failures.append(exc)

    def from_sender(self, sender: str) -> list[list[bytes]]:
        return [f for f in self.peer_frames if faults.sender_of(f) == sender]

    async def wait_for(self, done) -> None:
        while not done():
            self.arrived.clear()
            await self.arrived.wait()


class Node:
    """One wrapped ZmqTransport on 127.0.0.1 port 0 and what it received."""

    def __init__(self, node_id: str, faults_path, loop: asyncio.AbstractEventLoop):
        metrics = NodeMetrics(node_id)
        inner = transports.create(
            "zmq", node_id=node_id, router_bind="tcp://127.0.0.1:0",
            router_endpoint="tcp://127.0.0.1:0", pub_bind="tcp://127.0.0.1:0",
            pub_endpoint="tcp://127.0.0.1:0", max_message_bytes=1 << 20, peer_hwm=10000,
            pub_hwm=10000, metrics=metrics, log=structlog.get_logger(), linger_ms=0,
            limits={"connections_max": 64, "conn_inbound_bytes_max": 64 << 20,
                    "inbound_bytes_max": 256 << 20, "client_reply_bytes_max": 64 << 20})
        self.id = node_id
        self.metrics = metrics
        self.transport = faults.wrap(inner, faults_path, structlog.get_logger(), metrics)
        self.inbox = Recorder()
        self.transport.start(loop, self.inbox)
        self._retries = loop.create_task(self._retry_queued())

    async def _retry_queued(self) -> None:
        """What the runtime does: sends queued until a link is up are retried."""
        while True:
            await asyncio.sleep(0.01)
            if self.transport.has_queued:
                self.transport.retry(time.monotonic())

    def send(self, to: str, frames: list[bytes]) -> bool:
        return self.transport.send(to, frames, None, time.monotonic())

    def stop(self) -> None:
        self._retries.cancel()
        self.transport.stop()

    def send_marker(self, to: str, token: str) -> None:
        """A message past this node's outbound faults, on the same link as the rest."""
        self.transport._inner.send(to, peer.status_query(MARKER, token), None,
                                   time.monotonic())

    async def marker_arrived(self, token: str) -> None:
        await self.inbox.wait_for(lambda: any(
            faults.sender_of(f) == MARKER and f[3] == token.encode()
            for f in self.inbox.peer_frames))


async def pair(tmp_path) -> tuple[Node, Node]:
    """Nodes 'na' and 'nb', each knowing the other, faults files na.json and nb.json."""
    loop = asyncio.get_running_loop()
    a = Node("na", tmp_path / "na.json", loop)
    b = Node("nb", tmp_path / "nb.json", loop)
    for me, other in ((a, b), (b, a)):
        me.transport.set_peers({other.id: other.transport.endpoints()}, [])
    return a, b


def stop(*nodes: Node) -> None:
    for node in nodes:
        node.stop()


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def queries(sender: str, n: int) -> list[list[bytes]]:
    return [peer.status_query(sender, f"q{i}") for i in range(n)]


async def send_all(src: Node, dst: Node, messages, marker: str) -> list[list[bytes]]:
    """Send ``messages`` src -> dst, then a marker; what dst got from src before it
    (and after the previous marker)."""
    before = len(dst.inbox.from_sender(src.id))
    for frames in messages:
        assert src.send(dst.id, frames)
    src.send_marker(dst.id, marker)
    await dst.marker_arrived(marker)
    return dst.inbox.from_sender(src.id)[before:]


# --- the file format ------------------------------------------------------------------

EXAMPLE = {"seed": 1, "rules": [
    {"peers": ["n4", "n5"], "direction": "both", "cut": True},
    {"peers": ["*"], "drop": 0.05, "duplicate": 0.01, "corrupt": 0.01, "delay_ms": [5, 20]}]}


def test_the_documented_example_parses_and_the_first_matching_rule_wins(tmp_path):
    path = tmp_path / "f.json"
    write_faults(path, EXAMPLE["rules"], seed=1)
    parsed = faults.parse(path.read_text())
    assert parsed.seed == 1 and len(parsed.rules) == 2
    cut, rest = parsed.rules
    assert cut.cut and cut.peers == {"n4", "n5"} and cut.direction == "both"
    assert (rest.drop, rest.duplicate, rest.corrupt, rest.delay_ms) == (0.05, 0.01, 0.01,
                                                                         (5.0, 20.0))
    assert parsed.rule_for("n4", "in") is cut and parsed.rule_for("n5", "out") is cut
    assert parsed.rule_for("n1", "out") is rest
    one_way = faults.parse('{"rules": [{"peers": ["n2"], "direction": "out", "cut": true}]}')
    assert one_way.rule_for("n2", "out") is not None and one_way.rule_for("n2", "in") is None
    assert faults.parse("") == faults.parse("  \n") == faults.NO_FAULTS


@pytest.mark.parametrize("text", [
    "{", "[]", '{"rules": {}}', '{"seed": "1"}', '{"seeds": 1}',
    '{"rules": [{"peers": []}]}', '{"rules": [{"peers": "n1"}]}',
    '{"rules": [{"peers": ["n1"], "dorp": 0.5}]}',
    '{"rules": [{"peers": ["n1"], "drop": 1.5}]}',
    '{"rules": [{"peers": ["n1"], "corrupt": true}]}',
    '{"rules": [{"peers": ["n1"], "direction": "sideways"}]}',
    '{"rules": [{"peers": ["n1"], "cut": 1}]}',
    '{"rules": [{"peers": ["n1"], "delay_ms": [20, 5]}]}',
    '{"rules": [{"peers": ["n1"], "delay_ms": [5]}]}',
])
def test_invalid_files_are_refused(text):
    with pytest.raises(FaultsError):
        faults.parse(text)


def test_write_faults_writes_atomically_and_never_what_a_node_would_refuse(tmp_path):
    path = tmp_path / "f.json"
    with pytest.raises(FaultsError):
        write_faults(path, [{"peers": ["n1"], "drop": 2}])
    assert os.listdir(tmp_path) == []  # nothing written, no temp file left
    write_faults(path, [{"peers": ["n1"], "drop": 0.5}], seed=9)
    assert faults.parse(path.read_text()).seed == 9
    assert os.listdir(tmp_path) == ["f.json"]


def test_start_warns_loudly(tmp_path):
    async def main():
        with structlog.testing.capture_logs() as logs:
            a, b = await pair(tmp_path)
        stop(a, b)
        assert [r["warning"] for r in logs if r["event"] == "fault_injection_enabled"] == [
            faults.WARNING, faults.WARNING]
    run(main())


# --- faults on real transports ------------------------------------------------------------

def test_cut_drops_everything_both_ways_and_counts_it(tmp_path):
    write_faults(tmp_path / "na.json", [{"peers": ["nb"], "cut": True}])

    async def main():
        a, b = await pair(tmp_path)
        try:
            assert await send_all(a, b, queries("na", 20), "m1") == []      # out of na
            assert await send_all(b, a, queries("nb", 20), "m2") == []      # into na
            assert a.transport.counts() == {"cut": 40, "drop": 0, "corrupt": 0,
                                            "duplicate": 0, "delay": 0}
            assert a.transport.health()["faults"]["cut"] == 40
            assert a.metrics._limited["fault_cut"] == 40
            write_faults(tmp_path / "na.json", [])  # healed: traffic flows again
            await wait_reloaded(a.transport, 0)
            assert len(await send_all(a, b, queries("na", 5), "m3")) == 5
        finally:
            stop(a, b)
    run(main())


def test_drop_loses_what_the_seeded_draws_say(tmp_path):
    n, rate, seed = 400, 0.3, 7
    write_faults(tmp_path / "na.json", [{"peers": ["nb"], "direction": "out", "drop": rate}],
                 seed=seed)
    sent = queries("na", n)
    draws = random.Random(seed)  # one draw per message: the rule has only 'drop'
    kept = [frames for frames in sent if not draws.random() < rate]

    async def main():
        a, b = await pair(tmp_path)
        try:
            got = await send_all(a, b, sent, "m")
            assert got == kept  # exactly the messages the seed keeps, in order
            assert a.transport.counts()["drop"] == n - len(kept)
            assert 0.2 * n < n - len(kept) < 0.4 * n  # the seed gives about the rate
        finally:
            stop(a, b)
    run(main())


def test_duplicate_delivers_twice_inbound(tmp_path):
    write_faults(tmp_path / "nb.json", [{"peers": ["na"], "direction": "in",
                                         "duplicate": 1.0}])

    async def main():
        a, b = await pair(tmp_path)
        try:
            got = await send_all(a, b, queries("na", 30), "m")
            assert len(got) == 60
            assert got[0] == got[1] and got[0] != got[2]
            assert b.transport.counts()["duplicate"] == 30
            assert a.transport.counts()["duplicate"] == 0
        finally:
            stop(a, b)
    run(main())


def test_delay_delivers_everything_later(tmp_path):
    write_faults(tmp_path / "na.json", [{"peers": ["nb"], "delay_ms": [5, 20]}])

    async def main():
        a, b = await pair(tmp_path)
        try:
            for frames in queries("na", 25):
                a.send("nb", frames)
            assert a.transport.has_queued  # delayed sends keep the runtime calling retry
            await b.inbox.wait_for(lambda: len(b.inbox.from_sender("na")) == 25)
            assert a.transport.counts()["delay"] == 25
            assert not a.transport.has_queued
        finally:
            stop(a, b)
    run(main())


def classify(frames: list[bytes]) -> str:
    """'refused' when the peer codec raises (the runtime counts peer_<reason>), else
    'decoded' (the message reaches the runtime's handlers changed)."""
    try:
        peer.decode(frames)
    except peer.PeerProtocolError:
        return "refused"
    return "decoded"


def test_corrupt_changes_bytes_and_the_peer_codec_refuses_every_one(tmp_path):
    write_faults(tmp_path / "nb.json", [{"peers": ["na"], "direction": "in", "corrupt": 1.0}],
                 seed=3)
    member = {"id": "na", "gen": 1, "ep": {ZMQ: "tcp://127.0.0.1:1", "zmq_pub": "tcp://x:2"}}
    kinds = [peer.gossip("na", {"v": 2, "kind": "sync", "u": [member]}),
             peer.status_query("na", "tok"), peer.reply("na", bytes(16), b"\x80"),
             peer.forward("na", "na", 1, bytes(16), b"\x81\xa2id\xa1x")]
    sent = [kinds[i % len(kinds)] for i in range(200)]

    async def main():
        a, b = await pair(tmp_path)
        try:
            for frames in sent:
                a.send("nb", frames)
            a.send_marker("nb", "m")
            await b.marker_arrived("m")
            got = [f for f in b.inbox.peer_frames if faults.sender_of(f) != MARKER]
            assert len(got) == 200 and b.transport.counts()["corrupt"] == 200
            assert all(g != s for g, s in zip(got, sent))  # every one changed
            verdicts = [classify(g) for g in got]
            refused = verdicts.count("refused")
            print(f"corrupted 200 peer messages: {refused} refused by peer.decode, "
                  f"{200 - refused} decoded")
            assert refused == 200  # the checksum (peer protocol v3) catches every one
        finally:
            stop(a, b)
    run(main())


def test_client_and_multicast_traffic_are_untouched(tmp_path):
    write_faults(tmp_path / "na.json", [{"peers": ["*"], "cut": True}])
    write_faults(tmp_path / "nb.json", [{"peers": ["*"], "cut": True}])

    async def main():
        a, b = await pair(tmp_path)
        ctx = zmq.Context()
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        try:
            client.connect(a.transport.endpoints()[ZMQ])
            client.send(b"\x80")
            await a.inbox.wait_for(lambda: a.inbox.clients)
            handle, payload = a.inbox.clients[0]
            assert payload == b"\x80" and a.transport.reply(handle, b"\x81")
            while not client.poll(0):
                await asyncio.sleep(0.01)
            assert client.recv() == b"\x81"
            while not b.inbox.multicasts:  # a SUB joins late: publish until one lands
                a.transport.broadcast(b"g1", [b"\x80"])
                await asyncio.sleep(0.02)
            assert b.inbox.multicasts[0] == ("g1", b"\x80")
            assert a.transport.counts()["cut"] == 0 and b.transport.counts()["cut"] == 0
        finally:
            client.close()
            ctx.term()
            stop(a, b)
    run(main())


# --- the file changing under a running node ---------------------------------------------

async def wait_reloaded(transport: FaultyTransport, rules: int) -> None:
    """Until the reload timer has loaded a file with ``rules`` rules."""
    while len(transport.faults.rules) != rules:
        await asyncio.sleep(0.02)


def test_the_file_is_reread_when_it_changes_and_an_invalid_one_keeps_the_rules(tmp_path):
    path = tmp_path / "na.json"

    async def main():
        a, b = await pair(tmp_path)  # no file yet: no faults
        try:
            assert a.transport.faults == faults.NO_FAULTS
            assert len(await send_all(a, b, queries("na", 3), "m1")) == 3
            write_faults(path, [{"peers": ["nb"], "cut": True}])
            await wait_reloaded(a.transport, 1)
            with structlog.testing.capture_logs() as logs:
                path.write_text('{"rules": [{"peers": ["nb"], "dorp": 1}]}')
                while not any(r["event"] == "faults_file_invalid" for r in logs):
                    await asyncio.sleep(0.02)
            assert a.transport.faults.rules[0].cut  # the previous rules stay in force
            assert await send_all(a, b, queries("na", 3), "m2") == []
            path.write_text("")  # empty: no faults
            await wait_reloaded(a.transport, 0)
            write_faults(path, [{"peers": ["nb"], "cut": True}])
            await wait_reloaded(a.transport, 1)
            path.unlink()  # missing: no faults
            await wait_reloaded(a.transport, 0)
            assert len(b.inbox.from_sender("na")) == 3
        finally:
            stop(a, b)
    run(main())
