#!/usr/bin/env python3
"""Decode-cost attack (issue 6 #10): oversize frames of empty msgpack maps.

Each attacker sends a frame over ``max_message_bytes`` (but under the hard
guard, so the node answers ``too_large``) whose data is millions of one-byte
empty maps, waits for the answer and sends again.  Meanwhile a well-behaved
client pings the node; the script prints the ping latency before and during the
attack, the node's CPU time per attack frame, its peak RSS, and the in-process
cost of refusing one such frame.

    scripts/attack_decode.py                     # start a node from this tree, attack it
    scripts/attack_decode.py --before HEAD~3     # the same against a tree at HEAD~3 too,
                                                 # side by side in the same run
    scripts/attack_decode.py --address 127.0.0.1:7400   # attack a running node

Loopback only; every node the script starts is killed at exit.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import zmq

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def empty_maps_frame(rid: str, count: int) -> bytes:
    """A call whose data is an array of ``count`` empty maps (one byte each)."""
    head = msgpack.packb({"v": 1, "id": rid, "type": "echo", "subject": "echo/x",
                          "mode": "call"})
    return (bytes((head[0] + 1,)) + head[1:] + msgpack.packb("data")
            + b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """A node to attack: one we start from a source tree, or one already running."""

    def __init__(self, address: str | None, root: Path, max_bytes: int):
        self.proc = None
        if address is not None:
            self.address = address
            return
        self.address = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, PYTHONPATH=str(root))
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--node-id", "target", "--listen", self.address,
             "--pub", f"127.0.0.1:{free_port()}", "--metrics", "off", "--log-level", "error",
             "--max-message-bytes", str(max_bytes)],
            cwd=str(root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if ping_latency_s(self.address, timeout_s=15.0) is None:
            self.close()
            raise SystemExit(f"node from {root} did not start")

    def cpu_s(self) -> float | None:
        if self.proc is None:
            return None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def peak_rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    return sock


def ping_latency_s(address: str, timeout_s: float = 5.0) -> float | None:
    sock = _dealer(address)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            start = time.perf_counter()
            sock.send(msgpack.packb({"v": 1, "id": "p", "type": "syn.ping"}))
            if sock.poll(int(min(1.0, deadline - time.monotonic()) * 1000) + 1):
                sock.recv()
                return time.perf_counter() - start
        return None
    finally:
        sock.close()


def measure_pings(address: str, stop: threading.Event, duration_s: float) -> list[float]:
    """Ping every 10 ms until ``stop`` or ``duration_s``; latencies in seconds."""
    sock = _dealer(address)
    samples = []
    deadline = time.monotonic() + duration_s
    try:
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            n += 1
            rid = str(n)
            start = time.perf_counter()
            sock.send(msgpack.packb({"v": 1, "id": rid, "type": "syn.ping"}))
            while sock.poll(5000):
                if msgpack.unpackb(sock.recv(), raw=False).get("re") == rid:
                    samples.append(time.perf_counter() - start)
                    break
            else:
                samples.append(5.0)
            time.sleep(0.01)
    finally:
        sock.close()
    return samples


def attacker(address: str, frame: bytes, stop: threading.Event, codes: dict, lock) -> None:
    sock = _dealer(address)
    try:
        while not stop.is_set():
            sock.send(frame)
            while not stop.is_set():
                if sock.poll(200):
                    code = msgpack.unpackb(sock.recv(), raw=False)["data"].get("code")
                    with lock:
                        codes[code] = codes.get(code, 0) + 1
                    break
    finally:
        sock.close()


def refuse_cost(root: Path, frame: bytes, max_bytes: int) -> tuple[float, float]:
    """CPU ms and peak MB of one wire.parse_request refusal, in a child using ``root``'s wire."""
    # Time without tracemalloc (it slows allocation), then memory with it.
    code = (
        "import sys, time, tracemalloc\n"
        "from protocols import wire\n"
        "frame = sys.stdin.buffer.read()\n"
        "def refuse():\n"
        "    try:\n"
        f"        wire.parse_request(frame, {max_bytes})\n"
        "    except wire.WireError:\n"
        "        pass\n"
        "t = time.process_time()\n"
        "refuse()\n"
        "cpu = time.process_time() - t\n"
        "tracemalloc.start()\n"
        "refuse()\n"
        "print(cpu * 1000, tracemalloc.get_traced_memory()[1] / 1e6)\n")
    out = subprocess.run([sys.executable, "-c", code], input=frame, capture_output=True,
                         cwd=str(root), env=dict(os.environ, PYTHONPATH=str(root)),
                         check=True, timeout=60).stdout.split()
    return float(out[0]), float(out[1])


