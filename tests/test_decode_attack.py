"""Issue 6 #10: an oversize frame is refused before it is decoded.

Before the fix a 4 MiB frame of empty msgpack maps was decoded first (about
300 MB of dicts, half a second of CPU) and only then answered too_large.  The
bound is asserted in bytes (the node's peak RSS), not time.
"""

from __future__ import annotations

import msgpack
import pytest
import zmq

pytestmark = pytest.mark.timeout(90)

MAX_BYTES = 1 << 20           # the node's default max_message_bytes
ATTACK_BYTES = 4 * (1 << 20)  # under the hard guard (4 * limit + 64 KiB): answered
ROUNDS = 6
PEAK_GROWTH_MAX = 64 << 20    # decoding one such frame would add ~300 MB


def empty_maps_frame(rid: str, count: int) -> bytes:
    """A request whose data is an array of ``count`` empty maps, one byte each."""
    head = msgpack.packb({"v": 1, "id": rid, "type": "echo", "subject": "echo/x",
                          "mode": "call"})
    return (bytes((head[0] + 1,)) + head[1:] + msgpack.packb("data")
            + b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count)


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_oversize_empty_maps_are_refused_without_the_decode_cost(node_factory):
    node = node_factory("--max-message-bytes", str(MAX_BYTES))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{node.address}")
    try:
        frame = empty_maps_frame("attack", ATTACK_BYTES)
        assert MAX_BYTES < len(frame) <= 4 * MAX_BYTES + 65536
        sock.send(frame)  # the first one grows zmq's and Python's buffers once
        assert sock.poll(20_000)
        sock.recv()
        baseline = peak_rss_bytes(node.proc.pid)
        for i in range(ROUNDS):
            sock.send(empty_maps_frame(f"attack-{i}", ATTACK_BYTES))
            assert sock.poll(20_000), "no answer to an oversize frame"
            reply = msgpack.unpackb(sock.recv(), raw=False)
            assert reply["data"]["code"] == "too_large" and reply["re"] == f"attack-{i}", reply
        growth = peak_rss_bytes(node.proc.pid) - baseline
        assert growth < PEAK_GROWTH_MAX, f"peak RSS grew {growth >> 20} MiB"
        with node.client() as c:  # still serving
            assert c.call("echo/after", "echo", [1]) == [1]
    finally:
        sock.close()
