"""Client reply matching, timeouts and in-flight slots, against a scripted fake node.

The fake node is a real ZeroMQ ROUTER socket on 127.0.0.1, driven by a script in
its own thread: it answers out of order, forges replies, sends errors with ``re``
nil and answers after the client gave up, so each test can check that every call
gets its own answer (values are distinct per call, so a mismatch fails).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

import msgpack
import pytest
import zmq

from node.client import AsyncClient, CallTimeout, Client, RemoteError

pytestmark = pytest.mark.timeout(30)

WAIT_S = 10.0  # bound on every wait in the fake node's scripts
NOT_AN_ENVELOPE = b"\xc1"  # a byte msgpack never uses


class FakeNode:
    """A raw ROUTER on a free loopback port; ``script(node)`` runs in a thread.

    The script reads requests with ``requests`` and answers with ``reply``,
    ``error`` and ``send_raw``; every frame sent is logged in ``sent`` (decoded,
    or None), in order.  Leaving the ``with`` block waits for the script and
    raises whatever it raised.
    """

    def __init__(self, script: Callable[["FakeNode"], None]):
        self.sent: list[dict | None] = []
        self.release = threading.Event()  # set by the test: the script may go on
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self.address = ""
        self._thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT_S), "fake node did not bind"

    def _run(self, script: Callable[["FakeNode"], None]) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A ROUTER drops what does not fit its peer's queue: a script that answers
        # more than a high-water mark at once must not lose replies on the way.
        sock.setsockopt(zmq.SNDHWM, 0)
        try:
            self._sock = sock
            self.address = f"127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
            self._ready.set()
            script(self)
        except BaseException as exc:  # reported to the test by __exit__
            self._error = exc
        finally:
            self._ready.set()
            # Keep the socket open until the test is done, so no reply is dropped.
            self._finished.wait(WAIT_S)
            sock.close()

    def requests(self, count: int) -> list[tuple[bytes, dict]]:
        """The next ``count`` requests as (routing id, envelope)."""
        got = []
        while len(got) < count:
            if not self._sock.poll(int(WAIT_S * 1000)):
                raise TimeoutError(f"fake node got {len(got)} of {count} requests")
            ident, payload = self._sock.recv_multipart()
            got.append((ident, msgpack.unpackb(payload, raw=False)))
        return got

    def no_request_within(self, timeout_s: float) -> bool:
        return not self._sock.poll(int(timeout_s * 1000))

    def reply(self, ident: bytes, re: Any, data: Any) -> None:
        self._send(ident, {"v": 1, "id": re if isinstance(re, str) else "", "re": re,
                           "type": "syn.reply", "data": data})

    def error(self, ident: bytes, re: Any, code: str) -> None:
        self._send(ident, {"v": 1, "id": re if isinstance(re, str) else "", "re": re,
                           "type": "syn.error", "data": {"code": code, "message": code}})

    def send_raw(self, ident: bytes, frame: bytes) -> None:
        self.sent.append(None)
        self._sock.send_multipart([ident, frame])

    def _send(self, ident: bytes, envelope: dict) -> None:
        self.sent.append(envelope)
        self._sock.send_multipart([ident, msgpack.packb(envelope)])

    def wait_release(self) -> None:
        if not self.release.wait(WAIT_S):
            raise TimeoutError("the test never released the fake node")

    def __enter__(self) -> "FakeNode":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self._finished.set()
        if exc[0] is not None:
            return  # the test's own failure says more; the thread is a daemon
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "fake node script did not finish"
        if self._error is not None:
            raise self._error


def fifo_answers(node: FakeNode, calls: int) -> list[Any]:
    """What a client matching replies in arrival order would have returned."""
    return [env.get("data") if env else None for env in node.sent][:calls]


# ---------------------------------------------------------------------------- Client


def test_sync_client_takes_only_the_reply_whose_re_is_its_request_id():
    def script(node: FakeNode) -> None:
        [(ident, first)] = node.requests(1)   # never answered in time
        [(ident, second)] = node.requests(1)  # sent after the first timed out
        node.reply(ident, first["id"], first["data"])  # late
        node.reply(ident, "999999", "forged")          # an id the client never sent
        node.error(ident, None, "bad_request")         # re nil: no call of this client
        node.reply(ident, int(second["id"]), "wrong type of re")
        node.send_raw(ident, NOT_AN_ENVELOPE)
        node.reply(ident, second["id"], second["data"])
        [(ident, third)] = node.requests(1)
        node.error(ident, third["id"], "refused_here")

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        with pytest.raises(CallTimeout):
            c.call("echo/a", "ping", "value-1", timeout_s=0.3)
        assert c.call("echo/a", "ping", "value-2") == "value-2"
        with pytest.raises(RemoteError) as info:
            c.call("echo/a", "ping", "value-3")
        assert (info.value.code, info.value.request_id) == ("refused_here", "3")
        assert (c.late_replies, c.unmatched_replies) == (1, 4)
    # Matching in arrival order would have answered the second call with the first's value.
    assert fifo_answers(node, 1) == ["value-1"]


# ---------------------------------------------------------------------------- AsyncClient


def test_async_client_matches_out_of_order_forged_nil_and_late_replies():
    calls = 20

    def script(node: FakeNode) -> None:
        requests = node.requests(calls + 2)
        by_data = {env["data"]: (ident, env) for ident, env in requests}
        ident, late = by_data.pop("value-late")
        _, boom = by_data.pop("value-boom")
        normal = sorted(by_data.values(), key=lambda r: int(r[1]["id"]))
        node.reply(ident, "999999", "forged")
        node.error(ident, None, "bad_request")
        for i, (who, env) in reversed(list(enumerate(normal[calls // 2:]))):
            node.reply(who, env["id"], env["data"])
            if i == 3:
                node.error(who, boom["id"], "refused_here")  # in the middle of the stream
        node.wait_release()  # the test saw the late call time out
        node.reply(ident, late["id"], "value-late")
        node.send_raw(ident, NOT_AN_ENVELOPE)
        for who, env in reversed(normal[:calls // 2]):
            node.reply(who, env["id"], env["data"])

    async def main(node: FakeNode) -> tuple[list[Any], AsyncClient]:
        async with AsyncClient(node.address, timeout_s=5) as c:
            futures = [c.call("echo/x", "ping", f"value-{i}") for i in range(calls)]
            # As a task, the way coroutine-era code wrote it: still sent at once.
            boom = asyncio.create_task(c.call("echo/x", "ping", "value-boom"))
            late = c.call("echo/x", "ping", "value-late", timeout_s=0.3)
            with pytest.raises(CallTimeout):
                await late
            node.release.set()
            results = await asyncio.gather(*futures)
            with pytest.raises(RemoteError) as info:
                await boom
            assert info.value.code == "refused_here"
            return results, c

    with FakeNode(script) as node:
        results, client = asyncio.run(main(node))
    expected = [f"value-{i}" for i in range(calls)]
    assert results == expected
    assert (client.late_replies, client.unmatched_replies) == (1, 3)
    assert fifo_answers(node, calls) != expected


def test_async_late_reply_after_the_default_timeout_is_dropped():
    def script(node: FakeNode) -> None:
        [(ident, first)] = node.requests(1)
        node.wait_release()
        [(ident, second)] = node.requests(1)
        node.reply(ident, first["id"], first["data"])
        node.reply(ident, second["id"], second["data"])

    async def main(node: FakeNode) -> AsyncClient:
        async with AsyncClient(node.address, timeout_s=0.3) as c:  # the sweep timer's path
            with pytest.raises(CallTimeout):
                await c.call("echo/x", "ping", "value-1")
            node.release.set()
            second = asyncio.create_task(c.call("echo/x", "ping", "value-2", timeout_s=5))
            assert await second == "value-2"
            return c

    with FakeNode(script) as node:
        client = asyncio.run(main(node))
    assert (client.late_replies, client.unmatched_replies) == (1, 0)


def test_in_flight_max_holds_calls_back_until_a_slot_frees():
    def script(node: FakeNode) -> None:
        first = node.requests(2)
        if not node.no_request_within(0.3):
            raise AssertionError("a third call was sent with in_flight_max=2")
        ident, env = first[1]
        node.reply(ident, env["id"], env["data"])
        [(ident, third)] = node.requests(1)  # sent once the slot freed
        for who, env in (first[0], (ident, third)):
            node.reply(who, env["id"], env["data"])

    async def main(node: FakeNode) -> list[Any]:
        async with AsyncClient(node.address, timeout_s=5, in_flight_max=2) as c:
            return await asyncio.gather(*(c.call("echo/x", "ping", f"v{i}") for i in range(3)))

    with FakeNode(script) as node:
        assert asyncio.run(main(node)) == ["v0", "v1", "v2"]


def test_cancelled_call_frees_its_slot_and_its_reply_counts_as_late():
    def script(node: FakeNode) -> None:
        [(ident, first)] = node.requests(1)
        [(ident, second)] = node.requests(1)  # only sent because the first was cancelled
        node.reply(ident, first["id"], first["data"])
        node.reply(ident, second["id"], second["data"])

    async def main(node: FakeNode) -> AsyncClient:
        async with AsyncClient(node.address, timeout_s=5, in_flight_max=1) as c:
            first = asyncio.create_task(c.call("echo/x", "ping", "v1"))  # a task still works
            second = c.call("echo/x", "ping", "v2")
            await asyncio.sleep(0.05)
            first.cancel()
            assert await second == "v2"
            with pytest.raises(asyncio.CancelledError):
                await first
            return c

    with FakeNode(script) as node:
        client = asyncio.run(main(node))
    assert (client.late_replies, client.unmatched_replies) == (1, 0)


def test_task_cancelled_before_its_first_step_frees_the_slot():
    def script(node: FakeNode) -> None:
        [(ident, first)] = node.requests(1)
        [(ident, second)] = node.requests(1)
        node.reply(ident, second["id"], second["data"])

    async def main(node: FakeNode) -> None:
        # A timeout longer than the wait below: only freeing the slot lets v2 go out.
        async with AsyncClient(node.address, timeout_s=60, in_flight_max=1) as c:
            first = asyncio.create_task(c.call("echo/x", "ping", "v1"))
            first.cancel()  # before the task ever ran
            assert await asyncio.wait_for(c.call("echo/x", "ping", "v2"), WAIT_S) == "v2"
            assert first.cancelled()

    with FakeNode(script) as node:
        asyncio.run(main(node))


def test_call_errors_surface_when_awaited():
    async def main(address: str) -> None:
        c = AsyncClient(address, timeout_s=5)
        unencodable = c.call("echo/x", "ping", object())
        await c.close()
        closed = c.call("echo/x", "ping", 1)
        with pytest.raises(TypeError):
            await unencodable
        with pytest.raises(RuntimeError, match="closed"):
            await closed

    with FakeNode(lambda node: None) as node:
        asyncio.run(main(node.address))


# ---------------------------------------------------------------------------- exact counts


def test_sync_client_sends_the_envelope_asked_for_and_times_out_on_its_own_clock():
    def script(node: FakeNode) -> None:
        [(_, env)] = node.requests(1)
        node.sent.append(env)  # what arrived, for the test to read

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        with pytest.raises(CallTimeout) as info:
            c.call("counter/a", "incr", {"n": 2}, timeout_s=1.0)  # whole seconds: s -> ms exactly
        assert str(info.value) == "no reply to incr for 'counter/a' within 1000 ms"
    assert node.sent[0] == {"v": 1, "id": "1", "type": "incr", "subject": "counter/a",
                            "mode": "call", "data": {"n": 2}}


def test_every_late_and_unmatched_reply_is_counted_once():
    """Two late replies count two; "01" is not the id "1" (ids have no leading zero);
    a non-str ``re`` of an unhashable type is unmatched, not a crash."""
    def script(node: FakeNode) -> None:
        [(ident, first)] = node.requests(1)
        [(ident, second)] = node.requests(1)
        [(ident, third)] = node.requests(1)
        node.reply(ident, first["id"], "late-1")
        node.reply(ident, second["id"], "late-2")
        node.reply(ident, "0" + third["id"], "leading zero")
        node.reply(ident, [third["id"]], "re is a list")
        node.reply(ident, third["id"], "value-3")

    async def main(node: FakeNode) -> AsyncClient:
        async with AsyncClient(node.address, timeout_s=5) as c:
            for i in (1, 2):
                with pytest.raises(CallTimeout):
                    await c.call("echo/x", "ping", i, timeout_s=0.1)
            assert await c.call("echo/x", "ping", 3) == "value-3"
            return c

    with FakeNode(script) as node:
        client = asyncio.run(main(node))
    assert (client.late_replies, client.unmatched_replies) == (2, 2)

    with FakeNode(script) as node, Client(node.address, timeout_s=5) as c:
        for i in (1, 2):
            with pytest.raises(CallTimeout):
                c.call("echo/x", "ping", i, timeout_s=0.1)
        assert c.call("echo/x", "ping", 3) == "value-3"
        assert (c.late_replies, c.unmatched_replies) == (2, 2)


def test_more_replies_than_one_read_batch_are_all_delivered():
    from node.client import READ_BATCH_MAX

    calls = READ_BATCH_MAX + 50

    def script(node: FakeNode) -> None:
        requests = node.requests(calls)
        for ident, env in requests:  # all at once: the client reads them in batches
            node.reply(ident, env["id"], env["data"])

    async def main(node: FakeNode) -> list[Any]:
        async with AsyncClient(node.address, timeout_s=10) as c:
            return await asyncio.gather(*(c.call("echo/x", "ping", i) for i in range(calls)))

    with FakeNode(script) as node:
        assert asyncio.run(main(node)) == list(range(calls))
