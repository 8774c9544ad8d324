"""Optional local durability: agents' CRDT snapshots and deltas in one SQLite file.

With ``storage_path`` set, the node writes every delta it applies (and now and then a
snapshot of an agent's merged state) here, and on restart :meth:`Storage.load` gives
each agent's snapshot and the deltas written after it, so a whole-cluster restart
loses no acknowledged write.  The state is opaque bytes: storage never decodes it,
only the node can merge deltas into a snapshot.

Why the shape:

- **One writer thread.**  A commit with ``sync="full"`` waits for fsync (milliseconds on
  real disks); the asyncio loop must never wait for it.  :meth:`Storage.submit` only
  queues; the writer commits and calls ``on_durable`` from its thread (the node wraps
  it in ``loop.call_soon_threadsafe``).
- **Group commit.**  Everything submitted while a commit runs goes into the next
  transaction, so one fsync covers many writes: throughput grows with load instead of
  being capped at one write per fsync.
- **Bounded.**  The queue is bounded in ops and bytes (committing ones included);
  past it ``submit`` returns False and the node answers ``overloaded``.
- **Every submit is answered once**: ``on_durable(None)`` once committed, or
  ``on_durable(StorageError)`` if the transaction failed (disk full, I/O error).  The
  writer survives the error; the agents of the failed transaction are reported as
  wanting a snapshot, since a fresh snapshot makes their stored state whole again.
- **Compaction is asked, not done.**  An agent with more than ``deltas_max`` deltas, or
  whose deltas outweigh its snapshot (and ``compact_bytes_min``), is reported to
  ``on_snapshot_wanted``; the node answers with a ``snapshot`` op, which replaces the
  deltas it covers.  Delta counts and bytes live in the ``state`` row, so the decision
  costs no per-agent memory and survives restarts.

Sync policies (``PRAGMA synchronous`` in WAL mode; docs/DURABILITY.md has the figures):

- ``full``: the WAL is fsynced at every commit before ``on_durable``: a committed write
  survives a process crash and a power loss.
- ``normal``: fsync only at checkpoints: survives a process crash (``kill -9``); a power
  loss may lose the last commits (never corrupts the file).
- ``off``: never fsync: survives a process crash; a power loss may corrupt the file.

File layout: ``PATH`` (the database), ``PATH-wal`` and ``PATH-shm`` (SQLite's WAL), and
``PATH.lock`` (an flock held while open, so two nodes never share one file).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import structlog

SCHEMA_VERSION = 1             # PRAGMA user_version of the files this code writes
APPLICATION_ID = 0x53594E31    # PRAGMA application_id, "SYN1": marks our files
SYNC_POLICIES = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
DELTAS_MAX = 64                # deltas of one agent before a snapshot is wanted
COMPACT_BYTES_MIN = 64 << 10   # deltas lighter than this never count as outweighing
QUEUE_OPS_MAX = 100_000        # ops queued or committing before submit says no
QUEUE_BYTES_MAX = 64 << 20     # bytes of those ops
ASKED_MAX = 100_000            # agents remembered as asked for a snapshot (then reset)
OP_OVERHEAD_BYTES = 64         # queue cost of an op beyond its ids and payload
SEQ_MAX = (1 << 63) - 1        # SQLite INTEGER

OpTuple = tuple
OnDurable = Callable[["StorageError | None"], None]

_SCHEMA = """
CREATE TABLE state (
    agent TEXT PRIMARY KEY,
    behavior TEXT NOT NULL,
    snapshot BLOB,                      -- NULL until the first snapshot
    seq INTEGER NOT NULL,               -- seq the snapshot covers (0: none)
    deltas INTEGER NOT NULL,            -- deltas stored after it ...
    delta_bytes INTEGER NOT NULL        -- ... and their bytes (compaction)
);
CREATE TABLE deltas (
    agent TEXT NOT NULL,
    seq INTEGER NOT NULL,
    delta BLOB NOT NULL,
    PRIMARY KEY (agent, seq)
);
"""


class StorageError(Exception):
    """Storage cannot open its file or a transaction failed.  ``path`` names the file;
    ``agents`` the agents whose writes were lost (a failed transaction)."""

    def __init__(self, path: str, message: str, agents: tuple[str, ...] = ()):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.agents = agents


@dataclass(frozen=True, slots=True)
class Recovered:
    """One agent as stored: merge ``deltas`` (in seq order) into ``snapshot``.
    ``seq`` is the highest seq stored for it: continue numbering after it."""

    agent: str
    behavior: str
    snapshot: bytes | None
    deltas: list[bytes]
    seq: int


@dataclass(frozen=True, slots=True)
class StorageStats:
    """Counters since open; ``queued_*`` include the transaction being committed."""

    commits: int
    ops: int
    bytes: int
    failed_commits: int
    snapshots_wanted: int
    queued_ops: int
    queued_bytes: int


def delta(agent: str, behavior: str, seq: int, data: bytes) -> OpTuple:
    """Op: append ``data`` (a delta numbered ``seq`` >= 1) to the agent's log."""
    return ("delta", agent, behavior, seq, data)


