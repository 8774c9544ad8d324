"""Agent state moving between hosts: snapshot/restore, AgentHost.take_out/install.

Two AgentHosts without sockets stand for the old and the new owner; the state
bytes go from one to the other as the handoff machine would carry them.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from node.agents import (BUSY, STATE_BYTES_MAX, Agent, AgentError, AgentHost, Lifecycle,
                         behavior, handler)
import node.behaviors  # noqa: F401  # registers counter and kv
from protocols.crdt import LWWMap, decode_fields, encode_fields
from protocols.wire import ErrorCode, Request
from tests.test_agents_unit import make_host

pytestmark = pytest.mark.timeout(30)


class _Log:
    """Records warnings (other levels are dropped)."""

    def __init__(self):
        self.warnings: list[tuple[str, dict]] = []

    def warning(self, event, **fields):
        self.warnings.append((event, fields))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def call(host, agent_id, mtype, data=None, rid="1"):
    """Run one sync handler turn and return its reply data (or the error code)."""
    replies, errors = host._replies, host._errors
    before = len(replies), len(errors)
    host.deliver(agent_id, host.resolve(agent_id),
                 Request(rid, mtype, agent_id, "call", data, None, {}), ("to",))
    if len(errors) > before[1]:
        return errors[-1][1]
    assert len(replies) == before[0] + 1
    return replies[-1][1]


def host_pair():
    hosts = []
    for _ in range(2):
        log = _Log()
        host, replies, errors = make_host(log=log)
        host._replies, host._errors, host.log = replies, errors, log
        hosts.append(host)
    return hosts


def move(old, new, agent_id):
    taken = old.take_out(agent_id)
    assert taken is not None and taken is not BUSY
    behavior_name, state, groups = taken
    return new.install(agent_id, behavior_name, state, groups), taken


def test_counter_moves_with_its_value_and_groups():
    old, new = host_pair()
    assert call(old, "counter/a", "incr", {"n": 41}) == {"value": 41}
    old.join("counter/a", "tally")
    old.join("counter/a", "all")
    act, (name, state, groups) = move(old, new, "counter/a")
    slots, fields = msgpack.unpackb(state)
    assert (name, groups, slots) == ("counter", ["all", "tally"], {})
    assert decode_fields(fields)["count"].value() == 41  # the replicated PN-Counter
    assert "counter/a" not in old.directory and old.groups == {}
    assert act.lifecycle is Lifecycle.ACTIVE and new.groups == {"all": {"counter/a"},
                                                                 "tally": {"counter/a"}}
    assert call(new, "counter/a", "incr") == {"value": 42}


def test_kv_moves_with_its_items_and_recomputes_nbytes():
    old, new = host_pair()
    for n in range(5):
        call(old, "kv/a", "put", {"key": f"k{n}", "value": {"n": [n, b"x" * n]}})
    nbytes = old.directory["kv/a"].agent.nbytes
    act, _ = move(old, new, "kv/a")
    assert act.agent.nbytes == nbytes > 0
    assert call(new, "kv/a", "get", {"key": "k3"}) == {"found": True, "value": {"n": [3, b"xxx"]}}
    assert call(new, "kv/a", "keys") == {"keys": [f"k{n}" for n in range(5)]}


def test_kv_restore_takes_no_byte_count_on_trust():
    _, new = host_pair()
    items = LWWMap().bind(1, lambda: 5)
    items.set("k", "v")
    lying = msgpack.packb([{"nbytes": -(1 << 40)}, encode_fields({"items": items})])
    act = new.install("kv/a", "kv", lying, [])
    assert act.agent.nbytes == len(msgpack.packb("k")) * 2
    assert call(new, "kv/a", "get", {"key": "k"}) == {"found": True, "value": "v"}


def test_a_moved_state_that_breaks_the_format_is_refused_and_leaves_nothing():
    _, new = host_pair()
    for bad in ({"items": [1]}, [1], [{}, {"items": ["lwwm", "junk"]}],
                [{}, {"items": ["no-such-type", []]}]):
        with pytest.raises(AgentError) as info:
            new.install("kv/b", "kv", msgpack.packb(bad), [])
        assert info.value.code == ErrorCode.INTERNAL
        assert "kv/b" not in new.directory  # not left half-restored


def test_an_empty_kv_agent_moves_as_small_as_it_was():
    old, new = host_pair()
    old.resolve("kv/a")
    act, (_, state, _) = move(old, new, "kv/a")
    assert len(state) < 16 and act.agent.nbytes == 0
    assert "items" not in act.agent._fields  # still nothing allocated


def test_a_busy_agent_is_not_taken_out():
    @behavior("unit-handoff-slow")
    class Slow(Agent):
        __slots__ = ("n",)

        def on_start(self, init):
            self.n = 0

        @handler("slow")
        async def slow(self, data):
            await asyncio.sleep(0.01)
            self.n += 1
            return self.n

    async def main():
        old, _ = host_pair()
        act = old.resolve("unit-handoff-slow/a")
        old.deliver("unit-handoff-slow/a", act,
                    Request("1", "slow", "unit-handoff-slow/a", "call", None, None, {}), ("to",))
        assert old.take_out("unit-handoff-slow/a") is BUSY is AgentHost.BUSY
        assert old.directory["unit-handoff-slow/a"] is act and act.lifecycle is Lifecycle.ACTIVE
        while act.task is not None:
            await asyncio.sleep(0.002)
        assert old._replies == [("1", 1)]
        name, state, _ = old.take_out("unit-handoff-slow/a")
        assert msgpack.unpackb(state) == {"n": 1}
    asyncio.run(main())


def test_absent_agent_is_none():
    old, _ = host_pair()
    assert old.take_out("counter/nobody") is None


@behavior("unit-handoff-opaque")
class Opaque(Agent):
    __slots__ = ("handle", "count")

    def on_start(self, init):
        self.handle = object()  # not data: cannot move
        self.count = 3


@behavior("unit-handoff-plain")
class Plain(Agent):
    """No __slots__: its state lives in the instance __dict__."""

    def on_start(self, init):
        self.notes = ["a"]


def test_unserialisable_state_moves_as_none_with_a_warning_and_no_on_stop():
    old, new = host_pair()
    old.resolve("unit-handoff-opaque/a")
    name, state, groups = old.take_out("unit-handoff-opaque/a")
    assert (name, state, groups) == ("unit-handoff-opaque", None, [])
    assert "unit-handoff-opaque/a" not in old.directory
    ((event, fields),) = old.log.warnings
    assert event == "agent_state_not_moved" and fields["agent_id"] == "unit-handoff-opaque/a"
    assert "object" in fields["error"]
    act = new.install("unit-handoff-opaque/a", name, state, groups)
    assert act.agent.count == 3  # activated the usual way


def test_a_state_over_what_a_handoff_carries_is_not_moved():
    old, _ = host_pair()
    act = old.resolve("unit-handoff-plain/a")
    act.agent.notes = [bytes(STATE_BYTES_MAX)]
    assert old.take_out("unit-handoff-plain/a")[1] is None
    assert "over" in old.log.warnings[0][1]["error"]


def test_dict_state_round_trips_and_restore_refuses_foreign_names():
    old, new = host_pair()
    old.resolve("unit-handoff-plain/a").agent.notes.append("b")
    act, _ = move(old, new, "unit-handoff-plain/a")
    assert act.agent.notes == ["a", "b"]
    for name in ("id", "_host", "on_start", "join"):
        with pytest.raises(AgentError):
            new.install("unit-handoff-plain/b", "unit-handoff-plain",
                        msgpack.packb({name: 1}), [])
    with pytest.raises(AgentError):  # a slotted agent takes its own slots only
        new.install("counter/b", "counter", msgpack.packb({"value": 1, "other": 2}), [])


def test_install_of_an_active_agent_keeps_it_and_unknown_behaviors_are_refused():
    _, new = host_pair()
    call(new, "counter/a", "incr", {"n": 5})
    existing = new.directory["counter/a"]
    assert new.install("counter/a", "counter", msgpack.packb({"value": 99}), ["g"]) is existing
    assert existing.agent.count.value() == 5 and new.groups == {}
    with pytest.raises(AgentError) as info:
        new.install("nothing/a", "nothing", None, [])
    assert info.value.code == ErrorCode.UNKNOWN_AGENT


def test_snapshot_walks_every_subclass_slot_and_skips_unset_ones():
    class Base(Agent):
        __slots__ = ("a", "__secret")

    class Child(Base):
        __slots__ = "b"

    agent = Child()
    agent.id = "x/y"
    agent.a = 1
    agent._Base__secret = 2
    assert agent.snapshot() == {"a": 1, "_Base__secret": 2}
    other = Child()
    other.restore({"a": 1, "_Base__secret": 2, "b": [3]})
    assert (other.a, other._Base__secret, other.b) == (1, 2, [3])
    assert not hasattr(other, "id")
