"""Gossip broadcast: an epidemic, eventually consistent broadcast, as a pure machine.

A node publishes an application message (an opaque envelope, at most
``ENVELOPE_BYTES_MAX`` bytes) to a group; every live node gets it and hands it,
once, to its local members of that group (the ``GroupDeliver`` effect: the node
does that part).  It gets there although messages are lost and nodes are briefly
unreachable, in three layers:

- **Rounds (push).**  A node that gets a message it has not seen pushes it at once
  to ``fanout`` random peers, then to ``fanout`` more on each of the next rounds
  (every ``round_interval_s``) until it has sent ``copies()`` copies.  Peers known
  to hold it already (its origin, whoever pushed it to us, whoever we pushed it
  to) are not picked again.  ``copies()`` is ``ceil(ln N + COPIES_SLACK)`` for N
  nodes (``rounds``, when given, fixes it at ``fanout * rounds``; at most
  ``ROUNDS_MAX`` rounds either way).  When every node sends c copies to random
  peers, a given node is missed by all of them with probability about ``e**-c``:
  with ``c = ln N + 2`` about one broadcast in seven misses one node at all, so
  messages per node per broadcast grow like log N, and what the pushes still miss
  (more under loss) is left to the next layer.
- **Dedup.**  Every message has a globally unique id ``(origin, seq)``: the
  publishing node's id and its own counter, which starts at ``seq_start`` (the
  node passes its membership generation, a wall-clock ns, so a restarted node never
  mints an id again).  An id seen within the window is counted as a duplicate and
  never delivered twice.
- **Anti-entropy (repair).**  Every ``anti_entropy_interval_s`` a node sends a
  random peer a digest of the ids it keeps (ranges of seqs per origin, at most
  ``DIGEST_RANGES_MAX``).  The peer pushes back what it keeps that the digest lacks
  and asks (``bc.want``, at most ``WANT_IDS_MAX`` ids) for what the digest has
  and it never saw; the asker pushes those.  A message that arrives by repair is
  delivered but not pushed on by rounds (its neighbours have it by then; a node
  coming back would otherwise start a burst).  Repair traffic is bounded per
  interval: at most ``repair_messages_per_interval`` answers and
  ``repair_bytes_per_interval`` envelope bytes sent per node (what is cut waits
  for the next exchange, counted in ``repair_skipped``), and one push at most one
  peer body (``PUSH_BYTES_MAX``).

The window, bounded three ways (all documented defaults of the constructor):

- *time*: a message's envelope is kept (pushed, offered in digests, served to
  repairs) until its age reaches ``keep_s`` (30 s); its id is remembered for
  ``window_s`` (90 s) after it arrived.  Age travels with the message (``a``, the
  sum of the times nodes held it before passing it on), so every node drops a
  message's envelope at about the same age, and a message arriving at an age of
  ``keep_s`` or more is refused.  Since ``window_s > keep_s``, an id is forgotten
  only once no node offers it any more: no message is delivered twice by one
  machine, as long as the transit delays along its way add up to less than
  ``window_s - keep_s`` (60 s).
- *count*: at most ``window_ids_max`` (32,768) ids remembered.  An id is never
  forgotten early to make room (that would let it in twice): a full window refuses
  new messages (``dropped_by_bounds``; anti-entropy brings them once room frees)
  and ``publish`` raises ``EpidemicFull``.
- *bytes*: at most ``keep_bytes_max`` (64 MiB) of envelopes kept; beyond it the
  oldest envelopes are dropped early (``dropped_by_bounds``; their ids stay, so
  dedup holds; they are no longer pushed or served).

What the window does not cover: a restarted node starts with an empty one (state
lost with the process), so it delivers again a message that reaches it after its
restart even if its previous incarnation delivered it before the crash.

Wire format: messages travel on the ``gossip`` channel beside membership's, as maps
``{"v": 2, "kind": K, ...}`` (``KINDS``: the node routes these kinds here):

- ``bc.push {m: [{o, s, g, a, e}, ...], r?}``: messages (``o`` origin node id,
  ``s`` seq, ``g`` group, ``a`` age in ms, ``e`` envelope, msgpack bin); ``r``:
  true when it answers a digest or a want (repair).
- ``bc.digest {d: [[origin, lo, hi], ...]}``: the ids the sender keeps.
- ``bc.want {w: [[origin, seq], ...]}``: ids the sender lacks.

Anything else (wrong types, out-of-range numbers, oversized lists) raises
``EpidemicError`` before any of the message is applied.

The machine contract (``protocols/machine.py``): ``start``, ``receive``, ``tick``,
``next_deadline``; plus ``set_peers`` (every membership change) and ``publish``.
Timers start at ``start(now)``, or at the first call that passes ``now``.
"""

