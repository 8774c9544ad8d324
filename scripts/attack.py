#!/usr/bin/env python3
"""Attack a node of your own on loopback and print what it cost the node.

    python scripts/attack.py ATTACK --node 127.0.0.1:7400 [--seconds 30]

Each attack is one function below, also used by tests/test_node_abuse.py with
small, bounded settings.  Every attack refuses any address outside 127.0.0.0/8:
these programs are for your own nodes, never anyone else's.

Attacks (issue "Bounded under abuse"; see docs/OPERATIONS.md, Limits):

  multipart        raw ZMTP: 4 MiB frames with the MORE flag, never a last frame
  slow-consumer    1 MiB echo calls whose replies are never read
  forged-gossip    a gossip entry claiming a member's id at our own address
  fake-members     gossip naming 1,020 members at dead addresses
  fake-origins     FWD frames naming 1,100 made-up origin endpoints
  kv-fill          1 MiB kv puts, until the node says 'overloaded'
  flood            one-way sends to 1,000 slow agents
  activations      virtual activations of new agent ids, as fast as possible
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.client import Client  # noqa: E402
from protocols import peer  # noqa: E402

MiB = 1 << 20
PEER_MAGIC = peer.MAGIC


def loopback(address: str) -> tuple[str, int]:
    """HOST:PORT of a node on this machine, or SystemExit."""
    host, _, port = address.rpartition(":")
    host = host or "127.0.0.1"
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise SystemExit(f"refusing {address}: attacks run against loopback nodes only")
    return host, int(port)


def node_pid(address: str) -> int | None:
    """The pid of the process listening on the node's port, if we may see it."""
    _, port = loopback(address)
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return conn.pid
    return None


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        return psutil.Process(pid).memory_info().rss / MiB
    except psutil.Error:
        return float("nan")


class PeakRss:
    """The node's largest resident size, sampled every 50 ms on a thread until stop():
    a node that frees what an attack cost shows the same size before and after."""

    def __init__(self, pid: int | None):
        self._pid = pid
        self._peak = rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self._peak = max(self._peak, rss_mb(self._pid))

    def stop(self, last: float) -> float:
        self._done.set()
        self._thread.join()
        return max(self._peak, last)


# --------------------------------------------------------------------------- ZMTP


def zmtp_connect(address: str, socket_type: bytes = b"DEALER") -> socket.socket:
    """A raw TCP connection that has done a ZMTP 3.0 NULL handshake."""
    sock = socket.create_connection(loopback(address), timeout=5)
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
    sock.sendall(greeting + b"\0" * 32)  # as-server 0, then 31 bytes of filler
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    sock.sendall(b"\x04" + bytes((len(body),)) + body)
    sock.recv(4096)  # the node's greeting (and READY): not needed
    return sock


def multipart(address: str, seconds: float, frame_bytes: int = 4 * MiB) -> dict:
    """Frames with MORE set, never a last one, on new connections when one is cut."""
    header = b"\x03" + struct.pack(">Q", frame_bytes)  # MORE | LONG
    chunk = b"\0" * frame_bytes
    sent = cuts = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock = zmtp_connect(address)
        except OSError:
            time.sleep(0.05)
            continue
        sock.settimeout(0.5)
        try:
            while time.monotonic() < deadline:
                sock.sendall(header)
                sock.sendall(chunk)
                sent += frame_bytes
        except OSError:  # cut by the node, or stalled past the timeout
            cuts += 1
        finally:
            sock.close()
    return {"sent_mb": sent / MiB, "connections_cut": cuts}


# --------------------------------------------------------------------------- clients


def _call_env(rid: str, mtype: str, subject: str, data=None, mode: str = "call") -> bytes:
    env = {"v": 1, "id": rid, "type": mtype, "subject": subject, "mode": mode}
    if data is not None:
        env["data"] = data
    return msgpack.packb(env, use_bin_type=True)


def slow_consumer(address: str, calls: int = 3000, size: int = MiB - 1024,
                  hold_s: float = 5.0) -> dict:
    """Echo calls of ``size`` bytes (just under the default limit) whose replies are
    never read; the connection stays open ``hold_s`` seconds after the last send."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVBUF, 4096)   # read nothing, and let the kernel hold little
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.SNDHWM, calls)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    payload = b"x" * size
    sent = 0
    for i in range(calls):
        try:
            sock.send(_call_env(f"s{i}", "echo", f"echo/slow{i % 16}", payload), zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.01)
        if i % 8 == 7:
            # Paced: a client that floods requests trips the inbound budget first;
            # this one only ever fails to read its replies.
            time.sleep(0.02)
    time.sleep(hold_s)
    sock.close()
    ctx.term()
    return {"calls_sent": sent}


@contextlib.contextmanager
def peer_connection(address: str, settle_s: float = 0.3):
    """A DEALER to the node, as a peer's; waits ``settle_s`` for what was sent to
    arrive before closing (LINGER 0 would drop it)."""
    ctx = zmq.Context()
    sock = peer_socket(ctx, address)
    try:
        yield sock
        time.sleep(settle_s)
    finally:
        sock.close()
        ctx.term()


def peer_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    return sock


def member_entry(node_id: str, address: str, pub: str, generation: int) -> dict:
    return {"id": node_id, "gen": generation, "ep": {"zmq": address, "zmq-pub": pub}}


def gossip(sock: zmq.Socket, members: list[dict], sender: str = "attacker") -> None:
    """A membership message, framed as the peer protocol does, claiming to be ``sender``."""
    sock.send_multipart(peer.gossip(sender, {"v": 2, "kind": "sync", "u": members}))


def forged_gossip(address: str, victim: str, at: str, generation: int = 2**64 - 1,
                  sender: str = "attacker") -> dict:
    """Claim ``victim``'s node id at address ``at`` (tcp://HOST:PORT)."""
    pub = at.rsplit(":", 1)[0] + ":1"
    with peer_connection(address) as sock:
        gossip(sock, [member_entry(victim, at, pub, generation)], sender=sender)
    return {"claimed": victim, "at": at, "generation": generation}


