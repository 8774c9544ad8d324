"""Agents: the base class, behaviors, handlers, lifecycle, mailboxes, supervision.

An *agent* is an addressable entity (``BEHAVIOR/NAME``) whose class is a
*behavior*.  The node holds one ``Activation`` per live agent: the agent object
(user state) plus the bookkeeping the node needs (lifecycle, mailbox,
restarts).  Idle activations are small: no task, no queue and no dict of their
own; a mailbox exists only while messages wait (see DESIGN.md, "an idle agent
costs at most about 1 KB").

Turn-based: an agent handles one message at a time.  A plain ``def`` handler
runs inline when the agent is idle (no task, no queue); an ``async def``
handler, or any message that arrives while the agent is busy, goes through the
bounded mailbox drained by one task per busy agent.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib
import inspect
import time
from collections import deque
from typing import Any, Callable

import msgpack

from protocols.crdt import decode_fields, encode_fields, merge_fields
from protocols.peer import HANDOFF_BODY_BYTES_MAX
from protocols.wire import ErrorCode, trace_id

__all__ = [
    "Agent", "AgentError", "Lifecycle", "behavior", "handler", "behaviors",
    "load_behavior_modules", "BehaviorError", "replicated",
]



class AgentError(Exception):
    """Raised by a handler to answer with a chosen error code.

    An AgentError is an answer, not a crash: the agent is not restarted.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BehaviorError(Exception):
    """A behavior definition or registration that cannot work."""


class Lifecycle(str, enum.Enum):
    INITIALIZING = "initializing"
    ACTIVE = "active"
    MIGRATING = "migrating"    # reserved: agent migration arrives with rebalancing
    DEGRADED = "degraded"      # crashed, waiting out its restart backoff
    PAUSED = "paused"          # reserved: admin pause arrives with the operations issue
    TERMINATING = "terminating"
    FAILED = "failed"          # restart limit reached; answers 'unavailable' until respawned


_HANDLER_ATTR = "_synthesis_handles"
GROUPS_PER_AGENT_MAX = 64
GROUPS_MAX = 100_000       # distinct groups with members on one node
BLOCKING_QUEUE_PER_WORKER = 16
CANCELLED_TURNS_WAIT_S = 1.0  # how long shutdown waits for cancelled turns to answer
_ANY = "*"


def handler(*types: str) -> Callable:
    """Mark a method as the handler for message ``types``.

    The method is ``def name(self, data)`` or ``def name(self, data, message)``
    (``message`` is the validated ``protocols.wire.Request``), plain or async.
    ``@handler("*")`` handles every type without a handler of its own.
    """
    if not types or not all(isinstance(t, str) and t for t in types):
        raise BehaviorError("@handler needs one or more message type names")
    if any(t.startswith("syn.") for t in types):
        raise BehaviorError("message types starting with 'syn.' are reserved")

    def mark(fn: Callable) -> Callable:
        setattr(fn, _HANDLER_ATTR, types)
        return fn
    return mark


class _Handler:
    """One handler, with what the hot path needs to call it decided up front."""

    __slots__ = ("fn", "is_async", "wants_message")

    def __init__(self, fn: Callable):
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) not in (2, 3):
            raise BehaviorError(f"handler {fn.__qualname__} must take (self, data) "
                                f"or (self, data, message)")
        self.wants_message = len(positional) == 3


class replicated:
    """Declare replicated state on a behavior: ``count = replicated(PNCounter)``.

    The attribute is a CRDT (``protocols.crdt``) created on first use; mutate it
    through its methods (``self.count.increment(3)``).  Each turn's changes reach
    the agent's replicas as deltas, and the agent comes back with them on another
    node when its owner dies (docs/STATE.md).  Plain ``__slots__`` attributes are
    not replicated: they move only when an owner hands an agent off alive.
    """

    __slots__ = ("cls", "name")

    def __init__(self, cls: type) -> None:
        from protocols.crdt import Crdt
        if not (isinstance(cls, type) and issubclass(cls, Crdt) and cls.TAG):
            raise BehaviorError(f"replicated() takes a CRDT type, got {cls!r}")
        self.cls = cls
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        if name.startswith("_"):
            raise BehaviorError(f"replicated field {name!r}: names starting with _ "
                                "are the node's")
        self.name = name

    def __get__(self, agent: Any, owner: type | None = None) -> Any:
        if agent is None:
            return self
        fields = agent._fields
        value = fields.get(self.name)
        if value is None:
            value = fields[self.name] = self.cls().bind(agent._host.replica, agent._host.clock)
        elif type(value) is not self.cls:
            raise AgentError(ErrorCode.INTERNAL,
                             f"replicated field {self.name!r} holds a {type(value).__name__}, "
                             f"the behavior declares {self.cls.__name__}")
        return value

    def __set__(self, agent: Any, value: Any) -> None:
        raise AttributeError(f"replicated field {self.name!r} changes through its own "
                             "methods, never by assignment")


