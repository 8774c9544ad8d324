"""node/storage.py: the node's local SQLite store of agents' snapshots and deltas.

Everything runs against real SQLite files in temp dirs.  The writer thread is held
still, where a test needs it to be, by a durable-callback that blocks on an Event
(callbacks run on the writer thread), so group commit and the queue bound are exact,
never timing-dependent.  Crash safety and disk-full handling run in child processes:
one is ``kill -9``ed mid-write, one writes under a file-size rlimit (a real write
error, no mock).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from node.storage import (COMPACT_BYTES_MIN, Recovered, Storage, StorageError, delete,
                          delta, snapshot)
from support import child_env, wait_until

CHILD_TIMEOUT_S = 60.0


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "node.db")


def loaded(store: Storage) -> dict[str, Recovered]:
    return {r.agent: r for r in store.load()}


class Gate:
    """A durable-callback that parks the writer thread until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, error):
        self.entered.set()
        assert self.release.wait(10), "gate never released"

    def hold(self, store: Storage) -> None:
        """Make the writer busy in this callback; returns once it is."""
        assert store.submit([delta("gate", "g", 1, b"")], self)
        assert self.entered.wait(10)


# --- round trips ------------------------------------------------------------------------

def test_round_trip_survives_close_and_reopen(db):
    answers = []
    with Storage(db) as store:
        for seq in (1, 2, 3):
            assert store.submit([delta("c/1", "counter", seq, b"d%d" % seq)], answers.append)
        assert store.submit([snapshot("kv/1", "kv", 5, b"S5"), delta("kv/1", "kv", 6, b"d6")])
        assert store.submit([snapshot("empty", "kv", 0, b"")])
        assert store.flush(10)
    assert answers == [None, None, None]
    with Storage(db) as store:
        assert list(store.load()) == [
            Recovered("c/1", "counter", None, [b"d1", b"d2", b"d3"], 3),
            Recovered("empty", "kv", b"", [], 0),
            Recovered("kv/1", "kv", b"S5", [b"d6"], 6),
        ]


def test_snapshot_replaces_the_deltas_it_covers_and_only_those(db):
    with Storage(db) as store:
        store.submit([delta("a", "counter", seq, b"%d" % seq) for seq in range(1, 6)])
        store.submit([snapshot("a", "counter", 3, b"S3")])
        store.flush(10)
        assert loaded(store)["a"] == Recovered("a", "counter", b"S3", [b"4", b"5"], 5)
        row = sqlite3.connect(db).execute(
            "SELECT seq, deltas, delta_bytes FROM state WHERE agent = 'a'").fetchone()
        assert row == (3, 2, 2)


def test_stale_and_repeated_writes_are_ignored(db):
    """Resubmits are harmless: a delta already stored or covered by the snapshot, and a
    snapshot older than the stored one, change nothing."""
    with Storage(db) as store:
        store.submit([delta("a", "kv", 1, b"one"), snapshot("a", "kv", 4, b"S4"),
                      delta("a", "kv", 5, b"five")])
        store.submit([delta("a", "kv", 5, b"again"), delta("a", "kv", 2, b"old"),
                      snapshot("a", "kv", 3, b"S3")])
        store.flush(10)
        assert loaded(store)["a"] == Recovered("a", "kv", b"S4", [b"five"], 5)


def test_delete_forgets_the_agent(db):
    with Storage(db) as store:
        store.submit([snapshot("a", "kv", 1, b"S"), delta("a", "kv", 2, b"d"),
                      delta("b", "kv", 1, b"b")])
        store.submit([delete("a")])
        store.flush(10)
        assert list(loaded(store)) == ["b"]
        assert sqlite3.connect(db).execute("SELECT count(*) FROM deltas").fetchone() == (1,)


def test_load_reads_one_consistent_snapshot_while_the_writer_runs(db):
    with Storage(db) as store:
        store.submit([delta(f"a{i}", "kv", 1, b"x") for i in range(3)])
        store.flush(10)
        reading = store.load()
        first = next(reading)
        store.submit([delta("a0", "kv", 2, b"y"), delta("a2", "kv", 2, b"y"),
                      delta("a9", "kv", 1, b"new")])
        store.flush(10)
        rest = list(reading)
        assert [first.agent] + [r.agent for r in rest] == ["a0", "a1", "a2"]
        assert rest[-1].deltas == [b"x"]
        assert loaded(store)["a2"].deltas == [b"x", b"y"]


def test_agent_ids_order_like_python_strings(db):
    """load() pairs rows of two cursors by agent order; non-ASCII ids must not break it."""
    agents = ["z", "ä", "a", "日本", "A", "a\x00b", "😀", ""]
    with Storage(db) as store:
        store.submit([delta(agent, "kv", 1, agent.encode()) for agent in agents])
        store.flush(10)
        got = list(store.load())
    assert [r.agent for r in got] == sorted(agents)
    assert all(r.deltas == [r.agent.encode()] for r in got)


# --- group commit, the queue bound, close ---------------------------------------------

