"""Behaviors the process tests load into real nodes (``--behavior synthesis_test_behaviors``)."""

from __future__ import annotations

import asyncio
from typing import Any

from node import Agent, AgentError, behavior, handler
from node.agents import replicated
from protocols.crdt import PNCounter


@behavior("flaky")
class Flaky(Agent):
    """Crashes on 'boom'; counts calls since its last (re)start."""

    __slots__ = ("calls", "init")

    def on_start(self, init: Any) -> None:
        self.calls = 0
        self.init = init

    @handler("boom")
    def boom(self, data: Any) -> None:
        raise RuntimeError("boom requested")

    @handler("refuse")
    def refuse(self, data: Any) -> None:
        raise AgentError("bad_request", "refused on purpose")

    @handler("unserialisable")
    def unserialisable(self, data: Any) -> object:
        return object()  # msgpack cannot carry this: the caller must still get an answer

    @handler("calls")
    def count(self, data: Any) -> dict:
        self.calls += 1
        return {"calls": self.calls, "init": self.init}


@behavior("slow")
class Slow(Agent):
    """An async handler that takes its time: fills mailboxes, spans shutdowns."""

    __slots__ = ("done",)

    def on_start(self, init: Any) -> None:
        self.done = 0

    @handler("sleep")
    async def sleep(self, data: Any, message) -> dict:
        await asyncio.sleep(float((data or {}).get("s", 0.2)))
        self.done += 1
        return {"done": self.done, "id": message.id}

    @handler("blocking")
    async def blocking(self, data: Any) -> dict:
        import time
        await self.run_blocking(time.sleep, float((data or {}).get("s", 0.05)))
        return {"ok": True}


@behavior("member")
class Member(Agent):
    """Joins a group on start (init {"group": g}) and counts what it receives."""

    __slots__ = ("seen",)

    def on_start(self, init: Any) -> None:
        self.seen = []
        if init and init.get("group"):
            self.join(init["group"])

    @handler("note")
    def note(self, data: Any) -> None:
        self.seen.append(data)

    @handler("seen")
    def get_seen(self, data: Any) -> dict:
        return {"seen": self.seen}


@behavior("tally")
class Tally(Agent):
    """A replicated counter that shows its rows: who counted, and what was folded."""

    __slots__ = ()
    count = replicated(PNCounter)

    @handler("incr")
    def incr(self, data: Any) -> dict:
        self.count.increment(1)
        return {"value": self.count.value()}

    @handler("rows")
    def rows(self, data: Any) -> dict:
        return {"value": self.count.value(), "rows": self.count.replicas(),
                "folded": sorted(self.count.folds()), "me": self.count.replica}