from __future__ import annotations

import heapq
import math
import random
import reprlib
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from itertools import islice
from typing import Iterable

from .effects import GOSSIP, GroupDeliver, Send

VERSION = 2
PUSH, DIGEST, WANT = "bc.push", "bc.digest", "bc.want"
KINDS = frozenset((PUSH, DIGEST, WANT))
ENVELOPE_BYTES_MAX = 256 * 1024  # one application message
NAME_BYTES_MAX = 255             # node ids and group names, UTF-8
SEQ_MAX = 2**63 - 1              # seqs start at a wall-clock ns: room for centuries
AGE_MS_MAX = 2**31 - 1
MESSAGE_BYTES_MAX = 1 << 20      # one peer body (protocols/peer.py BODY_BYTES_MAX)
PUSH_BYTES_MAX = MESSAGE_BYTES_MAX - 8192  # what one push we send carries, items counted
ITEM_OVERHEAD = 48               # msgpack bytes of one item besides its names and envelope
PUSH_ITEMS_MAX = 1024            # items in one push
DIGEST_RANGES_MAX = 4096         # [origin, lo, hi] ranges in one digest
WANT_IDS_MAX = 256               # ids in one want
ROUNDS_MAX = 12                  # rounds of one message on one node, whatever N
COPIES_SLACK = 2.0               # copies per node beyond ln N (see the module doc)

STAT_KEYS = ("published", "delivered", "duplicates", "pushed", "repaired", "rounds",
             "dropped_by_bounds", "digests", "wants", "repair_pushes", "repair_skipped")


class EpidemicError(ValueError):
    """A broadcast message from a peer that breaks the protocol (a remote error)."""


class EpidemicFull(Exception):
    """``publish`` found the dedup window full (``window_ids_max`` ids younger than
    ``window_s``): the node refuses the publish as overloaded."""


class _Entry:
    """One message id within the window; ``envelope`` is None once no longer kept."""

    __slots__ = ("origin", "seq", "group", "envelope", "born", "arrived", "wire_size",
                 "copies_left", "known")

    def __init__(self, origin: str, seq: int, group: str, envelope: bytes, born: float,
                 arrived: float):
        self.origin, self.seq, self.group, self.envelope = origin, seq, group, envelope
        self.born, self.arrived = born, arrived  # born: now minus its age, on our clock
        self.wire_size = (len(envelope) + len(origin.encode()) + len(group.encode())
                          + ITEM_OVERHEAD)
        self.copies_left = 0  # pushes still to send by rounds
        self.known: set | None = None  # peers known to hold it, while pushed by rounds