def test_submits_during_a_commit_share_the_next_transaction(db):
    gate = Gate()
    answers = []
    with Storage(db) as store:
        gate.hold(store)
        for seq in range(1, 201):
            assert store.submit([delta("a", "counter", seq, b"x")], answers.append)
        gate.release.set()
        assert store.flush(10)
        stats = store.stats()
    assert answers == [None] * 200
    assert (stats.commits, stats.ops) == (2, 201)


def test_full_queue_refuses_and_keeps_nothing_of_the_refused(db):
    gate = Gate()
    with Storage(db, queue_ops_max=10) as store:
        gate.hold(store)   # its op is committed: the queue is empty again
        assert all(store.submit([delta("a", "kv", seq, b"x")]) for seq in range(1, 11))
        assert store.stats().queued_ops == 10
        assert not store.submit([delta("refused", "kv", 1, b"x")])
        gate.release.set()
        assert store.flush(10)
        assert store.stats().queued_ops == 0
        assert store.submit([delta("later", "kv", 1, b"x")])
        store.flush(10)
        assert set(loaded(store)) == {"gate", "a", "later"}


def test_queue_bound_in_bytes_admits_one_oversized_submit_when_idle(db):
    with Storage(db, queue_bytes_max=10_000) as store:
        gate = Gate()
        gate.hold(store)
        assert store.submit([delta("a", "kv", 1, b"x" * 6000)])
        assert not store.submit([delta("b", "kv", 1, b"x" * 6000)])
        assert store.stats().queued_bytes > 6000
        gate.release.set()
        assert store.flush(10)
        gate = Gate()
        gate.hold(store)
        assert store.submit([delta("huge", "kv", 1, b"x" * 50_000)])  # alone: let through
        assert not store.submit([delta("c", "kv", 1, b"x")])          # behind it: no
        gate.release.set()
        assert store.flush(10)
        assert set(loaded(store)) == {"gate", "a", "huge"}


def test_close_commits_what_is_queued_then_refuses(db):
    gate = Gate()
    store = Storage(db)
    gate.hold(store)
    for seq in range(1, 51):
        assert store.submit([delta("a", "kv", seq, b"x")])
    gate.release.set()
    store.close()
    store.close()   # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.submit([delta("a", "kv", 51, b"x")])
    with Storage(db) as again:
        assert len(loaded(again)["a"].deltas) == 50
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0


def test_a_raising_callback_does_not_stop_the_writer(db):
    def broken(error):
        raise RuntimeError("bug in the caller")

    answers = []
    with Storage(db) as store:
        assert store.submit([delta("a", "kv", 1, b"x")], broken)
        assert store.submit([delta("a", "kv", 2, b"y")], answers.append)
        assert store.flush(10)
        assert answers == [None]


# --- compaction requests ----------------------------------------------------------------

def test_too_many_deltas_ask_for_one_snapshot_until_it_comes(db):
    wanted: list[list[str]] = []
    with Storage(db, deltas_max=4, on_snapshot_wanted=wanted.append) as store:
        for seq in range(1, 5):
            store.submit([delta("a", "counter", seq, b"x")])
            store.flush(10)
        assert wanted == []
        for seq in range(5, 9):   # the 5th delta crosses deltas_max, then no repeats
            store.submit([delta("a", "counter", seq, b"x")])
            store.flush(10)
        assert wanted == [["a"]]
        store.submit([snapshot("a", "counter", 8, b"S8")])
        for seq in range(9, 14):  # after the snapshot the count starts over
            store.submit([delta("a", "counter", seq, b"x")])
        store.flush(10)
        assert wanted == [["a"], ["a"]]
        assert store.stats().snapshots_wanted == 2