def snapshot(agent: str, behavior: str, seq: int, data: bytes) -> OpTuple:
    """Op: the agent's merged state covering every seq <= ``seq``; replaces those deltas."""
    return ("snapshot", agent, behavior, seq, data)


def delete(agent: str) -> OpTuple:
    """Op: forget the agent (stopped, or handed to another node for good)."""
    return ("delete", agent)


def _op_size(op: OpTuple) -> int:
    """Validate one op and return its queue cost in bytes (ValueError if malformed)."""
    if not isinstance(op, tuple) or not op:
        raise ValueError(f"storage op must be a non-empty tuple, got {op!r:.80}")
    kind = op[0]
    if kind == "delete" and len(op) == 2:
        return _text_size(op[1], "agent") + OP_OVERHEAD_BYTES
    if kind not in ("delta", "snapshot") or len(op) != 5:
        raise ValueError(f"unknown storage op {op!r:.80}")
    _, agent, behavior, seq, data = op
    seq_min = 1 if kind == "delta" else 0   # snapshot 0: the state before any delta
    if type(seq) is not int or not seq_min <= seq <= SEQ_MAX:
        raise ValueError(f"{kind} seq must be an int in {seq_min}..{SEQ_MAX}, "
                         f"got {seq!r:.40}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{kind} data must be bytes, got {type(data).__name__}")
    return (_text_size(agent, "agent") + _text_size(behavior, "behavior") + len(data)
            + OP_OVERHEAD_BYTES)


def _text_size(value: object, what: str) -> int:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text: {value!r:.80}") from None


class _Submit:
    """Ops of one submit and who to tell once they are committed."""

    __slots__ = ("ops", "size", "on_durable")

    def __init__(self, ops: list[OpTuple], size: int, on_durable: OnDurable | None):
        self.ops = ops
        self.size = size
        self.on_durable = on_durable


