"""Fault injection between nodes, for tests only: a Transport wrapper that drops, cuts,
delays, duplicates or corrupts PEER traffic to and from named peers.

Enabled only by the ``faults_file`` setting (``node/config.py``); never in production.
The runtime wraps its transport when the setting is there::

    if config.faults_file:
        transport = faults.wrap(transport, config.faults_file, log, metrics)

The file (JSON, re-read when it changes, checked every ``RELOAD_CHECK_S``)::

    {"seed": 1,
     "rules": [{"peers": ["n4", "n5"], "direction": "both", "cut": true},
               {"peers": ["*"], "drop": 0.05, "duplicate": 0.01, "corrupt": 0.01,
                "delay_ms": [5, 20]}]}

A peer message going to (``out``) or coming from (``in``) a node matches the first
rule naming that node (or ``"*"``) for that direction; no match, no fault.  Within a
rule: ``cut`` loses everything; otherwise the message is lost with probability
``drop``, else corrupted with probability ``corrupt`` (random bytes of one random
frame flipped: the receiver's decoders must refuse it), else passed on, twice with
probability ``duplicate``, each copy after a delay drawn from ``delay_ms`` (order
between delayed messages is not kept).  The draws come from a ``random.Random``
seeded with the file's ``seed`` each time the file is loaded, so a run repeats as
far as timing allows.

Client requests and replies and multicast never pass through the faults: only what
``send`` takes and what arrives through ``Inbound.peer``.  A missing or empty file
means no faults; a file that does not parse is logged and the previous rules stay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import tempfile
from typing import Any, Callable, Mapping, Sequence

from .base import Inbound, OnGiveUp, Transport

RELOAD_CHECK_S = 0.1        # how often the file's identity (inode, size, mtime) is checked
CORRUPT_BYTES_MAX = 3       # bytes flipped in the chosen frame: 1..this
DIRECTIONS = ("out", "in", "both")
KINDS = ("cut", "drop", "corrupt", "duplicate", "delay")
ANY_PEER = "*"
SENDER_FRAME = 2            # peer frames: [MAGIC, op, sender, ...] (protocols/peer.py)
WARNING = "fault injection enabled (testing only)"

_RULE_KEYS = frozenset(("peers", "direction", "cut", "drop", "duplicate", "corrupt",
                        "delay_ms"))
_FILE_KEYS = frozenset(("seed", "rules"))


class FaultsError(ValueError):
    """A faults file that does not follow the format (the message says where)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of a faults file; see the module docstring for the meaning."""

    peers: frozenset[str]
    direction: str = "both"
    cut: bool = False
    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    delay_ms: tuple[float, float] | None = None

    def matches(self, peer: str, direction: str) -> bool:
        return ((self.direction == "both" or self.direction == direction)
                and (peer in self.peers or ANY_PEER in self.peers))


@dataclasses.dataclass(frozen=True)
class Faults:
    """A parsed faults file: the seed and the rules in order (first match wins)."""

    seed: int = 0
    rules: tuple[Rule, ...] = ()

    def rule_for(self, peer: str, direction: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(peer, direction):
                return rule
        return None


NO_FAULTS = Faults()


# --- the file format ---------------------------------------------------------------------

def parse(text: str) -> Faults:
    """A faults file's text -> Faults; blank text means no faults.  FaultsError if invalid.

    Unknown keys are refused, so a misspelt fault ("dorp") cannot silently do nothing.
    """
    if not text.strip():
        return NO_FAULTS
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise FaultsError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - _FILE_KEYS:
        raise FaultsError(f"the file is a map with the keys {sorted(_FILE_KEYS)}")
    seed = doc.get("seed", 0)
    if type(seed) is not int:
        raise FaultsError("'seed' must be an integer")
    rules = doc.get("rules", [])
    if not isinstance(rules, list):
        raise FaultsError("'rules' must be a list")
    return Faults(seed, tuple(_parse_rule(i, item) for i, item in enumerate(rules)))


def _parse_rule(index: int, item: Any) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(item, dict):
        raise FaultsError(f"{where} must be a map")
    unknown = set(item) - _RULE_KEYS
    if unknown:
        raise FaultsError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_RULE_KEYS)}")
    peers = item.get("peers")
    if (not isinstance(peers, list) or not peers
            or not all(isinstance(p, str) and p for p in peers)):
        raise FaultsError(f"{where}.peers must be a non-empty list of node ids (or '*')")
    direction = item.get("direction", "both")
    if direction not in DIRECTIONS:
        raise FaultsError(f"{where}.direction must be one of {DIRECTIONS}")
    cut = item.get("cut", False)
    if type(cut) is not bool:
        raise FaultsError(f"{where}.cut must be true or false")
    return Rule(frozenset(peers), direction, cut,
                *(_probability(item, key, where) for key in ("drop", "duplicate", "corrupt")),
                _delay(item.get("delay_ms"), where))


def _probability(item: dict, key: str, where: str) -> float:
    value = item.get(key, 0.0)
    if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
        raise FaultsError(f"{where}.{key} must be a probability in [0, 1]")
    return float(value)


def _delay(value: Any, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) in (int, float) for v in value)
            or not 0 <= value[0] <= value[1]):
        raise FaultsError(f"{where}.delay_ms must be [min, max] with 0 <= min <= max")
    return float(value[0]), float(value[1])


def write_faults(path: str | os.PathLike, rules: Sequence[Mapping[str, Any]],
                 seed: int = 1) -> None:
    """Write a faults file atomically (temp file + rename) for a node to pick up.

    The rename gives the file a new inode, so a node notices even a rewrite of the
    same size within the file system's mtime resolution.  Rules are checked first:
    a test never hands a node a file it would refuse.
    """
    text = json.dumps({"seed": seed, "rules": list(rules)})
    parse(text)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".faults-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


# --- the wrapper -------------------------------------------------------------------------

def corrupt_frames(frames: Sequence[bytes], rng: random.Random) -> list[bytes]:
    """A copy of ``frames`` with 1..CORRUPT_BYTES_MAX distinct random bytes of one
    random non-empty frame flipped (XOR with a non-zero byte, so each one really
    changes); the peer codec's checksum refuses it."""
    out = list(frames)
    candidates = [i for i, frame in enumerate(out) if frame]
    if not candidates:
        return out
    index = rng.choice(candidates)
    frame = bytearray(out[index])
    count = min(rng.randint(1, CORRUPT_BYTES_MAX), len(frame))
    for position in rng.sample(range(len(frame)), count):  # distinct: no flip undone
        frame[position] ^= rng.randint(1, 255)
    out[index] = bytes(frame)
    return out