class Epidemic:
    """Epidemic broadcast of envelopes to every node (see the module doc).

    ``rng`` is the machine's only randomness (peers picked, the anti-entropy phase);
    ``seq_start`` the first seq it mints (the node's generation).  Defaults: 3 peers
    a round, a round every 0.2 s, ``ceil(ln N + 2)`` copies per node, an exchange
    every 1 s, envelopes kept 30 s of age and at most 64 MiB, ids remembered 90 s
    after arrival and at most 32,768, repair answers at most 8 and 2 MiB a node
    per interval.

    ``stats`` (counters for metrics): ``published``; ``delivered`` (GroupDeliver
    effects, own publishes included); ``duplicates`` (copies of ids already seen);
    ``pushed`` (copies sent by rounds); ``repaired`` (delivered from a repair push);
    ``rounds`` (round ticks); ``dropped_by_bounds`` (refused for a full window or
    for age, envelopes dropped for bytes, publishes refused); ``digests``,
    ``wants``, ``repair_pushes`` (anti-entropy messages sent); ``repair_skipped``
    (messages a repair answer left out for its budget).
    """

    def __init__(self, node_id: str, *, rng: random.Random, seq_start: int, fanout: int = 3,
                 rounds: int | None = None, round_interval_s: float = 0.2,
                 anti_entropy_interval_s: float = 1.0, keep_s: float = 30.0,
                 window_s: float = 90.0, window_ids_max: int = 32_768,
                 keep_bytes_max: int = 64 << 20, repair_bytes_per_interval: int = 2 << 20,
                 repair_messages_per_interval: int = 8):
        _check_args(node_id, seq_start, fanout, rounds, round_interval_s,
                    anti_entropy_interval_s, keep_s, window_s, window_ids_max,
                    keep_bytes_max, repair_bytes_per_interval, repair_messages_per_interval)
        self.node_id = node_id
        self.fanout = fanout
        self.round_interval_s = round_interval_s
        self.anti_entropy_interval_s = anti_entropy_interval_s
        self.keep_s, self.window_s = keep_s, window_s
        self.window_ids_max, self.keep_bytes_max = window_ids_max, keep_bytes_max
        self.repair_bytes_per_interval = repair_bytes_per_interval
        self.repair_messages_per_interval = repair_messages_per_interval
        self._fixed_rounds = rounds
        self._rng = rng
        self._seq = seq_start
        self._peers: list[str] = []
        self._seen: OrderedDict[tuple, _Entry] = OrderedDict()  # by arrival
        self._seqs: dict[str, list[int]] = {}  # origin -> sorted seqs in _seen
        self._kept: OrderedDict[tuple, _Entry] = OrderedDict()  # envelope held, by arrival
        self._kept_bytes = 0
        self._expiry: list[tuple] = []  # (born + keep_s, origin, seq), lazily cleaned
        self._hot: dict[tuple, _Entry] = {}  # still pushed by rounds
        self._next_round: float | None = None
        self._next_sync: float | None = None
        self._repair_messages = 0  # answers left this interval
        self._repair_bytes = 0
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    # --- the contract -------------------------------------------------------------

    def start(self, now: float) -> list:
        self._advance(now)
        return []

    def set_peers(self, peers: Iterable[str]) -> None:
        """The live members other than this node (every membership change)."""
        me = self.node_id
        self._peers = sorted({p for p in peers if p != me})

    def next_deadline(self) -> float | None:
        if self._next_sync is None:
            return None
        deadline = self._next_sync
        if self._next_round is not None:
            deadline = min(deadline, self._next_round)
        if self._expiry:
            deadline = min(deadline, self._expiry[0][0])
        if self._seen:
            deadline = min(deadline, next(iter(self._seen.values())).arrived + self.window_s)
        return deadline

    def tick(self, now: float) -> list:
        self._advance(now)
        out: list = []
        if self._next_round is not None and now >= self._next_round:
            self._round(now, out)
        if now >= self._next_sync:
            self._new_interval(now + self.anti_entropy_interval_s)
            if self._peers:
                peer = self._peers[self._rng.randrange(len(self._peers))]
                out.append(Send(peer, GOSSIP, {"v": VERSION, "kind": DIGEST,
                                               "d": self._digest()}))
                self.stats["digests"] += 1
        return out

    def publish(self, group: str, envelope: bytes, now: float) -> list:
        """Broadcast ``envelope`` to ``group`` on every node: deliver it here now and
        push it.  ValueError for a bad group or envelope; ``EpidemicFull`` when the
        window holds ``window_ids_max`` ids."""
        _check_name(group, "group", ValueError)
        if type(envelope) is not bytes or len(envelope) > ENVELOPE_BYTES_MAX:
            raise ValueError(f"an envelope is bytes of at most {ENVELOPE_BYTES_MAX}")
        self._advance(now)
        if len(self._seen) >= self.window_ids_max:
            self.stats["dropped_by_bounds"] += 1
            raise EpidemicFull(f"{len(self._seen)} broadcasts in the last {self.window_s} s")
        entry = _Entry(self.node_id, self._seq, group, envelope, now, now)
        self._seq += 1
        self._remember(entry)
        self.stats["published"] += 1
        self.stats["delivered"] += 1
        out: list = [GroupDeliver(group, envelope)]
        self._spread(entry, {self.node_id}, now, out)
        return out

    def receive(self, sender: str, message: object, now: float) -> list:
        kind = _check(message)
        if type(sender) is not str or not sender:
            raise EpidemicError("the sender must be a node id")
        if kind == PUSH:
            items, repair = self._push_items(message), _repair_flag(message)
            self._advance(now)
            out: list = []
            for item in items:
                self._accept(sender, item, repair, now, out)
            return out
        if kind == DIGEST:
            ranges = _ranges(message)
            self._advance(now)
            return self._on_digest(sender, ranges, now)
        ids = _want_ids(message)
        self._advance(now)
        return self._on_want(sender, ids, now)

    # --- what the node may read -----------------------------------------------------

    @property
    def held(self) -> int:
        """Ids in the dedup window."""
        return len(self._seen)

    @property
    def kept_bytes(self) -> int:
        """Envelope bytes kept for pushes and repair."""
        return self._kept_bytes

    def copies(self) -> int:
        """Copies of one message this node pushes, at today's cluster size."""
        if self._fixed_rounds is not None:
            return self.fanout * self._fixed_rounds
        copies = math.ceil(math.log(len(self._peers) + 1) + COPIES_SLACK)
        return min(copies, self.fanout * ROUNDS_MAX)

    # --- time -------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Start the timers on the first call, and forget what is due."""
        if self._next_sync is None:  # a random phase: nodes do not exchange in step
            self._new_interval(now + self._rng.random() * self.anti_entropy_interval_s)
        expiry, kept = self._expiry, self._kept
        while expiry and expiry[0][0] <= now:
            _, origin, seq = heapq.heappop(expiry)
            entry = kept.pop((origin, seq), None)
            if entry is not None:
                self._drop_envelope(entry)
        seen, window_s = self._seen, self.window_s
        while seen:
            entry = next(iter(seen.values()))
            if entry.arrived + window_s > now:
                break
            seen.popitem(last=False)
            self._forget_seq(entry)

    def _new_interval(self, next_sync: float) -> None:
        """An anti-entropy interval begins: a fresh repair budget."""
        self._next_sync = next_sync
        self._repair_messages = self.repair_messages_per_interval
        self._repair_bytes = self.repair_bytes_per_interval

    def _forget_seq(self, entry: _Entry) -> None:
        seqs = self._seqs[entry.origin]
        del seqs[bisect_left(seqs, entry.seq)]
        if not seqs:
            del self._seqs[entry.origin]
        # Its envelope went first: born + keep_s <= arrived + keep_s < arrived + window_s.

    # --- the window ---------------------------------------------------------------------

    def _remember(self, entry: _Entry) -> None:
        key = (entry.origin, entry.seq)
        self._seen[key] = entry
        seqs = self._seqs.setdefault(entry.origin, [])
        if not seqs or seqs[-1] < entry.seq:
            seqs.append(entry.seq)
        else:
            seqs.insert(bisect_left(seqs, entry.seq), entry.seq)
        size = len(entry.envelope)
        while self._kept and self._kept_bytes + size > self.keep_bytes_max:
            _, oldest = self._kept.popitem(last=False)
            self._drop_envelope(oldest)
            self.stats["dropped_by_bounds"] += 1
        self._kept[key] = entry
        self._kept_bytes += size
        heapq.heappush(self._expiry, (entry.born + self.keep_s, entry.origin, entry.seq))

    def _drop_envelope(self, entry: _Entry) -> None:
        self._kept_bytes -= len(entry.envelope)
        entry.envelope = None
        entry.known = None
        self._hot.pop((entry.origin, entry.seq), None)

    def _accept(self, sender: str, item: tuple, repair: bool, now: float, out: list) -> None:
        origin, seq, group, age_ms, envelope = item
        entry = self._seen.get((origin, seq))
        if entry is not None:
            self.stats["duplicates"] += 1
            if entry.known is not None:
                entry.known.add(sender)
            return
        age_s = age_ms / 1000
        if age_s >= self.keep_s or len(self._seen) >= self.window_ids_max:
            self.stats["dropped_by_bounds"] += 1
            return
        entry = _Entry(origin, seq, group, envelope, now - age_s, now)
        self._remember(entry)
        self.stats["delivered"] += 1
        out.append(GroupDeliver(group, envelope))
        if repair:
            self.stats["repaired"] += 1
        else:
            self._spread(entry, {origin, sender, self.node_id}, now, out)

    # --- rounds -------------------------------------------------------------------------

    def _spread(self, entry: _Entry, known: set, now: float, out: list) -> None:
        """The first push of a new message, now; the rest on the next rounds."""
        entry.known = known
        copies = self.copies()
        targets = self._targets(known, min(self.fanout, copies))
        if targets:
            message = self._push_message([self._item(entry, now)], repair=False)
            out += [Send(peer, GOSSIP, message) for peer in targets]
            known.update(targets)
            self.stats["pushed"] += len(targets)
        entry.copies_left = copies - len(targets)
        if entry.copies_left > 0 and targets:
            self._hot[(entry.origin, entry.seq)] = entry
            if self._next_round is None:
                self._next_round = now + self.round_interval_s
        else:
            entry.known = None

    def _round(self, now: float, out: list) -> None:
        batches: dict[str, list] = {}
        for key, entry in list(self._hot.items()):
            targets = self._targets(entry.known, min(self.fanout, entry.copies_left))
            item = self._item(entry, now)
            for peer in targets:
                batches.setdefault(peer, []).append((item, entry.wire_size))
            entry.known.update(targets)
            self.stats["pushed"] += len(targets)
            entry.copies_left -= len(targets)
            if entry.copies_left <= 0 or not targets:
                del self._hot[key]
                entry.known = None
        for peer, items in batches.items():
            out += [Send(peer, GOSSIP, m) for m in self._batches(items, repair=False)]
        self.stats["rounds"] += 1
        self._next_round = now + self.round_interval_s if self._hot else None

    def _targets(self, known: set, want: int) -> list[str]:
        """Up to ``want`` random peers not in ``known``."""
        peers, rng = self._peers, self._rng
        chosen: list[str] = []
        if len(known) * 2 < len(peers):  # mostly unknown: draw and retry
            for _ in range(4 * want):
                peer = peers[rng.randrange(len(peers))]
                if peer not in known and peer not in chosen:
                    chosen.append(peer)
                    if len(chosen) == want:
                        return chosen
        rest = [p for p in peers if p not in known and p not in chosen]
        return chosen + rng.sample(rest, min(want - len(chosen), len(rest)))

    # --- anti-entropy ---------------------------------------------------------------------

    def _digest(self) -> list:
        """[origin, lo, hi] ranges of the seqs we keep, newest origins first."""
        by_origin: dict[str, list[int]] = {}
        for origin, seq in reversed(self._kept):
            by_origin.setdefault(origin, []).append(seq)
        ranges: list = []
        for origin, seqs in by_origin.items():
            seqs.sort()
            lo = hi = seqs[0]
            for seq in islice(seqs, 1, None):
                if seq != hi + 1:
                    ranges.append([origin, lo, hi])
                    lo = seq
                hi = seq
            ranges.append([origin, lo, hi])
            if len(ranges) >= DIGEST_RANGES_MAX:
                return ranges[:DIGEST_RANGES_MAX]
        return ranges

    def _on_digest(self, sender: str, ranges: list, now: float) -> list:
        covered = _coverage(ranges)
        lacking = [entry for (origin, seq), entry in self._kept.items()
                   if not _covers(covered.get(origin), seq)]
        out = self._repair(sender, lacking, now)
        wants: list = []
        for origin, lo, hi in ranges:
            for seq in self._unseen(origin, lo, hi, WANT_IDS_MAX - len(wants)):
                wants.append([origin, seq])
            if len(wants) >= WANT_IDS_MAX:
                break
        if wants and self._spend(0):
            out.append(Send(sender, GOSSIP, {"v": VERSION, "kind": WANT, "w": wants}))
            self.stats["wants"] += 1
        return out

    def _on_want(self, sender: str, ids: list, now: float) -> list:
        kept = self._kept
        return self._repair(sender, [kept[key] for key in dict.fromkeys(ids) if key in kept],
                            now)

    def _repair(self, peer: str, entries: list, now: float) -> list:
        """One push of ``entries`` (oldest first) as far as this interval's budget
        and one body allow; the rest waits for the next exchange."""
        if not entries:
            return []
        room = min(PUSH_BYTES_MAX, self._repair_bytes)
        items, used = [], 0
        for entry in islice(entries, PUSH_ITEMS_MAX):
            if used + entry.wire_size > room:
                break
            items.append(self._item(entry, now))
            used += entry.wire_size
        self.stats["repair_skipped"] += len(entries) - len(items)
        if not items or not self._spend(used):
            self.stats["repair_skipped"] += len(items)
            return []
        self.stats["repair_pushes"] += 1
        return [Send(peer, GOSSIP, self._push_message(items, repair=True))]

    def _spend(self, nbytes: int) -> bool:
        """Take one answer and ``nbytes`` from this interval's repair budget."""
        if self._repair_messages <= 0 or nbytes > self._repair_bytes:
            return False
        self._repair_messages -= 1
        self._repair_bytes -= nbytes
        return True

    def _unseen(self, origin: str, lo: int, hi: int, limit: int) -> list[int]:
        """Up to ``limit`` seqs in ``[lo, hi]`` of ``origin`` not in the window."""
        seqs = self._seqs.get(origin, ())
        first, last = bisect_left(seqs, lo), bisect_right(seqs, hi)
        if last - first == hi - lo + 1 or limit <= 0:
            return []
        missing: list[int] = []
        seq = lo
        for known in islice(seqs, first, last):
            while seq < known and len(missing) < limit:
                missing.append(seq)
                seq += 1
            if len(missing) >= limit:
                return missing
            seq = known + 1
        while seq <= hi and len(missing) < limit:
            missing.append(seq)
            seq += 1
        return missing

    # --- messages ------------------------------------------------------------------------

    def _item(self, entry: _Entry, now: float) -> dict:
        age_ms = min(AGE_MS_MAX, max(0, round((now - entry.born) * 1000)))
        return {"o": entry.origin, "s": entry.seq, "g": entry.group, "a": age_ms,
                "e": entry.envelope}

    @staticmethod
    def _push_message(items: list, repair: bool) -> dict:
        message = {"v": VERSION, "kind": PUSH, "m": items}
        if repair:
            message["r"] = True
        return message

    def _batches(self, sized: list, repair: bool) -> list[dict]:
        """(item, size) pairs cut into pushes that each fit one body."""
        messages, items, used = [], [], 0
        for item, size in sized:
            if items and (used + size > PUSH_BYTES_MAX or len(items) >= PUSH_ITEMS_MAX):
                messages.append(self._push_message(items, repair))
                items, used = [], 0
            items.append(item)
            used += size
        if items:
            messages.append(self._push_message(items, repair))
        return messages

    def _push_items(self, message: dict) -> list[tuple]:
        raw = message.get("m")
        if type(raw) is not list or not 0 < len(raw) <= PUSH_ITEMS_MAX:
            raise EpidemicError(f"'m' must be a list of 1..{PUSH_ITEMS_MAX} messages")
        items = [_item_of(item) for item in raw]
        if sum(len(item[4]) for item in items) > MESSAGE_BYTES_MAX:
            raise EpidemicError(f"a push carries at most {MESSAGE_BYTES_MAX} envelope bytes")
        for origin, seq, *_ in items:
            if origin == self.node_id and seq >= self._seq:
                raise EpidemicError(f"message id ({origin}, {seq}) not minted here yet")
        return items


