"""node.logs: JSON lines on stderr with the standard keys, level filtering, console mode."""

import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROGRAM = """
import sys
from node import logs
logs.configure(sys.argv[1], sys.argv[2], "n1")
log = logs.get_logger(agent_id="a1")
log.debug("dbg", x=1)
log.info("hello", trace_id="t1", count=3)
log.warning("careful")
log.bind(agent_id="a2").error("boom")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
print("stdout stays clean")
"""


def run(level: str, fmt: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    return subprocess.run([sys.executable, "-c", PROGRAM, level, fmt], capture_output=True,
                          text=True, timeout=30, env=env, check=True)


def json_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_json_lines_carry_standard_and_bound_keys():
    proc = run("info", "json")
    assert proc.stdout == "stdout stays clean\n"
    records = json_lines(proc.stderr)
    assert [r["event"] for r in records] == ["hello", "careful", "boom", "failed"]
    first = records[0]
    assert list(first)[:4] == ["timestamp", "level", "event", "node_id"]
    assert first["level"] == "info" and first["node_id"] == "n1"
    assert first["agent_id"] == "a1" and first["trace_id"] == "t1" and first["count"] == 3
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset().total_seconds() == 0
    assert records[2]["agent_id"] == "a2"
    assert "ZeroDivisionError" in records[3]["exception"]


@pytest.mark.parametrize("level, events", [
    ("debug", ["dbg", "hello", "careful", "boom", "failed"]),
    ("warning", ["careful", "boom", "failed"]),
    ("error", ["boom", "failed"]),
])
def test_level_filtering(level, events):
    assert [r["event"] for r in json_lines(run(level, "json").stderr)] == events


def test_console_format_is_human_readable():
    stderr = run("info", "console").stderr
    assert "hello" in stderr and "agent_id" in stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(stderr.splitlines()[0])


def test_bad_level_or_format_is_rejected():
    from node import logs
    with pytest.raises(ValueError):
        logs.configure("loud", "json", "n")
    with pytest.raises(ValueError):
        logs.configure("info", "xml", "n")


# --- rate limit of repeated events ---------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited_log():
    """structlog writing JSON lines to a buffer through a RateLimiter on a fake clock."""
    import io

    import structlog

    from node import logs
    clock, out = FakeClock(), io.StringIO()
    limiter = logs.RateLimiter(events_per_s=3, clock=clock)
    structlog.configure(
        processors=[limiter, structlog.processors.add_log_level,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False)

    def lines() -> list[dict]:
        records = json_lines(out.getvalue())
        out.seek(0)
        out.truncate()
        return records

    yield structlog.get_logger(), clock, limiter, lines
    structlog.reset_defaults()


def test_repeated_warnings_are_limited_per_event_and_summarised(limited_log):
    log, clock, limiter, lines = limited_log
    for i in range(10):
        log.warning("bad_gossip", n=i)
    for i in range(5):
        log.error("bad_peer_frame", n=i)   # its own budget
    got = lines()
    assert [(r["event"], r["n"]) for r in got] == [
        ("bad_gossip", 0), ("bad_gossip", 1), ("bad_gossip", 2),
        ("bad_peer_frame", 0), ("bad_peer_frame", 1), ("bad_peer_frame", 2)]
    assert limiter.totals == {"bad_gossip": 7, "bad_peer_frame": 2}

    clock.now += 0.5   # same window: still dropped, no summary yet
    log.warning("bad_gossip", n=10)
    log.info("unrelated")
    assert [r["event"] for r in lines()] == ["unrelated"]

    clock.now += 0.6   # the window is over: the next call of any kind reports first
    log.info("members_ok")
    got = lines()
    summaries = {r["suppressed_event"]: r for r in got if r["event"] == "log_suppressed"}
    assert {k: v["count"] for k, v in summaries.items()} == {"bad_gossip": 8,
                                                             "bad_peer_frame": 2}
    assert all(r["level"] == "warning" and r["window_s"] == 1.0 for r in summaries.values())
    assert got[-1]["event"] == "members_ok"
    log.info("members_ok")
    assert [r["event"] for r in lines()] == ["members_ok"]   # reported once only

    for i in range(4):   # a new window: a new budget
        log.warning("bad_gossip", n=i)
    assert len(lines()) == 3


def test_info_lifecycle_events_are_never_limited(limited_log):
    log, _, limiter, lines = limited_log
    for i in range(50):
        log.info("agent_restarted", n=i)
    assert len(lines()) == 50
    assert limiter.totals == {}


def test_members_changed_is_limited_because_gossip_can_trigger_it(limited_log):
    log, clock, limiter, lines = limited_log
    for i in range(20):
        log.info("members_changed", members=[f"fake{i}"])
    assert len(lines()) == 3 and limiter.totals == {"members_changed": 17}


def test_many_event_names_share_a_bounded_table(limited_log):
    from node import logs
    log, _, limiter, lines = limited_log
    for i in range(logs.EVENT_NAMES_MAX + 50):
        for _ in range(5):
            log.warning(f"event{i}")
    assert len(limiter._windows) == logs.EVENT_NAMES_MAX + 1   # plus the shared slot
    assert len(lines()) <= 3 * (logs.EVENT_NAMES_MAX + 1)


def test_rate_must_be_positive():
    from node import logs
    with pytest.raises(ValueError):
        logs.RateLimiter(events_per_s=0)


def test_flood_of_bad_peer_traffic_writes_bounded_log(tmp_path):
    """Issue 6 #12: thousands of bad gossip and peer frames, and gossip that changes
    the member view every time, must not turn into a log line each."""
    import time

    import msgpack
    import zmq

    from protocols import peer, wire
    from support import NodeProcess

    node = NodeProcess("flooded", tmp_path)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        node.wait_serving()
        start_bytes = node.log_path.stat().st_size
        sock.connect(f"tcp://{node.address}")
        n = 3000
        started = time.monotonic()
        generation = time.time_ns() - 10**9
        for i in range(n):
            sock.send_multipart(peer.gossip("fake", {"kind": "nope"}))   # bad_gossip
            sock.send_multipart([peer.MAGIC, b"NOPE", b"fake", b"x"])   # bad_peer_frame
            fake = {"id": "fake", "gen": generation + i,
                    "ep": {"zmq": "tcp://127.0.0.1:1", "zmq-pub": "tcp://127.0.0.1:2"}}
            sock.send_multipart(peer.gossip("fake", {"v": 2, "kind": "sync",
                                                     "u": [fake]}))  # view changes
        # One connection is read in order: the ping's answer means all was handled.
        sock.send(wire.encode(wire.request("last", wire.TYPE_PING)))
        assert sock.poll(60_000), "the node did not answer after the flood"
        sock.recv()
        elapsed_s = time.monotonic() - started
        time.sleep(1.1)   # the last window ends; the next log call reports its drops
    finally:
        sock.close()
        node.stop()
    records = [json.loads(line) for line in
               node.log_path.read_text().splitlines()[-100_000:] if line.startswith("{")]
    flood = [r for r in records if r["event"] in ("bad_gossip", "bad_peer_frame",
                                                  "members_changed", "log_suppressed")]
    written = node.log_path.stat().st_size - start_bytes
    # Per event name at most 10 records and one summary per started second.
    windows = elapsed_s + 2
    assert len(flood) <= 3 * 11 * windows, (len(flood), elapsed_s)
    assert written < 3 * 11 * windows * 1024, written
    assert written < 200 * 1024   # unlimited, it was over 9,000 lines (about 2 MB)
    # Nothing is lost silently: passed + reported-suppressed = sent.
    for event in ("bad_gossip", "bad_peer_frame"):
        passed = sum(1 for r in flood if r["event"] == event)
        dropped = sum(r["count"] for r in flood
                      if r["event"] == "log_suppressed" and r["suppressed_event"] == event)
        assert passed + dropped == n, (event, passed, dropped)
    assert any(r["event"] == "node_stopped" for r in records)   # info is never dropped
