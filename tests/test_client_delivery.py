"""Client guarantees: resends for at_least_once / exactly_once, acknowledged sends,
causal clocks.

Against real node processes where the node's behaviour today decides the outcome
(a paused node, a request lost with a killed node), and against a scripted ROUTER
where the test needs answers a node would give only under load (``unavailable``
then a reply, a reply carrying ``vc``).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any, Callable

import msgpack
import pytest
import zmq

from node import client as client_mod
from node.client import AsyncClient, CallTimeout, Client, RemoteError
from support import free_port, wait_until

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0


def _in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread; the returned function joins it and gives its result
    (or raises its exception)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the joining test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(WAIT_S * 2)
        assert not thread.is_alive(), "call did not return"
        if "error" in box:
            raise box["error"]
        return box["result"]
    return join


# ---------------------------------------------------------------------------- real nodes

def test_at_least_once_resends_to_a_paused_node_and_the_first_reply_wins(node_factory):
    node = node_factory()
    with node.client(timeout_s=5.0) as c:
        c.ping()
        node.signal(signal.SIGSTOP)
        resume = threading.Timer(1.5, node.signal, (signal.SIGCONT,))
        resume.start()
        try:
            started = time.monotonic()
            assert c.call("echo/a", "hi", {"n": 1}, delivery="at_least_once") == {"n": 1}
            assert 1.4 < time.monotonic() - started < 5.0
        finally:
            resume.join()
            node.signal(signal.SIGCONT)
        # The resumed node refuses the copies that waited while it was stalled
        # (unavailable: node/runtime.py's stall guard); the client resent until one
        # was served, and matched every answer to its call.
        wait_until(lambda: c.ping(), 5.0, "the node answers")
        assert c.unmatched_replies == 0


def test_a_request_lost_with_its_node_is_resent_only_at_least_once(node_factory):
    """The request reaches a paused node that is then killed: the copy is lost with it.
    A new node at the same address serves well before the deadline; only the call
    that resends gets an answer."""
    port = free_port()
    outcomes = {}
    node = node_factory("--listen", f"127.0.0.1:{port}")
    for delivery in ("at_least_once", None):
        with Client(node.address, timeout_s=6.0) as c:
            c.ping()
            node.signal(signal.SIGSTOP)
            called_at = time.monotonic()
            join = _in_thread(lambda: c.call("echo/a", "hi", 7, delivery=delivery))
            time.sleep(0.3)  # the request is in the paused node's socket buffer
            node.kill()
            node = node_factory("--listen", f"127.0.0.1:{port}")
            assert time.monotonic() - called_at < 5.0  # serving, with a second to spare
            try:
                outcomes[delivery] = join()
            except CallTimeout as exc:
                outcomes[delivery] = exc
    assert outcomes["at_least_once"] == 7
    assert isinstance(outcomes[None], CallTimeout)


def test_guarantee_fields_reach_the_node_which_validates_them(node_factory):
    node = node_factory()
    with node.client() as c:
        assert c.call("echo/a", "x", 1, consistency="quorum") == 1
        assert c.call("echo/a", "x", 2, delivery="exactly_once", consistency="all") == 2
        assert c.call("echo/a", "x", 3, delivery="causal") == 3
        for field, value in (("consistency", "strong"), ("delivery", "twice")):
            with pytest.raises(RemoteError) as info:
                c.call("echo/a", "x", None, **{field: value})
            assert info.value.code == "bad_request" and f"'{field}'" in info.value.message
        # an acknowledged send returns once the node has it
        assert c.send("counter/s", "incr", {"n": 2}, delivery="at_least_once") is None
        assert c.call("counter/s", "get") == {"value": 2}


def test_async_client_guarantees_against_a_real_node(node_factory):
    node = node_factory()

    async def main() -> None:
        async with AsyncClient(node.address, timeout_s=5.0) as c:
            results = await asyncio.gather(
                c.call("echo/b", "x", 1),
                c.call("echo/b", "x", 2, delivery="at_least_once"),
                c.call("echo/b", "x", 3, delivery="exactly_once", consistency="quorum"),
                c.call("echo/b", "x", 4, delivery="causal"))
            assert results == [1, 2, 3, 4]
            await c.send("counter/t", "incr", {"n": 3}, delivery="exactly_once")
            assert await c.call("counter/t", "get") == {"value": 3}
            with pytest.raises(RemoteError) as info:
                await c.call("echo/b", "x", consistency="strong")
            assert info.value.code == "bad_request"

    asyncio.run(asyncio.wait_for(main(), WAIT_S * 3))


# ---------------------------------------------------------------------------- scripted ROUTER

class Router:
    """A raw ROUTER on a free loopback port answering with ``answer(envelope)``
    (an envelope map to send back, or None for no answer) in its own thread."""

    def __init__(self, answer: Callable[[dict], dict | None]):
        self.seen: list[dict] = []
        self._answer = answer
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT_S)

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        self.address = f"127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                ident, frame = sock.recv_multipart()
                envelope = msgpack.unpackb(frame)
                self.seen.append(envelope)
                answer = self._answer(envelope)
                if answer is not None:
                    sock.send_multipart([ident, msgpack.packb(answer)])
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)


def reply(envelope: dict, data: Any, **extra: Any) -> dict:
    return {"v": 1, "id": envelope["id"], "re": envelope["id"], "type": "syn.reply",
            "data": data, **extra}


def error(envelope: dict, code: str) -> dict:
    return {"v": 1, "id": envelope["id"], "re": envelope["id"], "type": "syn.error",
            "data": {"code": code, "message": "scripted"}}


@pytest.fixture
def router():
    routers: list[Router] = []

    def start(answer: Callable[[dict], dict | None]) -> Router:
        routers.append(Router(answer))
        return routers[-1]
    yield start
    for r in routers:
        r.close()


def _first_refused(code: str) -> Callable[[dict], dict]:
    """Answer ``code`` to the first copy of each id, then reply with the data."""
    refused: set = set()

    def answer(envelope: dict) -> dict:
        if envelope["id"] not in refused:
            refused.add(envelope["id"])
            return error(envelope, code)
        return reply(envelope, envelope.get("data"))
    return answer


@pytest.mark.parametrize("code", ["unavailable", "overloaded"])
def test_retryable_errors_are_resent_with_the_same_id(router, code):
    r = router(_first_refused(code))
    with Client(r.address, timeout_s=5.0) as c:
        assert c.call("a/1", "t", 5, delivery="at_least_once") == 5
        with pytest.raises(RemoteError) as info:
            c.call("a/1", "t", 6)  # no guarantee: the error is the answer
        assert info.value.code == code
    ids = [e["id"] for e in r.seen]
    assert ids[0] == ids[1] and ids[2] != ids[0]
    assert r.seen[0]["delivery"] == "at_least_once" and "delivery" not in r.seen[2]


def test_other_errors_are_the_answer_and_the_last_retryable_error_is_raised(router):
    r = router(lambda e: error(e, "unknown_type" if e.get("data") == 1 else "unavailable"))
    with Client(r.address, timeout_s=1.0) as c:
        with pytest.raises(RemoteError) as info:
            c.call("a/1", "t", 1, delivery="exactly_once")
        assert info.value.code == "unknown_type"
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            c.call("a/1", "t", 2, delivery="at_least_once")
        assert info.value.code == "unavailable"
        assert time.monotonic() - started >= 0.9  # retried until the deadline
    assert sum(1 for e in r.seen if e.get("data") == 2) >= 3


def test_silence_is_resent_after_an_attempt_timeout_until_the_deadline(router):
    r = router(lambda e: None)
    with Client(r.address, timeout_s=2.5) as c:
        with pytest.raises(CallTimeout, match="sends"):
            c.call("a/1", "t", 1, delivery="at_least_once")
    sends = len(r.seen)
    # attempts of 1 s, backoff up to 50 ms then 100 ms: 2 or 3 sends in 2.5 s
    assert 2 <= sends <= 4 and len({e["id"] for e in r.seen}) == 1


def test_exactly_once_ids_are_unique_among_clients_and_match_replies(router):
    r = router(lambda e: reply(e, e["id"]))
    with Client(r.address) as c1, Client(r.address) as c2:
        first, second = c1.call("a/1", "t", delivery="exactly_once"), \
            c2.call("a/1", "t", delivery="exactly_once")
        assert first != second
        assert first.split(".") == ["1", c1._req.session]
        assert c1.call("a/1", "t") == "2"  # plain ids go on counting


def test_an_acknowledged_send_travels_as_a_call_and_a_causal_send_one_way(router):
    r = router(lambda e: reply(e, "ack") if e.get("mode") == "call" else None)
    with Client(r.address) as c:
        assert c.send("a/1", "t", 1, delivery="at_least_once") is None
        c.send("a/1", "t", 2, delivery="causal")
        c.send("a/1", "t", 3)
        wait_until(lambda: len(r.seen) == 3, WAIT_S)
    assert [(e.get("mode"), e.get("delivery")) for e in r.seen] == [
        ("call", "at_least_once"), ("send", "causal"), ("send", None)]


def test_causal_clocks_count_per_agent_and_merge_replies(router):
    agent_clock = {"other": 4}

    def answer(envelope: dict) -> dict:
        if envelope["subject"] == "a/fail":
            return error(envelope, "timeout")
        vc = dict(agent_clock, **{envelope["session"]: envelope["vc"][envelope["session"]]})
        return reply(envelope, None, vc=vc)

    r = router(answer)
    with Client(r.address) as c:
        session = c._req.session
        c.call("a/1", "t", delivery="causal")
        c.call("a/1", "t", delivery="causal")
        c.call("a/2", "t", delivery="causal")
        for _ in range(2):
            with pytest.raises(RemoteError):
                c.call("a/fail", "t", delivery="causal")
    vcs = [(e["subject"], e["session"], e["vc"]) for e in r.seen]
    assert vcs[0] == ("a/1", session, {session: 1})
    assert vcs[1] == ("a/1", session, {session: 2, "other": 4})  # merged from the reply
    assert vcs[2] == ("a/2", session, {session: 1})              # its own clock
    assert vcs[3] == ("a/fail", session, {session: 1})
    renamed = vcs[4][1]  # the failed message would block the old id: a new one
    assert renamed != session and vcs[4][2] == {renamed: 1}


def test_async_retries_and_causal_merge_against_a_scripted_router(router):
    refuse_first = _first_refused("unavailable")

    def answer(envelope: dict) -> dict:
        if envelope.get("delivery") == "causal":
            return reply(envelope, None, vc={"x": 9, envelope["session"]: 1})
        return refuse_first(envelope)

    r = router(answer)

    async def main() -> None:
        async with AsyncClient(r.address, timeout_s=5.0) as c:
            assert await asyncio.gather(*(c.call("a/1", "t", n, delivery="exactly_once")
                                          for n in range(20))) == list(range(20))
            await c.call("a/2", "t", delivery="causal")
            await c.call("a/2", "t", delivery="causal")
            task = c.call("a/3", "t", delivery="at_least_once", timeout_s=0.5)
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not c._guaranteed_waiters

    asyncio.run(asyncio.wait_for(main(), WAIT_S * 2))
    causal = [e["vc"] for e in r.seen if e.get("delivery") == "causal"]
    assert causal[1]["x"] == 9 and len(causal[1]) == 2
    assert len([e for e in r.seen if e.get("delivery") == "exactly_once"]) == 40


def test_attempt_timeout_is_one_second():
    assert client_mod.ATTEMPT_TIMEOUT_S == 1.0