class Storage:
    """The node's local store; see the module docstring.

    ``on_snapshot_wanted(agents)`` is called from the writer thread with agents whose
    stored state wants a fresh ``snapshot`` op (compaction, or repair after a failed
    transaction).  Submit from any thread; :meth:`load` from one thread at a time.
    """

    def __init__(self, path: str | os.PathLike, *, sync: str = "full",
                 deltas_max: int = DELTAS_MAX, compact_bytes_min: int = COMPACT_BYTES_MIN,
                 queue_ops_max: int = QUEUE_OPS_MAX, queue_bytes_max: int = QUEUE_BYTES_MAX,
                 on_snapshot_wanted: Callable[[list[str]], None] | None = None):
        if sync not in SYNC_POLICIES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_POLICIES)}, got {sync!r}")
        self.path = os.fspath(path)
        self.sync = sync
        self._deltas_max = deltas_max
        self._compact_bytes_min = compact_bytes_min
        self._queue_ops_max = queue_ops_max
        self._queue_bytes_max = queue_bytes_max
        self._on_snapshot_wanted = on_snapshot_wanted
        self._lock_fd = self._take_lock()
        try:
            self._conn = _open(self.path, sync)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._cond = threading.Condition()
        self._pending: list[_Submit] = []
        self._queued_ops = 0      # queued or committing, guarded by _cond
        self._queued_bytes = 0
        self._submitted = 0       # submits accepted ...
        self._finished = 0        # ... and answered (for flush)
        self._closing = False
        self._closed = False
        self._asked: set[str] = set()   # writer thread only
        self._counts = {"commits": 0, "ops": 0, "bytes": 0, "failed_commits": 0,
                        "snapshots_wanted": 0}   # guarded by _cond
        self._log = structlog.get_logger().bind(storage_path=self.path)
        self._thread = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self._thread.start()

    # --- caller side --------------------------------------------------------------------

    def submit(self, ops: Iterable[OpTuple], on_durable: OnDurable | None = None) -> bool:
        """Queue ``ops`` (see :func:`delta`, :func:`snapshot`, :func:`delete`) to be
        committed in one transaction with whatever else is waiting.

        False (nothing queued) when the queue is full: answer ``overloaded``.  A submit
        larger than the byte bound alone is accepted when nothing else is queued, so
        that it can be written at all.  ``on_durable(error)`` is called once, from the
        writer thread: ``None`` once committed, a :class:`StorageError` if not.
        """
        ops = list(ops)
        size = sum(_op_size(op) for op in ops)
        with self._cond:
            if self._closing:
                raise StorageError(self.path, "storage is closed")
            busy = self._queued_ops > 0
            if busy and (self._queued_ops + len(ops) > self._queue_ops_max
                         or self._queued_bytes + size > self._queue_bytes_max):
                return False
            self._pending.append(_Submit(ops, size, on_durable))
            self._queued_ops += len(ops)
            self._queued_bytes += size
            self._submitted += 1
            self._cond.notify_all()
        return True

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every submit accepted so far is answered; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._finished >= target, timeout_s)

    def stats(self) -> StorageStats:
        with self._cond:
            return StorageStats(**self._counts, queued_ops=self._queued_ops,
                                queued_bytes=self._queued_bytes)

    def load(self) -> Iterator[Recovered]:
        """Every stored agent in agent order, one at a time (a file of a million agents
        is never in memory at once), from one consistent read of the file.

        It reads on its own connection, so the writer may run meanwhile; call it at
        start, before serving, or from a thread: it does blocking reads.
        """
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(self.path, f"cannot open for reading: {exc}") from exc
        try:
            conn.execute("BEGIN")   # one snapshot of the file for the whole read
            yield from _merge_join(
                conn.execute("SELECT agent, behavior, snapshot, seq FROM state "
                             "ORDER BY agent"),
                conn.execute("SELECT agent, seq, delta FROM deltas ORDER BY agent, seq"))
        except sqlite3.Error as exc:
            raise StorageError(self.path, f"reading failed: {exc}") from exc
        finally:
            conn.close()

    def close(self) -> None:
        """Commit what is queued, stop the writer, checkpoint the WAL into the file (a
        faster next start) and release the file.  Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._closed = True
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise StorageError(self.path, f"checkpoint at close failed: {exc}") from exc
        finally:
            self._conn.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _take_lock(self) -> int:
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(self.path, f"cannot create {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(self.path, "in use by another storage (another node, or "
                               "this one not closed): each node needs its own file") from None
        return fd

    # --- writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            error, wanted = self._commit(batch)
            ops, size = sum(len(s.ops) for s in batch), sum(s.size for s in batch)
            with self._cond:
                self._queued_ops -= ops
                self._queued_bytes -= size
                counts = self._counts
                if error is None:
                    counts["commits"] += 1
                    counts["ops"] += ops
                    counts["bytes"] += size
                else:
                    counts["failed_commits"] += 1
                counts["snapshots_wanted"] += len(wanted)
            self._answer(batch, error, wanted)

    def _commit(self, batch: list[_Submit]) -> tuple[StorageError | None, list[str]]:
        """One transaction for the whole batch; the agents wanting a snapshot."""
        wanted: list[str] = []
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for submit in batch:
                for op in submit.ops:
                    self._apply(conn, op, wanted)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            agents = sorted({op[1] for submit in batch for op in submit.ops})
            return StorageError(self.path, f"write failed: {exc}", tuple(agents)), agents
        return None, wanted

    def _apply(self, conn: sqlite3.Connection, op: OpTuple, wanted: list[str]) -> None:
        kind, agent = op[0], op[1]
        if kind == "delta":
            if _put_delta(conn, *op[1:], self._deltas_max, self._compact_bytes_min):
                self._ask(agent, wanted)
        elif kind == "snapshot":
            _put_snapshot(conn, *op[1:])
            self._asked.discard(agent)
        else:
            conn.execute("DELETE FROM deltas WHERE agent = ?", (agent,))
            conn.execute("DELETE FROM state WHERE agent = ?", (agent,))
            self._asked.discard(agent)

    def _ask(self, agent: str, wanted: list[str]) -> None:
        """Ask for an agent's snapshot once until it comes (the memory of who was asked
        is bounded: past ASKED_MAX it is reset, and agents are asked again)."""
        if agent in self._asked:
            return
        if len(self._asked) >= ASKED_MAX:
            self._asked.clear()
        self._asked.add(agent)
        wanted.append(agent)

    def _answer(self, batch: list[_Submit], error: StorageError | None,
                wanted: list[str]) -> None:
        """Tell the waiting callers; a callback that raises is logged, never fatal."""
        if wanted and self._on_snapshot_wanted is not None:
            self._call(self._on_snapshot_wanted, wanted)
        for submit in batch:
            if submit.on_durable is not None:
                self._call(submit.on_durable, error)
        with self._cond:
            self._finished += len(batch)
            self._cond.notify_all()

    def _call(self, callback: Callable, arg: object) -> None:
        try:
            callback(arg)
        except Exception:
            self._log.exception("storage_callback_failed", callback=repr(callback))


# --- SQL ---------------------------------------------------------------------------------

def _open(path: str, sync: str) -> sqlite3.Connection:
    """Open or create the file and check it is ours, at our schema version."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StorageError(path, f"cannot open: {exc}") from exc
    try:
        _check_or_create(conn, path)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StorageError(path, f"cannot use WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={SYNC_POLICIES[sync]}")
        conn.execute("PRAGMA busy_timeout=5000")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StorageError(path, f"not a Synthesis storage file ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _check_or_create(conn: sqlite3.Connection, path: str) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]  # reads the header
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == 0 and version == 0:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StorageError(path, "not a Synthesis storage file (an SQLite database "
                               "of another program)")
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}"   # all or nothing
                           f"PRAGMA application_id={APPLICATION_ID};"
                           f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
    elif app_id != APPLICATION_ID:
        raise StorageError(path, f"not a Synthesis storage file (application_id "
                           f"{app_id:#x})")
    elif version != SCHEMA_VERSION:
        raise StorageError(path, f"schema version {version}; this node reads version "
                           f"{SCHEMA_VERSION}")