# --- validation (module level: no state) ---------------------------------------------------

def _check_args(node_id, seq_start, fanout, rounds, round_interval_s, anti_entropy_interval_s,
                keep_s, window_s, window_ids_max, keep_bytes_max, repair_bytes,
                repair_messages) -> None:
    _check_name(node_id, "node_id", ValueError)
    if type(seq_start) is not int or not 0 <= seq_start <= SEQ_MAX:
        raise ValueError(f"seq_start must be an int in 0..{SEQ_MAX}")
    if type(fanout) is not int or fanout < 1:
        raise ValueError("fanout must be a positive int")
    if rounds is not None and (type(rounds) is not int or not 1 <= rounds <= ROUNDS_MAX):
        raise ValueError(f"rounds must be None (from the cluster size) or 1..{ROUNDS_MAX}")
    if not (round_interval_s > 0 and anti_entropy_interval_s > 0 and keep_s > 0):
        raise ValueError("intervals and keep_s must be positive")
    if not window_s > keep_s:
        raise ValueError("window_s must exceed keep_s, or an id could be forgotten "
                         "while a peer still offers it (and be delivered twice)")
    if window_ids_max < 1 or keep_bytes_max < ENVELOPE_BYTES_MAX:
        raise ValueError(f"window_ids_max >= 1 and keep_bytes_max >= {ENVELOPE_BYTES_MAX}")
    if repair_bytes < PUSH_BYTES_MAX or repair_messages < 2:
        raise ValueError(f"repair_bytes_per_interval >= {PUSH_BYTES_MAX} and "
                         f"repair_messages_per_interval >= 2 (an answer and a want)")


