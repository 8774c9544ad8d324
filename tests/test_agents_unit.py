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


def test_agents_max_refuses_new_activations():
    host, _, _ = make_host(agents_max=2)
    host.resolve("unit-turns/a")
    host.resolve("unit-turns/b")
    with pytest.raises(Exception) as err:
        host.resolve("unit-turns/c")
    assert err.value.code == "overloaded"
    assert host.resolve("unit-turns/a") is not None  # existing ones still resolve


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