def test_deltas_outweighing_the_snapshot_ask_for_a_snapshot(db):
    wanted: list[list[str]] = []
    big = b"s" * (2 * COMPACT_BYTES_MIN)
    with Storage(db, on_snapshot_wanted=wanted.append) as store:
        store.submit([snapshot("a", "kv", 1, big), snapshot("b", "kv", 1, b"small")])
        store.submit([delta("a", "kv", 2, b"d" * COMPACT_BYTES_MIN)])
        store.submit([delta("b", "kv", 2, b"d" * (COMPACT_BYTES_MIN // 2))])
        store.flush(10)
        assert wanted == []   # a: lighter than its snapshot; b: under the minimum
        store.submit([delta("a", "kv", 3, b"d" * COMPACT_BYTES_MIN + b"!")])
        store.submit([delta("b", "kv", 3, b"d" * (COMPACT_BYTES_MIN // 2) + b"!")])
        store.flush(10)
        assert sorted(sum(wanted, [])) == ["a", "b"]


# --- errors -----------------------------------------------------------------------------

def test_files_that_are_not_ours_are_refused_by_name(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all " * 100)
    with pytest.raises(StorageError, match=r"junk\.db: not a Synthesis storage file"):
        Storage(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StorageError, match=r"other\.db: .*another program"):
        Storage(other)
    ours = tmp_path / "ours.db"
    Storage(ours).close()
    with sqlite3.connect(ours) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match=r"ours\.db: schema version 99; .* version 1"):
        Storage(ours)
    with pytest.raises(StorageError, match="missing"):
        Storage(tmp_path / "missing" / "x.db")


def test_one_file_one_storage(db):
    with Storage(db):
        with pytest.raises(StorageError, match="in use"):
            Storage(db)
    Storage(db).close()   # free again once closed


@pytest.mark.parametrize("op", [
    ("delta", "a", "kv", 0, b"x"),          # delta seqs start at 1
    ("delta", "a", "kv", 1, "text"),
    ("delta", "a", "kv", True, b"x"),
    ("snapshot", "a", "kv", -1, b"x"),
    ("delta", 7, "kv", 1, b"x"),
    ("delta", "\udc80", "kv", 1, b"x"),     # cannot be stored as UTF-8
    ("delete",),
    ("rename", "a"),
    ["delete", "a"],
])
def test_malformed_ops_are_refused_before_queueing(db, op):
    with Storage(db) as store:
        with pytest.raises(ValueError):
            store.submit([op])
        assert store.stats().queued_ops == 0


def test_unknown_sync_policy(db):
    with pytest.raises(ValueError, match="full, normal, off"):
        Storage(db, sync="always")


# --- child processes: kill -9 and a failing disk ----------------------------------------

WRITER_CHILD = textwrap.dedent("""
    import sys, time
    from node.storage import Storage, delta, snapshot

    store = Storage(sys.argv[1], sync=sys.argv[2], deltas_max=16)

    def report(agent, seq):
        def on_durable(error):
            if error is None:
                print(agent, seq, flush=True)
        return on_durable

    seq = 0
    while True:
        seq += 1
        agent = f"a{seq % 37}"
        # Every 50th write a snapshot, so that replacing deltas is cut short too.
        if seq % 50 == 0:
            op = snapshot(agent, "counter", seq, b"snap %d" % seq)
        else:
            op = delta(agent, "counter", seq, b"%d" % seq + b"." * (seq % 300))
        while not store.submit([op], report(agent, seq)):
            time.sleep(0.001)
""")


def _covered(record: Recovered, seq: int) -> bool:
    """Is write ``seq`` in what was recovered: in the snapshot or among the deltas?"""
    snap_seq = int(record.snapshot.split()[1]) if record.snapshot else 0
    delta_seqs = {int(d.split(b".")[0]) for d in record.deltas}
    return seq <= snap_seq or seq in delta_seqs


def _read_lines(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def read():
        for line in proc.stdout:
            if line.endswith("\n"):   # a line cut by the kill was never fully reported
                lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sync", ["full", "normal", "off"])
def test_kill_9_keeps_every_write_reported_durable(db, sync):
    """Every policy survives a process crash: committed WAL frames are in the kernel
    whether or not they were fsynced (power loss is what tells the policies apart)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, db, sync],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    lines: list[str] = []
    try:
        reader = _read_lines(proc, lines)
        wait_until(lambda: len(lines) >= 2000 or proc.poll() is not None,
                   CHILD_TIMEOUT_S, "2000 durable writes in the child")
        assert proc.poll() is None, "the writer child died on its own"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(CHILD_TIMEOUT_S)
    reader.join(CHILD_TIMEOUT_S)
    acked = [line.split() for line in lines]
    with Storage(db) as store:
        recovered = loaded(store)
    lost = [(agent, seq) for agent, seq in acked
            if agent not in recovered or not _covered(recovered[agent], int(seq))]
    assert len(acked) >= 2000 and lost == []


DISK_FULL_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from node.storage import Storage, delta

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit: EFBIG
    wanted, answers = [], []
    store = Storage(sys.argv[1], on_snapshot_wanted=wanted.extend)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
    seq = 0
    while not any(answers) and seq < 1000:   # until a write fails
        seq += 1
        store.submit([delta("big", "kv", seq, os.urandom(4096))], answers.append)
        store.flush(10)
    failed = answers[-1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    store.submit([delta("after", "kv", 1, b"x")], answers.append)
    store.flush(10)
    print(json.dumps({"failed_seq": seq, "error": str(failed), "agents": failed.agents,
                      "after": answers[-1], "wanted": wanted,
                      "loaded": sorted(r.agent for r in store.load()),
                      "failed_commits": store.stats().failed_commits}))
    store.close()
""")


def test_a_failing_disk_fails_the_writes_and_the_writer_goes_on(db):
    out = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, db], env=child_env(),
                         capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 1 < result["failed_seq"] < 1000
    assert result["error"].startswith(db + ": write failed")
    assert result["agents"] == ["big"]
    assert "big" in result["wanted"]      # its stored state has a gap: snapshot it
    assert result["after"] is None        # once the disk has room, writes succeed
    assert result["loaded"] == ["after", "big"]
    assert result["failed_commits"] == 1