def _put_delta(conn: sqlite3.Connection, agent: str, behavior: str, seq: int, data: bytes,
               deltas_max: int, compact_bytes_min: int) -> bool:
    """Store one delta; True when the agent now wants a snapshot.  A delta the snapshot
    covers, or one already stored under its seq, is ignored (resubmits are harmless)."""
    row = conn.execute("SELECT seq, length(snapshot), deltas, delta_bytes FROM state "
                       "WHERE agent = ?", (agent,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO state VALUES (?, ?, NULL, 0, 0, 0)", (agent, behavior))
        row = (0, None, 0, 0)
    snap_seq, snap_bytes, count, delta_bytes = row
    if seq <= snap_seq:
        return False
    cur = conn.execute("INSERT OR IGNORE INTO deltas VALUES (?, ?, ?)", (agent, seq, data))
    if cur.rowcount != 1:
        return False
    count, delta_bytes = count + 1, delta_bytes + len(data)
    conn.execute("UPDATE state SET behavior = ?, deltas = ?, delta_bytes = ? "
                 "WHERE agent = ?", (behavior, count, delta_bytes, agent))
    return count > deltas_max or delta_bytes > max(snap_bytes or 0, compact_bytes_min)


def _put_snapshot(conn: sqlite3.Connection, agent: str, behavior: str, seq: int,
                  data: bytes) -> None:
    """Store the agent's state at ``seq``, dropping the deltas it covers; a snapshot
    older than the stored one is ignored."""
    row = conn.execute("SELECT seq FROM state WHERE agent = ?", (agent,)).fetchone()
    if row is not None and row[0] > seq:
        return
    conn.execute("DELETE FROM deltas WHERE agent = ? AND seq <= ?", (agent, seq))
    count, delta_bytes = conn.execute(
        "SELECT count(*), coalesce(sum(length(delta)), 0) FROM deltas WHERE agent = ?",
        (agent,)).fetchone()
    conn.execute("INSERT INTO state VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent) DO UPDATE "
                 "SET behavior = excluded.behavior, snapshot = excluded.snapshot, "
                 "seq = excluded.seq, deltas = excluded.deltas, "
                 "delta_bytes = excluded.delta_bytes",
                 (agent, behavior, data, seq, count, delta_bytes))


def _merge_join(states: Iterator[tuple], deltas: Iterator[tuple]) -> Iterator[Recovered]:
    """Pair each state row with its deltas; both cursors are in agent order (SQLite's
    BINARY collation compares UTF-8 bytes, which orders like Python's str)."""
    pending = next(deltas, None)
    for agent, behavior, snap, snap_seq in states:
        while pending is not None and pending[0] < agent:  # no state row: not ours
            pending = next(deltas, None)
        items, seq = [], snap_seq
        while pending is not None and pending[0] == agent:
            if pending[1] > snap_seq:
                items.append(pending[2])
                seq = pending[1]
            pending = next(deltas, None)
        yield Recovered(agent, behavior, snap, items, seq)


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back after a failed statement; SQLite may already have rolled back."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