def pct(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))] * 1000


def run(label: str, args, root: Path, frame: bytes) -> dict:
    refuse_ms, refuse_mb = refuse_cost(root, frame, args.max_message_bytes)
    target = Target(args.address, root, args.max_message_bytes)
    try:
        quiet = measure_pings(target.address, threading.Event(), 1.0)
        stop, lock, codes = threading.Event(), threading.Lock(), {}
        threads = [threading.Thread(target=attacker, args=(target.address, frame, stop, codes,
                                                           lock), daemon=True)
                   for _ in range(args.attackers)]
        cpu_before = target.cpu_s()
        for t in threads:
            t.start()
        loud = measure_pings(target.address, stop, args.duration_s)
        stop.set()
        for t in threads:
            t.join(5)
        cpu_after = target.cpu_s()
        frames = sum(codes.values())
        return {
            "label": label, "refuse_ms": refuse_ms, "refuse_mb": refuse_mb,
            "quiet_p50": pct(quiet, 0.5), "quiet_p99": pct(quiet, 0.99),
            "p50": pct(loud, 0.5), "p99": pct(loud, 0.99), "max": max(loud) * 1000,
            "frames": frames, "codes": codes,
            "cpu_ms_per_frame": (None if cpu_before is None or not frames
                                 else (cpu_after - cpu_before) * 1000 / frames),
            "peak_rss_mb": target.peak_rss_mb(),
        }
    finally:
        target.close()


def show(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    print(f"{'tree':<14} {'refuse 1 frame':>20} {'ping quiet p50/p99':>19} "
          f"{'ping attacked p50/p99/max':>26} {'frames':>7} {'node CPU/frame':>15} "
          f"{'peak RSS':>9}")
    for r in rows:
        print(f"{r['label']:<14} {r['refuse_ms']:>8.3f} ms {r['refuse_mb']:>6.1f} MB "
              f"{r['quiet_p50']:>8.2f}/{r['quiet_p99']:<6.2f} ms "
              f"{r['p50']:>8.2f}/{r['p99']:.2f}/{r['max']:<7.1f} ms {r['frames']:>7} "
              f"{fmt(r['cpu_ms_per_frame'], '>11.2f')} ms {fmt(r['peak_rss_mb'], '>6.0f')} MB"
              f"   {r['codes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--address", help="attack a running node at HOST:PORT instead")
    parser.add_argument("--before", metavar="GIT_REF",
                        help="also start a node from this commit (git archive) and compare")
    parser.add_argument("--max-message-bytes", type=int, default=1 << 20)
    parser.add_argument("--payload-bytes", type=int, default=4 << 20,
                        help="empty maps per frame (one byte each)")
    parser.add_argument("--attackers", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=5.0)
    args = parser.parse_args()
    if args.address and args.before:
        parser.error("--before starts its own nodes; it cannot be used with --address")
    frame = empty_maps_frame("attack", args.payload_bytes)
    print(f"frame {len(frame)} bytes, node limit {args.max_message_bytes}, "
          f"{args.attackers} attackers for {args.duration_s:g} s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            rows.append(run(f"{args.before}", args, old, frame))
        rows.append(run("this tree", args, REPO, frame))
    show(rows)


if __name__ == "__main__":
    main()