def _check(message: object) -> str:
    if type(message) is not dict:
        raise EpidemicError("a broadcast message must be a map")
    version = message.get("v")
    if type(version) is not int or version < VERSION:
        raise EpidemicError(f"broadcast messages need an integer 'v' >= {VERSION}, "
                            f"got {reprlib.repr(version)}")
    kind = message.get("kind")
    if type(kind) is not str or kind not in KINDS:
        raise EpidemicError(f"unknown broadcast message kind {reprlib.repr(kind)}")
    return kind


def _check_name(name: object, what: str, error: type = EpidemicError) -> str:
    try:
        size = len(name.encode()) if type(name) is str else 0
    except UnicodeEncodeError:
        size = 0
    if not 0 < size <= NAME_BYTES_MAX:
        raise error(f"{what} must be 1..{NAME_BYTES_MAX} bytes of UTF-8, "
                    f"got {reprlib.repr(name)}")
    return name


def _check_seq(seq: object, what: str) -> int:
    if type(seq) is not int or not 0 <= seq <= SEQ_MAX:
        raise EpidemicError(f"{what} must be an int in 0..{SEQ_MAX}, got {reprlib.repr(seq)}")
    return seq


def _item_of(raw: object) -> tuple:
    """(origin, seq, group, age_ms, envelope) of one pushed message, validated."""
    if type(raw) is not dict:
        raise EpidemicError("a pushed message must be a map")
    age, envelope = raw.get("a"), raw.get("e")
    if type(age) is not int or not 0 <= age <= AGE_MS_MAX:
        raise EpidemicError(f"'a' must be an age in ms, 0..{AGE_MS_MAX}")
    if type(envelope) is not bytes or len(envelope) > ENVELOPE_BYTES_MAX:
        raise EpidemicError(f"'e' must be bytes (bin) of at most {ENVELOPE_BYTES_MAX}")
    return (_check_name(raw.get("o"), "'o'"), _check_seq(raw.get("s"), "'s'"),
            _check_name(raw.get("g"), "'g'"), age, envelope)