def fake_members(address: str, count: int = 1020) -> dict:
    """Members at addresses where nothing listens (ports on 127.0.0.1 nobody uses)."""
    members = [member_entry(f"fake-{i}", f"tcp://127.0.0.1:{20000 + i}",
                            f"tcp://127.0.0.1:{40000 + i}", 1) for i in range(count)]
    with peer_connection(address, settle_s=0.5) as sock:
        for start in range(0, count, 128):  # a membership message holds 128 entries
            gossip(sock, members[start:start + 128], sender="fake-0")
    return {"fake_members": count}


def fake_origins(address: str, agent: str, count: int = 1100) -> dict:
    """FWD frames naming made-up origin nodes, each carrying a real call."""
    with peer_connection(address, settle_s=0.5) as sock:
        for i in range(count):
            sock.send_multipart(peer.forward(f"ghost-{i}", f"ghost-{i}", 1, os.urandom(16),
                                             _call_env(f"o{i}", "echo", agent, i)))
    return {"fake_origins": count}


def kv_fill(address: str, size: int = MiB - 1024, puts_max: int = 2000, agents: int = 64,
            timeout_s: float = 10.0) -> dict:
    """Values of ``size`` bytes into ``agents`` kv agents until the node says 'overloaded'."""
    from node.client import RemoteError
    value = "v" * size
    stored = 0
    refused = None
    with Client(address, timeout_s=timeout_s) as c:
        for i in range(puts_max):
            try:
                c.call(f"kv/fill{i % agents}", "put", {"key": f"k{i}", "value": value})
                stored += 1
            except RemoteError as err:
                refused = err.code
                break
    return {"stored_mb": round(stored * size / MiB, 1), "refused_with": refused}


def flood(address: str, agents: int = 1000, messages: int = 200_000, nap_s: float = 30.0) -> dict:
    """One-way sends spread over many slow agents (the tests' ``slow`` behavior, or
    any behavior with an async ``sleep`` handler)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    for i in range(messages):
        sock.send(_call_env(f"f{i}", "sleep", f"slow/a{i % agents}", {"s": nap_s}, mode="send"))
    time.sleep(1.0)
    sock.close()
    ctx.term()
    return {"sent": messages}


def activations(address: str, count: int, window: int = 2000) -> dict:
    """Virtual activations of ``count`` fresh agent ids, pipelined."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    tag = uuid.uuid4().hex[:6]
    codes: dict[str, int] = {}
    inflight = 0
    sent = 0
    while sent < count or inflight:
        while sent < count and inflight < window:
            sock.send(_call_env(str(sent), "get", f"counter/{tag}-{sent}"))
            sent += 1
            inflight += 1
        if not sock.poll(10_000):
            break
        reply = msgpack.unpackb(sock.recv(), raw=False)
        inflight -= 1
        code = reply["data"]["code"] if reply["type"] == "syn.error" else "ok"
        codes[code] = codes.get(code, 0) + 1
    sock.close()
    ctx.term()
    return {"replies": codes}


# --------------------------------------------------------------------------- main


def _ping_ms(address: str) -> float:
    with Client(address, timeout_s=5.0) as c:
        started = time.perf_counter()
        c.ping()
        return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attack", choices=["multipart", "slow-consumer", "forged-gossip",
                                           "fake-members", "fake-origins", "kv-fill",
                                           "flood", "activations"])
    parser.add_argument("--node", default="127.0.0.1:7400")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--victim", default="n1", help="node id to claim (forged-gossip)")
    parser.add_argument("--count", type=int, default=1_000_000, help="activations")
    args = parser.parse_args(argv)
    loopback(args.node)
    pid = node_pid(args.node)
    before = rss_mb(pid)
    sampler = PeakRss(pid)  # every attack, not only multipart: the peak is the cost
    started = time.monotonic()
    if args.attack == "multipart":
        result = multipart(args.node, args.seconds)
    elif args.attack == "slow-consumer":
        result = slow_consumer(args.node)
    elif args.attack == "forged-gossip":
        result = forged_gossip(args.node, args.victim, "tcp://127.0.0.1:9")
    elif args.attack == "fake-members":
        result = fake_members(args.node)
    elif args.attack == "fake-origins":
        result = fake_origins(args.node, "echo/target")
    elif args.attack == "kv-fill":
        result = kv_fill(args.node)
    elif args.attack == "flood":
        result = flood(args.node)
    else:
        result = activations(args.node, args.count)
    after = rss_mb(pid)
    peak = sampler.stop(after)
    print(f"attack           {args.attack}")
    print(f"took             {time.monotonic() - started:.1f} s")
    for key, value in result.items():
        print(f"{key:<16} {value}")
    print(f"node rss         {before:.0f} MB before, {peak:.0f} MB peak, {after:.0f} MB after")
    try:
        print(f"ping after       {_ping_ms(args.node):.1f} ms")
    except Exception as exc:  # noqa: BLE001 - a report, whatever happened
        print(f"ping after       failed: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