class Agent:
    """Base class for behaviors.

    Subclass it, decorate methods with ``@handler``, register with
    ``@behavior("name")``.  Optional hooks: ``on_start(init)`` runs at activation
    (and again after a supervised restart) with the spawn ``init`` data or None;
    ``on_stop()`` runs when the agent is stopped.  Declare ``__slots__`` to keep
    idle agents small.

    When the ring gives an agent a new owner its state moves there:
    ``snapshot()`` on the old node, ``restore(state)`` on the new one, after
    ``on_start(None)``.  The defaults carry every attribute the subclasses
    declare in ``__slots__`` (and the instance ``__dict__``, if it has one), so
    they suit state that is plain data msgpack can carry: None, bools, numbers,
    str, bytes, lists and maps (tuples arrive as lists).  Override both for
    anything else (objects, sets, handles), and override ``restore`` to check or
    recompute what must not be taken on trust from a peer.
    """

    __slots__ = ("id", "_host", "_fields")

    # Per-behavior overrides of the node's supervision config (None = node default).
    supervision: str | None = None       # "restart" | "stop" | "escalate"
    restart_limit: int | None = None

    _handlers: dict[str, _Handler] = {}
    _replicated: dict[str, type] = {}
    behavior_name: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[str, _Handler] = {}
        fields: dict[str, type] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                for mtype in getattr(value, _HANDLER_ATTR, ()):
                    table[mtype] = _Handler(value)
                if isinstance(value, replicated):
                    fields[name] = value.cls
        cls._handlers = table
        cls._replicated = fields

    def on_start(self, init: Any) -> None:
        """Called when the agent activates or restarts."""

    def on_stop(self) -> None:
        """Called when the agent is stopped."""

    def snapshot(self) -> Any:
        """The agent's state, as msgpack-serialisable data (see the class docstring).

        Default: ``{attribute: value}`` of every slot the subclasses declare that
        is set, plus the instance ``__dict__`` if there is one.
        """
        state = {name: getattr(self, name) for name in _state_slots(type(self))
                 if hasattr(self, name)}
        state.update(getattr(self, "__dict__", {}))
        return state

    def restore(self, state: Any) -> None:
        """Take back a ``snapshot()`` taken on another node (it came from a peer).

        Default: set the attributes of the map ``state``.  A name must be a slot a
        subclass declares, or (for an instance with a ``__dict__``) a name the class
        does not define; anything else raises ValueError.
        """
        if not isinstance(state, dict):
            raise ValueError(f"a state to restore is a map, got {type(state).__name__}")
        slots = _state_slots(type(self))
        has_dict = hasattr(self, "__dict__")
        for name in state:
            if not (name in slots or (has_dict and type(name) is str
                                      and not hasattr(type(self), name))):
                raise ValueError(f"{type(self).__name__} has no state attribute {name!r}")
        for name, value in state.items():
            setattr(self, name, value)

    # Services for handlers -------------------------------------------------

    def join(self, group: str) -> None:
        """Receive messages published to ``group`` (on any node)."""
        self._host.join(self.id, group)

    def leave(self, group: str) -> None:
        self._host.leave(self.id, group)

    async def run_blocking(self, fn: Callable, *args: Any) -> Any:
        """Run blocking work in the node's bounded executor (the bulkhead)."""
        return await self._host.run_blocking(fn, *args)


@functools.cache
def _state_slots(cls: type[Agent]) -> frozenset[str]:
    """The slots ``cls`` and its bases below ``Agent`` declare: an agent's state."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Agent or klass is object:
            continue
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"  # a private (mangled) slot
            names.add(name)
    return frozenset(names - {"__dict__", "__weakref__", "id", "_host"})


_BEHAVIORS: dict[str, type[Agent]] = {}


def behavior(name: str) -> Callable[[type[Agent]], type[Agent]]:
    """Class decorator: register an Agent subclass as behavior ``name``."""
    if not isinstance(name, str) or not name or "/" in name:
        raise BehaviorError(f"behavior name must be a non-empty string without '/': {name!r}")

    def register(cls: type[Agent]) -> type[Agent]:
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise BehaviorError(f"@behavior({name!r}) must decorate an Agent subclass")
        existing = _BEHAVIORS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise BehaviorError(f"behavior {name!r} is already registered by {existing!r}")
        cls.behavior_name = name
        _BEHAVIORS[name] = cls
        return cls
    return register


def behaviors() -> dict[str, type[Agent]]:
    """The registered behaviors by name (a copy)."""
    return dict(_BEHAVIORS)


def load_behavior_modules(modules: tuple[str, ...] | list[str]) -> None:
    """Import the configured behavior modules (their @behavior decorators register)."""
    importlib.import_module("node.behaviors")  # built-ins: echo, counter, kv
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise BehaviorError(f"cannot import behavior module {name!r}: {exc}") from exc


# --------------------------------------------------------------------------
# The node-side host of activations.


class _Busy:
    """The type of ``BUSY``: what ``AgentHost.take_out`` returns for a busy agent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BUSY"