def _repair_flag(message: dict) -> bool:
    flag = message.get("r", False)
    if type(flag) is not bool:
        raise EpidemicError("'r' must be a boolean")
    return flag


def _ranges(message: dict) -> list[tuple]:
    raw = message.get("d")
    if type(raw) is not list or len(raw) > DIGEST_RANGES_MAX:
        raise EpidemicError(f"'d' must be a list of at most {DIGEST_RANGES_MAX} ranges")
    ranges = []
    for item in raw:
        if type(item) not in (list, tuple) or len(item) != 3:
            raise EpidemicError("a digest range is [origin, lo, hi]")
        origin, lo, hi = (_check_name(item[0], "a range's origin"),
                          _check_seq(item[1], "a range's lo"), _check_seq(item[2], "a range's hi"))
        if lo > hi:
            raise EpidemicError(f"a digest range needs lo <= hi, got [{lo}, {hi}]")
        ranges.append((origin, lo, hi))
    return ranges


def _want_ids(message: dict) -> list[tuple]:
    raw = message.get("w")
    if type(raw) is not list or not 0 < len(raw) <= WANT_IDS_MAX:
        raise EpidemicError(f"'w' must be a list of 1..{WANT_IDS_MAX} ids")
    ids = []
    for item in raw:
        if type(item) not in (list, tuple) or len(item) != 2:
            raise EpidemicError("a wanted id is [origin, seq]")
        ids.append((_check_name(item[0], "a wanted origin"), _check_seq(item[1], "a wanted seq")))
    return ids


def _coverage(ranges: list[tuple]) -> dict[str, tuple[list, list]]:
    """origin -> (sorted los, running max of his): what a digest covers."""
    by_origin: dict[str, list] = {}
    for origin, lo, hi in ranges:
        by_origin.setdefault(origin, []).append((lo, hi))
    covered = {}
    for origin, pairs in by_origin.items():
        pairs.sort()
        los, reach, top = [], [], -1
        for lo, hi in pairs:
            top = max(top, hi)
            los.append(lo)
            reach.append(top)
        covered[origin] = (los, reach)
    return covered


def _covers(coverage: tuple[list, list] | None, seq: int) -> bool:
    if coverage is None:
        return False
    los, reach = coverage
    index = bisect_right(los, seq) - 1
    return index >= 0 and reach[index] >= seq
