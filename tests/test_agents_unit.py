"""AgentHost without sockets: turns, mailbox bounds, ordering, supervision, drain.

Replies go to lists instead of sockets, so these run in milliseconds and can
hammer the scheduling logic with many interleavings.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from node.agents import Agent, AgentHost, Lifecycle, Supervision, behavior, handler
from protocols.wire import Request

pytestmark = pytest.mark.timeout(30)


class _Metrics:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Log:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@behavior("unit-turns")
class Turns(Agent):
    """Records how many of its handlers run at once, and the order it saw."""

    __slots__ = ("running", "peak", "seen")

    def on_start(self, init):
        self.running = 0
        self.peak = 0
        self.seen = []

    @handler("work")
    async def work(self, data):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(data["sleep"])
        self.seen.append(data["n"])
        self.running -= 1
        return data["n"]

    @handler("quick")
    def quick(self, data):
        self.seen.append(data["n"])
        return data["n"]

    @handler("crash")
    def crash(self, data):
        raise RuntimeError("crash")


def make_host(**overrides):
    replies, errors = [], []
    options = dict(mailbox_len_max=1000, agents_max=1000, handler_timeout_s=5.0,
                   supervision=Supervision("restart", 2, 60.0, 0.01, 0.05),
                   executor_workers=2, metrics=_Metrics(), log=_Log(),
                   reply=lambda to, rid, data: replies.append((rid, data)),
                   fail=lambda to, rid, code, msg, mtype: errors.append((rid, code)))
    options.update(overrides)
    return AgentHost(**options), replies, errors


def req(rid, mtype, data=None):
    return Request(rid, mtype, "unit-turns/a", "call", data, None, {})


def test_turns_are_one_at_a_time_in_arrival_order_whatever_the_mix():
    async def main(seed):
        rng = random.Random(seed)
        host, replies, errors = make_host()
        act = host.resolve("unit-turns/a")
        for n in range(60):
            if rng.random() < 0.5:
                message = req(str(n), "work", {"n": n, "sleep": rng.choice([0, 0.001, 0.003])})
            else:
                message = req(str(n), "quick", {"n": n})
            host.deliver("unit-turns/a", act, message, ("to",))
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        while len(replies) < 60:
            await asyncio.sleep(0.001)
        assert act.agent.peak == 1, f"seed={seed}"
        assert act.agent.seen == list(range(60)), f"seed={seed}"
        assert [int(rid) for rid, _ in replies] == list(range(60)), f"seed={seed}"
        assert not errors and act.task is None and act.mailbox is None
    for seed in range(20):
        asyncio.run(main(seed))


def test_mailbox_bound_counts_waiting_messages_only():
    async def main():
        host, replies, errors = make_host(mailbox_len_max=2)
        act = host.resolve("unit-turns/a")
        for n in range(5):
            host.deliver("unit-turns/a", act, req(str(n), "work", {"n": n, "sleep": 0.01}), ("to",))
        assert errors == [("3", "overloaded"), ("4", "overloaded")]
        while len(replies) < 3:
            await asyncio.sleep(0.005)
        assert [rid for rid, _ in replies] == ["0", "1", "2"]
    asyncio.run(main())


def test_restart_limit_then_failed_then_respawn():
    async def main():
        host, replies, errors = make_host()
        act = host.resolve("unit-turns/a")
        for n in range(3):
            while act.lifecycle is not Lifecycle.ACTIVE:
                await asyncio.sleep(0.005)
            host.deliver("unit-turns/a", act, req(f"c{n}", "crash"), ("to",))
        assert act.lifecycle is Lifecycle.FAILED
        host.deliver("unit-turns/a", act, req("after", "quick", {"n": 1}), ("to",))
        assert errors[-1] == ("after", "unavailable")
        assert [code for _, code in errors[:3]] == ["internal"] * 3
        fresh = host.spawn("unit-turns/a", "unit-turns", None)
        host.deliver("unit-turns/a", fresh, req("again", "quick", {"n": 2}), ("to",))
        assert replies[-1] == ("again", 2)
    asyncio.run(main())


def test_messages_during_restart_backoff_wait_and_are_served():
    async def main():
        host, replies, errors = make_host()
        act = host.resolve("unit-turns/a")
        host.deliver("unit-turns/a", act, req("boom", "crash"), ("to",))
        assert act.lifecycle is Lifecycle.DEGRADED
        host.deliver("unit-turns/a", act, req("waiting", "quick", {"n": 7}), ("to",))
        assert replies == []
        while not replies:
            await asyncio.sleep(0.005)
        assert replies == [("waiting", 7)] and act.lifecycle is Lifecycle.ACTIVE
    asyncio.run(main())


def test_drain_answers_everything_queued_or_running():
    async def main():
        host, replies, errors = make_host()
        act = host.resolve("unit-turns/a")
        for n in range(5):
            host.deliver("unit-turns/a", act, req(str(n), "work", {"n": n, "sleep": 10}), ("to",))
        await asyncio.sleep(0.01)
        refused = await host.drain(0.05)
        assert refused == 5
        assert sorted(rid for rid, _ in errors) == ["0", "1", "2", "3", "4"]
        assert {code for _, code in errors} == {"unavailable"}
    asyncio.run(main())


def test_agents_max_holds_while_new_activations_make_room():
    host, _, _ = make_host(agents_max=2)
    host.resolve("unit-turns/a")
    host.resolve("unit-turns/b")
    host.resolve("unit-turns/c")  # an idle agent was passivated to make room
    assert len(host.directory) == 2 and "unit-turns/c" in host.directory


def test_stop_in_the_same_loop_pass_as_delivery_still_answers():
    async def main():
        host, replies, errors = make_host()
        act = host.resolve("unit-turns/a")
        host.deliver("unit-turns/a", act, req("first", "work", {"n": 0, "sleep": 1}), ("to",))
        host.deliver("unit-turns/a", act, req("second", "work", {"n": 1, "sleep": 1}), ("to",))
        assert host.stop("unit-turns/a")  # before the turn task ever ran
        await asyncio.sleep(0.01)
        assert sorted(errors) == [("first", "unavailable"), ("second", "unavailable")]
        assert replies == []
    asyncio.run(main())


def test_drain_before_the_first_turn_ran_still_answers():
    async def main():
        host, replies, errors = make_host()
        act = host.resolve("unit-turns/a")
        host.deliver("unit-turns/a", act, req("first", "work", {"n": 0, "sleep": 1}), ("to",))
        await host.drain(0)
        assert errors == [("first", "unavailable")]
    asyncio.run(main())


def test_at_agents_max_the_least_recently_used_idle_agent_makes_room():
    host, _, _ = make_host(agents_max=3)
    for name in ("a", "b", "c"):
        host.resolve(f"unit-turns/{name}")
    # b and c were used again: a, idle longest since, goes first; then the clock
    # gives b and c a second chance in order of their last look.
    host.deliver("unit-turns/b", host.directory["unit-turns/b"], req("1", "quick", {"n": 1}), None)
    host.resolve("unit-turns/d")
    assert set(host.directory) == {"unit-turns/b", "unit-turns/c", "unit-turns/d"}
    host.resolve("unit-turns/e")
    assert "unit-turns/b" in host.directory or "unit-turns/c" in host.directory
    assert len(host.directory) == 3


def test_a_busy_agent_is_never_evicted():
    async def main():
        host, replies, _ = make_host(agents_max=1)
        act = host.resolve("unit-turns/a")
        host.deliver("unit-turns/a", act, req("1", "work", {"n": 1, "sleep": 0.01}), ("to",))
        with pytest.raises(Exception) as err:  # the only agent is busy: refuse, not evict
            host.resolve("unit-turns/b")
        assert getattr(err.value, "code", None) == "overloaded"
        while not replies:
            await asyncio.sleep(0.001)
        host.resolve("unit-turns/b")  # idle now: it makes room
        assert set(host.directory) == {"unit-turns/b"}
    asyncio.run(main())


def test_the_idle_sweep_passivates_agents_unused_for_a_whole_sweep():
    host, _, _ = make_host()
    for name in ("a", "b"):
        host.resolve(f"unit-turns/{name}")
    host.start_sweep()
    assert host.sweep_idle(100) == 0          # first look: used since activation, spared
    host.deliver("unit-turns/b", host.directory["unit-turns/b"], req("1", "quick", {"n": 1}), None)
    host.start_sweep()
    assert host.sweep_idle(100) == 1          # a was idle a whole sweep; b was used
    assert set(host.directory) == {"unit-turns/b"}


def test_node_wide_mailbox_bounds_count_messages_and_bytes():
    async def main():
        host, _, errors = make_host(mailbox_total_max=3, mailbox_bytes_max=1 << 20)
        act = host.resolve("unit-turns/a")
        for n in range(6):  # the first runs, three wait, the rest are refused
            host.deliver("unit-turns/a", act, req(str(n), "work", {"n": n, "sleep": 0.01}), ("to",))
        assert [code for _, code in errors] == ["overloaded", "overloaded"]
        assert host.mailbox_depth() == 3
        big = req("big", "work", {"n": 9, "sleep": 0})
        big.nbytes = 2 << 20
        errors.clear()
        host2, _, errors2 = make_host(mailbox_bytes_max=1 << 20)
        act2 = host2.resolve("unit-turns/a")
        host2.deliver("unit-turns/a", act2, req("x", "work", {"n": 0, "sleep": 0.01}), ("to",))
        host2.deliver("unit-turns/a", act2, big, ("to",))
        assert errors2 == [("big", "overloaded")] and host2.mailbox_bytes() == 0
        await host.drain(1.0)
        await host2.drain(1.0)
        assert host.mailbox_depth() == 0 and host.mailbox_bytes() == 0
    asyncio.run(main())