BUSY = _Busy()
# An agent's snapshot as msgpack bytes, at most: what a HANDOFF body can carry
# with room left for the rest of the handoff message.
STATE_BYTES_MAX = HANDOFF_BODY_BYTES_MAX - (64 << 10)


class Activation:
    """The node's record of one live agent; kept small (slots, lazy mailbox)."""

    __slots__ = ("agent", "cls", "lifecycle", "mailbox", "task", "init", "restarts", "groups",
                 "used")

    def __init__(self, cls: type[Agent], init: Any):
        self.cls = cls
        self.agent: Agent | None = None
        self.lifecycle = Lifecycle.INITIALIZING
        self.mailbox: deque | None = None
        self.task: asyncio.Task | None = None  # the turn task while the agent is busy
        self.init = init
        self.restarts: list[float] | None = None   # recent crash times, bounded
        self.groups: set[str] | None = None
        self.used = True  # a message came since the last idle sweep looked (second chance)


class Supervision:
    """Restart policy numbers, from config with per-behavior overrides."""

    __slots__ = ("policy", "limit", "window_s", "backoff_s", "backoff_max_s")

    def __init__(self, policy: str, limit: int, window_s: float, backoff_s: float,
                 backoff_max_s: float):
        self.policy = policy
        self.limit = limit
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s


def _unpack_state(data: bytes) -> Any:
    """A snapshot from a peer, decoded with every container bounded by its size."""
    size = len(data)
    if size > STATE_BYTES_MAX:
        raise ValueError(f"state of {size} bytes, over {STATE_BYTES_MAX}")
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_str_len=size,
                           max_bin_len=size, max_array_len=size, max_map_len=size,
                           max_ext_len=size)


def _split_replicated(data: Any) -> tuple[Any, Any]:
    """A replicated agent's moved state: ``[snapshot of its slots, its fields]``."""
    if type(data) is not list or len(data) != 2:
        raise ValueError("a replicated agent's state is [slots, fields]")
    return data[0], data[1]


# reply(reply_to, request_id, data) and fail(reply_to, request_id, code, message, mtype)
ReplyFn = Callable[[Any, str, Any], None]
FailFn = Callable[[Any, str, str, str, str], None]