def sender_of(frames: Sequence[bytes]) -> str:
    """The sender node id a peer frame list names, without decoding the rest."""
    if len(frames) <= SENDER_FRAME:
        return ""
    return bytes(frames[SENDER_FRAME]).decode("utf-8", "replace")


class FaultyTransport(Transport):
    """Any Transport, with the faults of a file applied to its peer traffic.

    Everything the interface declares is delegated to ``inner``; ``send`` and the
    ``Inbound.peer`` the inner transport calls pass through the faults first.
    """

    def __init__(self, inner: Transport, path: str | os.PathLike, log: Any,
                 metrics: Any = None):
        self.name = inner.name
        self._inner = inner
        self._path = os.fspath(path)
        self._log = log
        self._metrics = metrics
        self._faults = NO_FAULTS
        self._rng = random.Random(0)
        self._file_id: tuple | None = None  # (inode, size, mtime) of what was loaded
        self._counts = dict.fromkeys(KINDS, 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_timer: asyncio.TimerHandle | None = None
        self._delayed: set[asyncio.TimerHandle] = set()
        self._delayed_sends = 0
        self._stopped = False
        self.reload()

    # Lifecycle -------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, inbound: Inbound) -> None:
        self._log.warning("fault_injection_enabled", warning=WARNING, path=self._path)
        self._loop = loop
        self._inner.start(loop, _FaultyInbound(self, inbound))
        self._reload_timer = loop.call_later(RELOAD_CHECK_S, self._reload_tick)

    def stop(self, linger_ms: int = 0) -> None:
        self._stopped = True
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        for handle in self._delayed:  # messages still "on the wire" are lost
            handle.cancel()
        self._delayed.clear()
        self._delayed_sends = 0
        self._inner.stop(linger_ms)

    # The faults file -------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def reload(self) -> bool:
        """Load the file if it changed since the last load; True if the rules changed.

        A missing file means no faults; an invalid one is logged and ignored (the
        rules in force stay), until the file changes again.
        """
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            file_id = None
        else:
            file_id = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if file_id == self._file_id:
            return False
        self._file_id = file_id
        try:
            faults = parse(_read(self._path)) if file_id is not None else NO_FAULTS
        except (OSError, FaultsError) as exc:
            self._log.error("faults_file_invalid", path=self._path, error=str(exc))
            return False
        self._faults = faults
        self._rng = random.Random(faults.seed)
        self._log.warning("faults_loaded", path=self._path, rules=len(faults.rules),
                          seed=faults.seed)
        return True

    def _reload_tick(self) -> None:
        self._reload_timer = None
        if self._stopped:
            return
        try:
            self.reload()
        except Exception as exc:  # a timer callback must never die: re-armed below
            self._log.error("faults_reload_failed", path=self._path, error=repr(exc))
        self._reload_timer = self._loop.call_later(RELOAD_CHECK_S, self._reload_tick)

    # Counters --------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Faults applied so far, by kind (cut, drop, corrupt, duplicate, delay)."""
        return dict(self._counts)

    def _count(self, kind: str) -> None:
        self._counts[kind] += 1
        if self._metrics is not None:
            self._metrics.limited(f"fault_{kind}")

    # Applying the faults ---------------------------------------------------

    def _apply(self, peer: str, direction: str,
               frames: Sequence[bytes]) -> list[tuple[float, Sequence[bytes]]]:
        """What becomes of one message: the copies to deliver, each with its delay in
        seconds (none: lost).  Draws from the seeded random only for the faults the
        matching rule has, in a fixed order, so a run repeats for the same messages."""
        rule = self._faults.rule_for(peer, direction)
        if rule is None:
            return [(0.0, frames)]
        if rule.cut:
            self._count("cut")
            return []
        rng = self._rng
        if rule.drop and rng.random() < rule.drop:
            self._count("drop")
            return []
        if rule.corrupt and rng.random() < rule.corrupt:
            self._count("corrupt")
            frames = corrupt_frames(frames, rng)
        copies = 1
        if rule.duplicate and rng.random() < rule.duplicate:
            self._count("duplicate")
            copies = 2
        return [(self._delay_s(rule), frames) for _ in range(copies)]

    def _delay_s(self, rule: Rule) -> float:
        if rule.delay_ms is None:
            return 0.0
        self._count("delay")
        low, high = rule.delay_ms
        return self._rng.uniform(low, high) / 1000.0

    def _later(self, delay_s: float, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` after ``delay_s`` unless stopped first."""
        def fire() -> None:
            self._delayed.discard(handle)
            fn(*args)
        handle = self._loop.call_later(delay_s, fire)
        self._delayed.add(handle)

    # Peers (faulted) -------------------------------------------------------

    def send(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None = None,
             now: float = 0.0, **options: Any) -> bool:
        """Sends what the faults leave.  A lost message counts as sent (the network
        lost it, the sender cannot tell); only the first copy may call ``on_give_up``."""
        sent = True
        for n, (delay_s, copy) in enumerate(self._apply(peer, "out", frames)):
            give_up = on_give_up if n == 0 else None
            if delay_s > 0.0 and self._loop is not None:
                self._delayed_sends += 1
                self._later(delay_s, self._send_delayed, peer, copy, give_up, now + delay_s)
            elif n == 0:
                sent = self._inner.send(peer, copy, give_up, now, **options)
            else:
                self._inner.send(peer, copy, None, now)
        return sent

    def _send_delayed(self, peer: str, frames: Sequence[bytes], on_give_up: OnGiveUp | None,
                      now: float) -> None:
        self._delayed_sends -= 1
        self._inner.send(peer, frames, on_give_up, now)

    def _receive(self, inbound: Inbound, frames: list[bytes]) -> None:
        """Inbound peer frames from the inner transport, through the faults."""
        for delay_s, copy in self._apply(sender_of(frames), "in", frames):
            if delay_s > 0.0:
                self._later(delay_s, _deliver_peer, inbound, list(copy))
            else:
                inbound.peer(list(copy))

    # Everything else (delegated untouched) ---------------------------------

    def endpoints(self) -> dict[str, str]:
        return self._inner.endpoints()

    def set_peers(self, peers: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> None:
        self._inner.set_peers(peers, seeds)

    def drop_queued(self, peer: str) -> None:
        self._inner.drop_queued(peer)

    def reply(self, handle: Any, payload: bytes) -> bool:
        return self._inner.reply(handle, payload)

    def broadcast(self, topic: bytes, frames: Sequence[bytes]) -> None:
        self._inner.broadcast(topic, frames)

    def retry(self, now: float) -> None:
        self._inner.retry(now)

    @property
    def has_queued(self) -> bool:
        # Delayed sends count as queued, so the runtime keeps calling ``retry`` for
        # whatever the inner transport queues when they leave.
        return self._delayed_sends > 0 or self._inner.has_queued

    def health(self) -> dict:
        health = dict(self._inner.health())
        health["faults"] = self.counts()
        return health


def _deliver_peer(inbound: Inbound, frames: list[bytes]) -> None:
    """Deliver delayed inbound frames; a raise is reported as the transport would
    (outside the transport's read loop nothing else would catch it)."""
    try:
        inbound.peer(frames)
    except Exception as exc:  # a bug must not take the node down
        inbound.failed(None, None, exc)


class _FaultyInbound:
    """The Inbound the inner transport sees: peer frames pass through the faults,
    everything else goes straight to the node's Inbound."""

    __slots__ = ("_faulty", "_inbound")

    def __init__(self, faulty: FaultyTransport, inbound: Inbound):
        self._faulty = faulty
        self._inbound = inbound

    def peer(self, frames: list[bytes]) -> None:
        self._faulty._receive(self._inbound, frames)

    def client(self, handle: Any, payload: bytes, principal: bytes) -> None:
        self._inbound.client(handle, payload, principal)

    def multicast(self, group: str, payload: bytes) -> None:
        self._inbound.multicast(group, payload)

    def malformed(self, handle: Any, nframes: int) -> None:
        self._inbound.malformed(handle, nframes)

    def failed(self, handle: Any, payload: bytes | None, exc: Exception) -> None:
        self._inbound.failed(handle, payload, exc)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def wrap(transport: Transport, path: str | os.PathLike, log: Any,
         metrics: Any = None) -> FaultyTransport:
    """``transport`` with the faults of the file at ``path`` (testing only).

    Faults applied are counted in ``health()["faults"]`` and, when ``metrics`` is
    given, in ``synthesis_limited_total`` with reasons ``fault_<kind>``.
    """
    return FaultyTransport(transport, path, log, metrics)
