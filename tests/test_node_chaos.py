"""A node dies or freezes: the rest keep serving, callers get answers, not hangs."""

from __future__ import annotations

import signal
import time

import pytest

from node.client import CallTimeout, RemoteError
from support import Cluster, wait_until

pytestmark = pytest.mark.timeout(90)


def _agent_owned_by(client, owner: str, prefix: str) -> str:
    for i in range(500):
        agent = f"counter/{prefix}-{i}"
        if client.spawn("counter", agent)["node"] == owner:
            return agent
    raise AssertionError(f"no agent id owned by {owner}")


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(3, tmp_path)
    yield c
    c.close()


def test_killed_owner_answers_unavailable_and_others_keep_serving(cluster):
    n0, n1, n2 = cluster.nodes
    with n0.client(timeout_s=10) as c:
        on_n1 = _agent_owned_by(c, "n1", "live")
        on_n2 = _agent_owned_by(c, "n2", "dead")
        assert c.call(on_n2, "incr") == {"value": 1}
        n2.kill()  # SIGKILL: no goodbye
        started = time.monotonic()
        with pytest.raises(RemoteError) as err:
            c.call(on_n2, "incr")
        assert err.value.code == "unavailable"
        assert time.monotonic() - started < 8  # a bounded wait, not the client timeout
        for _ in range(20):
            c.call(on_n1, "incr")
        assert c.call(on_n1, "get") == {"value": 20}
        rows = {m["node"]: m for m in c.status()["members"]}
        assert rows["n2"]["reachable"] is False and rows["n1"]["reachable"] is True


def test_frozen_owner_times_out_without_blocking_other_agents(cluster):
    n0, n1, n2 = cluster.nodes
    with n0.client(timeout_s=10) as c:
        on_n1 = _agent_owned_by(c, "n1", "busy")
        on_n2 = _agent_owned_by(c, "n2", "frozen")
        n2.signal(signal.SIGSTOP)
        try:
            with pytest.raises(CallTimeout):
                c.call(on_n2, "incr", timeout_s=1.0)
            assert c.call(on_n1, "incr") == {"value": 1}  # unaffected
            time.sleep(1.0)  # frozen well past the stall guard's 2 probe intervals
        finally:
            n2.signal(signal.SIGCONT)
        # Thawed, it answers again.  The incr that waited while it was frozen is
        # refused, not run: peers may have declared it dead and moved its agents.
        deadline = time.monotonic() + 10
        while True:
            try:
                value = c.call(on_n2, "get", timeout_s=1.0)["value"]
                break
            except (CallTimeout, RemoteError) as exc:
                assert isinstance(exc, CallTimeout) or exc.code == "unavailable"
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert value == 0
    assert "node_stalled" in n2.log()


def test_restarted_node_rejoins_at_a_new_address(cluster, tmp_path):
    """Same node id, new process and port: its higher generation wins everywhere."""
    from support import NodeProcess
    n0, n1, n2 = cluster.nodes
    n2.kill()
    (tmp_path / "reborn").mkdir()
    reborn = NodeProcess("n2", tmp_path / "reborn", seeds=(n0.address,))
    cluster.nodes[2] = reborn
    reborn.wait_serving()
    cluster.wait_converged()
    with n1.client() as c:
        agent = _agent_owned_by(c, "n2", "reborn")
        assert c.call(agent, "incr") == {"value": 1}


def test_sigterm_answers_calls_still_waiting_for_a_dead_owner(tmp_path):
    import asyncio
    from node.client import AsyncClient
    c2 = Cluster(2, tmp_path, metrics=True, args=("--shutdown-timeout-s", "0.3"))
    try:
        n0, n1 = c2.nodes
        with n0.client() as c:
            on_n1 = _agent_owned_by(c, "n1", "orphan")
        n1.kill()

        async def main():
            async with AsyncClient(n0.address, timeout_s=10) as c:
                call = asyncio.ensure_future(c.call(on_n1, "incr"))
                # Until the forward waits in n0's table (the metrics read runs in a
                # thread: the client's loop must go on sending the call meanwhile).
                await asyncio.to_thread(wait_until, lambda: _forwards_in_flight(n0) == 1,
                                        what="the call forwarded to the dead owner")
                n0.signal(signal.SIGTERM)
                return await asyncio.gather(call, return_exceptions=True)

        started = time.monotonic()
        (result,) = asyncio.run(main())
        assert isinstance(result, RemoteError) and result.code == "unavailable", result
        assert time.monotonic() - started < 5
        assert n0.proc.wait(10) == 0
    finally:
        c2.close()


def test_a_frozen_owner_is_answered_timeout_by_the_entry_node(tmp_path):
    """Before the router kept forwards with deadlines, a call to a SIGSTOPped owner
    heard nothing until the client's own timeout (60 s with a 60 s client).  Now the
    entry node answers 'timeout' at handler_timeout_s + forward_margin_s, and a reply
    the owner sends after thawing is dropped as late, never delivered twice."""
    c2 = Cluster(2, tmp_path, metrics=True,
                 args=("--handler-timeout-s", "1.0", "--forward-margin-s", "0.5"))
    try:
        n0, n1 = c2.nodes
        with n0.client(timeout_s=30) as c:
            on_n1 = _agent_owned_by(c, "n1", "stopped")
            n1.signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(RemoteError) as err:
                    c.call(on_n1, "incr")
                waited = time.monotonic() - started
            finally:
                n1.signal(signal.SIGCONT)
            assert err.value.code == "timeout" and "did not answer" in err.value.message
            assert waited < 20, waited  # the entry node's deadline, not the client's 30 s
            # Thawed, n1 refuses the incr that waited (it was stalled for longer than
            # its peers take to suspect it) and answers: n0 counts that reply late.
            wait_until(lambda: _served(c, on_n1), what="n1 serving again")
            assert c.call(on_n1, "get")["value"] == 0
            assert "node_stalled" in n1.log()
        wait_until(lambda: 'synthesis_limited_total{reason="late_reply"} 1.0' in _metrics(n0),
                   what="the late reply counted")
    finally:
        c2.close()


def _served(c, agent: str) -> bool:
    try:
        c.call(agent, "get")
        return True
    except RemoteError as exc:
        assert exc.code == "unavailable"
        return False


def _metrics(node) -> str:
    import urllib.request
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _forwards_in_flight(node) -> float:
    for line in _metrics(node).splitlines():
        if line.startswith("synthesis_forwards_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no synthesis_forwards_in_flight gauge")