class AgentHost:
    """The agents that live on this node: activation, turns, supervision."""

    def __init__(self, *, mailbox_len_max: int, agents_max: int, handler_timeout_s: float,
                 supervision: Supervision, executor_workers: int, metrics: Any, log: Any,
                 reply: ReplyFn, fail: FailFn, mailbox_total_max: int = 100_000,
                 mailbox_bytes_max: int = 256 << 20, replica: int = 0,
                 clock: Callable[[], int] = time.time_ns,
                 state_for: Callable[[str, type], dict] | None = None,
                 turn_start: Callable[..., bool] | None = None,
                 turn_done: Callable[..., None] | None = None,
                 adopt: Callable[[str, type, Any], None] | None = None):
        self.directory: dict[str, Activation] = {}
        self._mailbox_total_max = mailbox_total_max
        self._mailbox_bytes_max = mailbox_bytes_max
        self._waiting = 0         # messages in all mailboxes
        self._waiting_bytes = 0   # their envelope bytes
        self.memory_tight = False  # set by the node while resident memory is over budget
        self._sweep: list[str] = []  # agent ids the idle sweep has still to look at
        self.groups: dict[str, set[str]] = {}
        self._mailbox_len_max = mailbox_len_max
        self._agents_max = agents_max
        self._handler_timeout_s = handler_timeout_s
        self._supervision = supervision
        self._metrics = metrics
        self._log = log
        self._reply = reply
        self._fail = fail
        # Replicated state (node/runtime.py wires these to protocols/replication.py):
        # the replica id and clock CRDT fields are stamped with, the record an
        # agent's fields live in, and the hooks around each turn (exactly-once
        # dedup before; deltas and the consistency wait after).
        self.replica = replica
        self.clock = clock
        # A host without a node (tests, tools) keeps replicated fields itself.
        self._kept: dict[str, dict] = {}
        self._state_for = state_for or (lambda agent_id, cls: self._kept.setdefault(agent_id, {}))
        self._turn_start = turn_start
        self._turn_done = turn_done or self._answer
        self._adopt = adopt or self._adopt_kept
        self._executor_workers = executor_workers
        self._executor = None
        self._blocking_waiting = 0
        self._tasks: set[asyncio.Task] = set()
        self._queued: set[Activation] = set()  # activations whose mailbox exists
        self.accepting = True

    # Activation ------------------------------------------------------------

    def resolve(self, agent_id: str) -> Activation | None:
        """The activation for ``agent_id``, activating ``BEHAVIOR/NAME`` virtually.

        Returns None when the id names no running agent and no known behavior.
        """
        act = self.directory.get(agent_id)
        if act is not None:
            return act
        name, sep, _ = agent_id.partition("/")
        cls = _BEHAVIORS.get(name) if sep else None
        if cls is None:
            return None
        return self.activate(agent_id, cls, None)

    def activate(self, agent_id: str, cls: type[Agent], init: Any) -> Activation:
        if self.memory_tight:
            raise AgentError(ErrorCode.OVERLOADED,
                             "node is over its memory budget: no new agents for now")
        if len(self.directory) >= self._agents_max and not self._evict_one():
            raise AgentError(ErrorCode.OVERLOADED,
                             f"node holds its limit of {self._agents_max} agents, all busy "
                             "or recently used")
        act = Activation(cls, init)
        self.directory[agent_id] = act
        try:
            self._start_instance(agent_id, act)
        except BaseException:
            del self.directory[agent_id]  # no half-started agent left behind
            raise
        self._metrics.agent_activated()
        return act

    def _start_instance(self, agent_id: str, act: Activation) -> None:
        agent = act.cls()
        agent.id = agent_id
        agent._host = self
        agent._fields = self._state_for(agent_id, act.cls) if act.cls._replicated else None
        act.agent = agent
        agent.on_start(act.init)
        act.lifecycle = Lifecycle.ACTIVE

    def spawn(self, agent_id: str, behavior_name: str, init: Any) -> Activation:
        cls = _BEHAVIORS.get(behavior_name)
        if cls is None:
            raise AgentError(ErrorCode.UNKNOWN_AGENT, f"no behavior named {behavior_name!r}")
        act = self.directory.get(agent_id)
        if act is not None and act.lifecycle is not Lifecycle.FAILED:
            if act.cls is cls:
                return act  # spawning a running agent is idempotent
            raise AgentError(ErrorCode.BAD_REQUEST,
                             f"agent {agent_id!r} already runs behavior {act.cls.behavior_name!r}")
        if act is not None:
            self._remove(agent_id, act)
        try:
            return self.activate(agent_id, cls, init)
        except AgentError:
            raise
        except Exception as exc:
            raise AgentError(ErrorCode.INTERNAL, f"on_start failed: {exc!r}") from exc

    # Handoff: an agent moving to its new owner (protocols/handoff.py) ------------

    BUSY = BUSY

    def take_out(self, agent_id: str) -> tuple[str, bytes | None, list[str]] | _Busy | None:
        """Take the idle agent ``agent_id`` off this node to move it elsewhere.

        Returns ``(behavior name, state, sorted groups)``, where ``state`` is the
        msgpack of ``snapshot()``, or None (and a warning) if the snapshot failed,
        could not be packed or is over STATE_BYTES_MAX.  The agent leaves the
        directory and its groups as a passivated one does, but ``on_stop`` does not
        run: it is not stopping, it is moving.  None if the agent is not here;
        ``BUSY`` (nothing changed) while a turn runs or messages wait, or while it
        is starting or waiting out a restart backoff.
        """
        act = self.directory.get(agent_id)
        if act is None:
            return None
        if (act.task is not None or act.mailbox
                or act.lifecycle not in (Lifecycle.ACTIVE, Lifecycle.FAILED)):
            return BUSY
        state = self._pack_snapshot(agent_id, act)
        groups = sorted(act.groups or ())
        act.lifecycle = Lifecycle.MIGRATING
        self._remove(agent_id, act)
        return act.cls.behavior_name, state, groups

    def merge_moved(self, agent_id: str, state: bytes | None) -> bool:
        """A moved state arrived for an agent already active here (two owners for a
        moment): join its replicated fields into the live ones (a CRDT join loses no
        write).  Plain slot state cannot be merged and is dropped.  True if merged."""
        act = self.directory.get(agent_id)
        if act is None or state is None or not act.cls._replicated:
            return False
        try:
            _, fields = _split_replicated(_unpack_state(state))
            self._adopt(agent_id, act.cls, fields)
        except Exception as exc:  # a peer's bytes: counted by the caller, never raised
            self._log.warning("moved_state_not_merged", agent_id=agent_id,
                              error=repr(exc)[:300])
            return False
        return True

    def _adopt_kept(self, agent_id: str, cls: type, fields: Any) -> None:
        if fields:
            merge_fields(self._kept.setdefault(agent_id, {}), decode_fields(fields))

    def _pack_snapshot(self, agent_id: str, act: Activation) -> bytes | None:
        try:
            snapshot = act.agent.snapshot()
            if act.cls._replicated:  # the fields travel with it: no stale read on arrival
                snapshot = [snapshot, encode_fields(act.agent._fields)]
            data = msgpack.packb(snapshot, use_bin_type=True)
            if len(data) > STATE_BYTES_MAX:
                raise ValueError(f"{len(data)} bytes, over {STATE_BYTES_MAX}")
        except Exception as exc:  # the agent's own code, or data msgpack cannot carry
            self._log.warning("agent_state_not_moved", agent_id=agent_id,
                              error=f"snapshot failed: {exc!r}"[:500])
            return None
        return data

    def install(self, agent_id: str, behavior_name: str, state: bytes | None,
                groups: list[str] | tuple[str, ...]) -> Activation:
        """Activate ``agent_id``, moved here, with its state and groups.

        Spawned as ``spawn`` does (``on_start(None)``), then ``restore`` with the
        decoded ``state`` (unless None), then joined to ``groups``.  An agent
        already active here is left as it is and returned (the caller counts it).
        AgentError: UNKNOWN_AGENT for an unknown behavior, OVERLOADED when no agent
        can start now, INTERNAL when on_start or restore failed (the agent is then
        not left here).
        """
        act = self.directory.get(agent_id)
        if act is not None:
            return act
        cls = _BEHAVIORS.get(behavior_name)
        data = None
        if state is not None:
            try:
                data = _unpack_state(state)
                if cls is not None and cls._replicated:
                    data, fields = _split_replicated(data)
                    self._adopt(agent_id, cls, fields)  # before the agent binds to its record
            except Exception as exc:
                raise AgentError(ErrorCode.INTERNAL, f"restore failed: {exc!r}"[:500]) from exc
        act = self.spawn(agent_id, behavior_name, None)
        if data is not None:
            try:
                act.agent.restore(data)
            except Exception as exc:
                self._stop_instance(agent_id, act)
                raise AgentError(ErrorCode.INTERNAL, f"restore failed: {exc!r}"[:500]) from exc
        for group in groups:
            try:
                self.join(agent_id, group)
            except AgentError as exc:  # a group limit on this node: the rest still join
                self._log.warning("agent_group_not_joined", agent_id=agent_id, group=group,
                                  error=exc.message)
        return act

    def stop(self, agent_id: str) -> bool:
        act = self.directory.get(agent_id)
        if act is None:
            return False
        act.lifecycle = Lifecycle.TERMINATING
        if act.mailbox:
            self._refuse_all(act, ErrorCode.UNAVAILABLE, "agent stopped")
        if act.task is not None:
            act.task.cancel()  # its caller is answered 'unavailable' by the task
        self._stop_instance(agent_id, act)
        return True

    def _stop_instance(self, agent_id: str, act: Activation) -> None:
        """Run on_stop (its failure is logged, never raised) and forget the agent."""
        try:
            if act.agent is not None:
                act.agent.on_stop()
        except Exception as exc:
            self._log.warning("on_stop_failed", agent_id=agent_id, error=repr(exc))
        self._remove(agent_id, act)

    # Passivation ---------------------------------------------------------------
    #
    # An agent is passivated (stopped, its in-memory state dropped, until the state
    # work gives state somewhere to live) when it was idle for a whole idle sweep,
    # or to make room at agents_max.  Both use the ``used`` bit as a clock
    # algorithm does: a message sets it, a look clears it, an agent found idle with
    # the bit clear goes.  O(1) per message, amortised O(1) per eviction.

    def _evict_one(self, looks_max: int = 256) -> bool:
        """Passivate the least recently used idle agent; False if none was found."""
        again: list[tuple[str, Activation]] = []
        victim = None
        for agent_id, act in self.directory.items():
            if len(again) >= looks_max:
                break
            if act.used or act.task is not None or act.mailbox:
                again.append((agent_id, act))
            else:
                victim = agent_id, act
                break
        if victim is None:  # every one looked at was used since: the oldest idle one goes
            victim = next(((a, act) for a, act in again
                           if act.task is None and not act.mailbox), None)
            again = [item for item in again if item is not victim]
        for agent_id, act in again:  # second chance: to the back of the line
            act.used = False
            del self.directory[agent_id]
            self.directory[agent_id] = act
        if victim is None:
            return False
        self.passivate(*victim, reason="pressure")
        return True

    def passivate(self, agent_id: str, act: Activation, reason: str) -> None:
        self._stop_instance(agent_id, act)
        self._metrics.limited(f"agent_passivated_{reason}")

    def sweep_idle(self, looks_max: int) -> int:
        """Look at up to ``looks_max`` agents of the current sweep; passivate those
        idle since the last sweep looked.  Returns how many were passivated.  A new
        sweep starts when the last one is through (call it every agent_idle_s)."""
        if not self._sweep:
            return 0
        batch, self._sweep = self._sweep[-looks_max:], self._sweep[:-looks_max]
        gone = 0
        for agent_id in batch:
            act = self.directory.get(agent_id)
            if act is None or act.task is not None or act.mailbox:
                continue
            if act.used:
                act.used = False
            else:
                self.passivate(agent_id, act, reason="idle")
                gone += 1
        return gone

    def start_sweep(self) -> None:
        self._sweep = list(self.directory)

    def _remove(self, agent_id: str, act: Activation) -> None:
        for group in act.groups or ():
            members = self.groups.get(group)
            if members is not None:
                members.discard(agent_id)
                if not members:
                    del self.groups[group]
        self.directory.pop(agent_id, None)
        self._queued.discard(act)

    # Groups ------------------------------------------------------------------

    def join(self, agent_id: str, group: str) -> bool:
        act = self.directory.get(agent_id)
        if act is None:
            return False
        if act.groups is None:
            act.groups = set()
        if group not in act.groups:
            if len(act.groups) >= GROUPS_PER_AGENT_MAX:
                raise AgentError(ErrorCode.OVERLOADED,
                                 f"{agent_id!r} is in its limit of {GROUPS_PER_AGENT_MAX} groups")
            if group not in self.groups and len(self.groups) >= GROUPS_MAX:
                raise AgentError(ErrorCode.OVERLOADED, f"node holds its limit of {GROUPS_MAX} groups")
        act.groups.add(group)
        self.groups.setdefault(group, set()).add(agent_id)
        return True

    def leave(self, agent_id: str, group: str) -> bool:
        act = self.directory.get(agent_id)
        if act is None or not act.groups or group not in act.groups:
            return False
        act.groups.discard(group)
        members = self.groups.get(group)
        if members is not None:
            members.discard(agent_id)
            if not members:
                del self.groups[group]
        return True

    # Delivery ----------------------------------------------------------------

    def deliver(self, agent_id: str, act: Activation, req: Any, reply_to: Any) -> None:
        """Hand one request to an agent: inline if idle and sync, else via its mailbox."""
        act.used = True
        if act.lifecycle is Lifecycle.FAILED:
            self._fail(reply_to, req.id, ErrorCode.UNAVAILABLE,
                       f"agent {agent_id!r} has failed (restart limit reached, or its "
                       f"supervision escalated)", req.type)
            return
        h = act.cls._handlers.get(req.type) or act.cls._handlers.get(_ANY)
        if h is None:
            self._fail(reply_to, req.id, ErrorCode.UNKNOWN_TYPE,
                       f"behavior {act.cls.behavior_name!r} has no handler for {req.type!r}",
                       req.type)
            return
        if act.task is None and act.lifecycle is Lifecycle.ACTIVE and not h.is_async:
            self._run_sync(agent_id, act, h, req, reply_to)
            return
        if not self.accepting:
            self._fail(reply_to, req.id, ErrorCode.UNAVAILABLE, "node is shutting down", req.type)
            return
        if act.mailbox is None:
            act.mailbox = deque()
            self._queued.add(act)
        elif len(act.mailbox) >= self._mailbox_len_max:
            self._fail(reply_to, req.id, ErrorCode.OVERLOADED,
                       f"mailbox of {agent_id!r} is full ({self._mailbox_len_max})", req.type)
            return
        if (self._waiting >= self._mailbox_total_max
                or self._waiting_bytes + req.nbytes > self._mailbox_bytes_max):
            if not act.mailbox:
                act.mailbox = None
                self._queued.discard(act)
            self._metrics.limited("node_mailboxes_full")
            self._fail(reply_to, req.id, ErrorCode.OVERLOADED,
                       f"the node's mailboxes are full ({self._waiting} messages, "
                       f"{self._waiting_bytes} bytes)", req.type)
            return
        self._waiting += 1
        self._waiting_bytes += req.nbytes
        act.mailbox.append((req, reply_to, time.perf_counter()))  # enqueued at: mailbox wait
        if act.task is None and act.lifecycle is Lifecycle.ACTIVE:
            self._start_turns(agent_id, act)

    def _take(self, act: Activation) -> tuple:
        """The next waiting message of ``act``, out of the node-wide counts."""
        item = act.mailbox.popleft()
        self._waiting -= 1
        self._waiting_bytes -= item[0].nbytes
        return item

    def _run_sync(self, agent_id: str, act: Activation, h: _Handler, req: Any,
                  reply_to: Any) -> None:
        if req.delivery is not None and self._turn_start is not None and \
                self._turn_start(agent_id, act, req, reply_to):
            return  # a duplicate, answered from the dedup window
        started = time.perf_counter()
        try:
            result = h.fn(act.agent, req.data, req) if h.wants_message else h.fn(act.agent, req.data)
        except AgentError as exc:
            self._turn_done(agent_id, act, req, reply_to, None, exc)
        except Exception as exc:
            self._crashed(agent_id, act, req, reply_to, exc)
        else:
            self._turn_done(agent_id, act, req, reply_to, result, None)
            self._metrics.handled(req.type)
        self._metrics.observe_handler(req.type, time.perf_counter() - started)

    def _answer(self, agent_id: str, act: Activation, req: Any, reply_to: Any, result: Any,
                error: AgentError | None) -> None:
        """A turn's outcome to its caller (no replicated state to wait for)."""
        if error is not None:
            self._fail(reply_to, req.id, error.code, error.message, req.type)
        else:
            self._reply(reply_to, req.id, result)

    def _start_turns(self, agent_id: str, act: Activation) -> None:
        """Start the agent's turn task with the first waiting message.

        The message is taken out of the mailbox now, so the mailbox bound counts
        only messages that wait, not the one being handled.
        """
        first = self._take(act)
        task = asyncio.get_running_loop().create_task(self._turns(agent_id, act, first))
        act.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(functools.partial(self._turns_done, act, first))

    def _turns_done(self, act: Activation, first: tuple, task: asyncio.Task) -> None:
        """A turn task cancelled before its first step never ran its own cleanup
        (stop or drain in the same loop pass): answer its first message here."""
        if act.task is not task:
            return  # _turns ran and cleaned up after itself
        act.task = None
        req, reply_to, _ = first
        self._fail(reply_to, req.id, ErrorCode.UNAVAILABLE,
                   "agent stopped or node shut down before the handler started", req.type)
        if not act.mailbox:
            act.mailbox = None
            self._queued.discard(act)

    async def _turns(self, agent_id: str, act: Activation, current: tuple) -> None:
        """Handle messages one at a time until the mailbox is empty."""
        try:
            while True:
                req, reply_to, queued_at = current
                self._metrics.observe_mailbox_wait(time.perf_counter() - queued_at)
                h = act.cls._handlers.get(req.type) or act.cls._handlers.get(_ANY)
                if h.is_async:
                    await self._run_async(agent_id, act, h, req, reply_to)
                else:
                    self._run_sync(agent_id, act, h, req, reply_to)
                if not act.mailbox or act.lifecycle is not Lifecycle.ACTIVE:
                    break
                current = self._take(act)
        except asyncio.CancelledError:  # agent stopped, or shutdown ran out of time
            req, reply_to, _ = current
            self._fail(reply_to, req.id, ErrorCode.UNAVAILABLE,
                       "agent stopped or node shut down before the handler finished", req.type)
            raise
        finally:
            act.task = None
            if not act.mailbox:
                act.mailbox = None
                self._queued.discard(act)

    async def _run_async(self, agent_id: str, act: Activation, h: _Handler, req: Any,
                         reply_to: Any) -> None:
        if req.delivery is not None and self._turn_start is not None and \
                self._turn_start(agent_id, act, req, reply_to):
            return
        started = time.perf_counter()
        deadline = asyncio.timeout(self._handler_timeout_s)
        try:
            async with deadline:
                coro = h.fn(act.agent, req.data, req) if h.wants_message else h.fn(act.agent, req.data)
                result = await coro
        except AgentError as exc:
            self._turn_done(agent_id, act, req, reply_to, None, exc)
        except TimeoutError as exc:
            if not deadline.expired():  # the handler's own TimeoutError is a crash
                self._crashed(agent_id, act, req, reply_to, exc)
            else:
                self._fail(reply_to, req.id, ErrorCode.TIMEOUT,
                           f"handler for {req.type!r} exceeded {self._handler_timeout_s}s",
                           req.type)
        except Exception as exc:
            self._crashed(agent_id, act, req, reply_to, exc)
        else:
            self._turn_done(agent_id, act, req, reply_to, result, None)
            self._metrics.handled(req.type)
        self._metrics.observe_handler(req.type, time.perf_counter() - started)

    # Supervision -------------------------------------------------------------

    def _supervision_for(self, act: Activation) -> Supervision:
        base = self._supervision
        policy = act.cls.supervision or base.policy
        limit = act.cls.restart_limit if act.cls.restart_limit is not None else base.limit
        if policy == base.policy and limit == base.limit:
            return base
        return Supervision(policy, limit, base.window_s, base.backoff_s, base.backoff_max_s)

    def _crashed(self, agent_id: str, act: Activation, req: Any, reply_to: Any,
                 exc: Exception) -> None:
        self._fail(reply_to, req.id, ErrorCode.INTERNAL,
                   f"handler for {req.type!r} raised {type(exc).__name__}: {exc}", req.type)
        self._log.error("handler_crashed", agent_id=agent_id, type=req.type, error=repr(exc),
                        trace_id=trace_id(req.raw.get("traceparent")))
        sup = self._supervision_for(act)
        if sup.policy == "stop":
            if self.directory.get(agent_id) is act:  # not a newer activation of the id
                self.stop(agent_id)
            return
        if sup.policy == "escalate":
            # No supervisor tree above an agent yet: escalation fails the agent
            # and logs at error level for the operator.
            self._log.error("agent_escalated", agent_id=agent_id)
            self._mark_failed(agent_id, act)
            return
        now = time.monotonic()
        recent = [t for t in (act.restarts or ()) if now - t < sup.window_s]
        recent.append(now)
        act.restarts = recent[-(sup.limit + 1):]
        if len(recent) > sup.limit:
            self._mark_failed(agent_id, act)
            return
        act.lifecycle = Lifecycle.DEGRADED
        backoff_s = min(sup.backoff_s * (2 ** (len(recent) - 1)), sup.backoff_max_s)
        asyncio.get_running_loop().call_later(backoff_s, self._restart, agent_id, act)

    def _mark_failed(self, agent_id: str, act: Activation) -> None:
        act.lifecycle = Lifecycle.FAILED
        self._metrics.agent_failed()
        self._log.error("agent_failed", agent_id=agent_id)
        if act.mailbox:
            self._refuse_all(act, ErrorCode.UNAVAILABLE, f"agent {agent_id!r} has failed")

    def _restart(self, agent_id: str, act: Activation) -> None:
        if self.directory.get(agent_id) is not act or act.lifecycle is not Lifecycle.DEGRADED:
            return  # stopped or respawned meanwhile
        try:
            self._start_instance(agent_id, act)
        except Exception as exc:
            self._log.error("restart_failed", agent_id=agent_id, error=repr(exc))
            self._mark_failed(agent_id, act)
            return
        self._metrics.agent_restarted()
        self._log.info("agent_restarted", agent_id=agent_id)
        if act.mailbox and act.task is None:
            self._start_turns(agent_id, act)

    def _refuse_all(self, act: Activation, code: str, message: str) -> None:
        while act.mailbox:
            req, reply_to, _ = self._take(act)
            self._fail(reply_to, req.id, code, message, req.type)
        act.mailbox = None
        self._queued.discard(act)

    # Executor (bulkhead) ------------------------------------------------------

    async def run_blocking(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn`` on the bounded executor.

        The bound counts work until its thread finishes, not until the awaiting
        handler gives up (a timed-out handler leaves its thread running).
        """
        if self._blocking_waiting >= self._executor_workers * BLOCKING_QUEUE_PER_WORKER:
            raise AgentError(ErrorCode.OVERLOADED, "blocking executor queue is full")
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor
            self._executor = ThreadPoolExecutor(self._executor_workers,
                                                thread_name_prefix="synthesis-blocking")
        self._blocking_waiting += 1
        work = self._executor.submit(fn, *args)
        loop = asyncio.get_running_loop()

        def finished(_: Any) -> None:  # runs on the worker thread
            try:
                loop.call_soon_threadsafe(self._blocking_done)
            except RuntimeError:  # the loop closed while the thread ran
                pass
        work.add_done_callback(finished)
        return await asyncio.wrap_future(work)

    def _blocking_done(self) -> None:
        self._blocking_waiting -= 1

    def blocking_running(self) -> int:
        return self._blocking_waiting

    # Shutdown and status -----------------------------------------------------

    def pending(self) -> int:
        """Messages waiting in mailboxes or being handled by a task."""
        return self.mailbox_depth() + len(self._tasks)

    async def drain(self, timeout_s: float) -> int:
        """Stop taking queued work, let mailboxes finish, refuse what is left.

        Returns how many queued messages were refused.
        """
        self.accepting = False
        if self._tasks:  # no new turn starts now: wait for these, on their own events
            await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout_s))
        refused = 0
        for act in list(self._queued):
            refused += len(act.mailbox or ())
            self._refuse_all(act, ErrorCode.UNAVAILABLE, "node is shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Let the cancelled turns answer their callers before the sockets close; a
        # handler that swallows its cancellation does not hold the shutdown.
        if tasks:
            await asyncio.wait(tasks, timeout=CANCELLED_TURNS_WAIT_S)
        refused += len(tasks)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        return refused

    def counts_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for act in self.directory.values():
            counts[act.lifecycle.value] = counts.get(act.lifecycle.value, 0) + 1
        return counts

    def mailbox_depth(self) -> int:
        return self._waiting

    def mailbox_bytes(self) -> int:
        return self._waiting_bytes
