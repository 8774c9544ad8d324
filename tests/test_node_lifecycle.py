"""Supervision, bounded mailboxes, handler timeouts, graceful shutdown, config errors."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from node.client import AsyncClient, RemoteError
from support import REPO, agent_states, child_env, wait_until, wait_until_async

pytestmark = pytest.mark.timeout(60)


def _code(fn, *args, **kwargs) -> str:
    with pytest.raises(RemoteError) as err:
        fn(*args, **kwargs)
    return err.value.code


def _state_counts(client) -> dict:
    return client.status()["members"][0]["agents_by_state"]


def _wait_restarted(client) -> None:
    """Until no agent waits out a restart backoff (the crashed one is active again)."""
    wait_until(lambda: "degraded" not in _state_counts(client), what="restart after backoff")


async def _handlers_running(client, agents: int) -> None:
    """Until ``agents`` agents of this fresh node are active: an agent is activated by
    its first call, which its handler then runs, so what follows interrupts running work."""
    async def running():
        return agent_states(await client.status()).get("active", 0) >= agents
    await wait_until_async(running, what=f"{agents} handlers running")


def test_crash_restarts_then_fails_at_the_limit(node_factory):
    node = node_factory("--restart-limit", "2", "--restart-backoff-s", "0.05")
    with node.client() as c:
        assert c.call("flaky/a", "calls") == {"calls": 1, "init": None}
        assert _code(c.call, "flaky/a", "boom") == "internal"
        # Restarted after its backoff: fresh state, serving again.
        _wait_restarted(c)
        assert c.call("flaky/a", "calls") == {"calls": 1, "init": None}
        assert _code(c.call, "flaky/a", "boom") == "internal"
        _wait_restarted(c)
        assert _code(c.call, "flaky/a", "boom") == "internal"  # third crash > limit 2
        assert _state_counts(c) == {"failed": 1}               # at once: no backoff
        assert _code(c.call, "flaky/a", "calls") == "unavailable"
        # A respawn brings a failed agent back.
        c.spawn("flaky", "flaky/a", init={"again": True})
        assert c.call("flaky/a", "calls") == {"calls": 1, "init": {"again": True}}


def test_handler_chosen_error_code_does_not_restart(node_factory):
    node = node_factory()
    with node.client() as c:
        c.call("flaky/b", "calls")
        assert _code(c.call, "flaky/b", "refuse") == "bad_request"
        assert c.call("flaky/b", "calls") == {"calls": 2, "init": None}  # same instance


def test_stop_policy_removes_the_agent(node_factory):
    node = node_factory("--supervision", "stop")
    with node.client() as c:
        c.call("flaky/c", "calls")
        assert _code(c.call, "flaky/c", "boom") == "internal"
        # Gone: the next message activates a fresh one virtually.
        assert c.call("flaky/c", "calls") == {"calls": 1, "init": None}


def test_full_mailbox_answers_overloaded(node_factory):
    node = node_factory("--mailbox-len-max", "3")

    async def main():
        async with AsyncClient(node.address, timeout_s=10) as c:
            calls = [c.call("slow/one", "sleep", {"s": 0.6}) for _ in range(10)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    overloaded = [r for r in results if isinstance(r, RemoteError) and r.code == "overloaded"]
    done = [r for r in results if isinstance(r, dict)]
    # One running + three queued are served, the rest refused.
    assert len(done) == 4 and len(overloaded) == 6, results
    assert sorted(r["done"] for r in done) == [1, 2, 3, 4]  # one at a time, in turn


def test_slow_async_handler_times_out(node_factory):
    node = node_factory("--handler-timeout-s", "1.0")
    with node.client() as c:
        assert _code(c.call, "slow/t", "sleep", {"s": 5}) == "timeout"
        assert c.call("slow/t", "sleep", {"s": 0.01})["done"] == 1
        assert c.call("slow/t", "blocking") == {"ok": True}


def test_sigterm_answers_in_flight_and_exits_zero(node_factory):
    node = node_factory("--shutdown-timeout-s", "2")

    async def main():
        async with AsyncClient(node.address, timeout_s=10) as c:
            calls = [asyncio.ensure_future(c.call(f"slow/s{i % 3}", "sleep", {"s": 0.3}))
                     for i in range(12)]
            await _handlers_running(c, 3)  # all three slow agents are in a turn
            node.signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(main())
    code = node.proc.wait(10)
    assert code == 0, node.log()
    assert time.monotonic() - started < 10
    for r in results:  # every call answered: a result, or refused as unavailable
        assert isinstance(r, dict) or (isinstance(r, RemoteError) and r.code == "unavailable"), r
    assert any(isinstance(r, dict) for r in results)
    assert '"node_stopped"' in node.log()


def test_sigint_also_stops_gracefully(node_factory):
    node = node_factory()
    node.signal(signal.SIGINT)
    assert node.proc.wait(10) == 0


@pytest.mark.parametrize("args, key", [
    (["--mailbox-len-max", "abc"], "mailbox_len_max"),
    (["--listen", "127.0.0.1:99999"], "listen"),
    (["--supervision", "sometimes"], "supervision"),
])
def test_bad_config_exits_nonzero_naming_the_key(args, key):
    proc = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, timeout=30, env=child_env(), cwd=str(REPO))
    assert proc.returncode == 2  # docs/OPERATIONS.md: a config error exits 2
    assert key in proc.stderr


def test_missing_behavior_module_exits_nonzero(tmp_path):
    from support import free_port
    proc = subprocess.run([sys.executable, "-m", "node.cli", "--listen",
                           f"127.0.0.1:{free_port()}", "--metrics", "off",
                           "--behavior", "no_such_module_here"],
                          capture_output=True, text=True, timeout=30, env=child_env(),
                          cwd=str(REPO))
    assert proc.returncode == 2
    assert "no_such_module_here" in proc.stderr


def test_stop_cancels_a_running_handler_and_answers_its_caller(node_factory):
    node = node_factory()

    async def main():
        async with AsyncClient(node.address, timeout_s=10) as c:
            slow = asyncio.ensure_future(c.call("slow/victim", "sleep", {"s": 5}))
            await _handlers_running(c, 1)
            stopped = await c.stop("slow/victim")
            return stopped, await asyncio.gather(slow, return_exceptions=True)

    started = time.monotonic()
    stopped, (result,) = asyncio.run(main())
    assert stopped["stopped"] is True
    assert isinstance(result, RemoteError) and result.code == "unavailable", result
    assert time.monotonic() - started < 4


def test_sigterm_past_the_drain_deadline_answers_and_exits(node_factory):
    """A handler still running (and a thread blocked) at the deadline: the caller
    is answered 'unavailable' and the process still exits 0, promptly."""
    node = node_factory("--shutdown-timeout-s", "0.5")

    async def main():
        async with AsyncClient(node.address, timeout_s=10) as c:
            long = asyncio.ensure_future(c.call("slow/long", "sleep", {"s": 30}))
            stuck = asyncio.ensure_future(c.call("slow/stuck", "blocking", {"s": 30}))
            await _handlers_running(c, 2)
            node.signal(signal.SIGTERM)
            return await asyncio.gather(long, stuck, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(main())
    assert node.proc.wait(10) == 0, node.log()
    assert time.monotonic() - started < 8
    for r in results:
        assert isinstance(r, RemoteError) and r.code == "unavailable", r


@pytest.mark.parametrize("taken", ["listen", "metrics"])
def test_port_in_use_exits_one_with_a_message(node_factory, taken):
    from support import free_port
    first = node_factory(metrics=True)
    listen = first.address if taken == "listen" else f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{first.metrics_port}" if taken == "metrics" else "off"
    proc = subprocess.run([sys.executable, "-m", "node.cli", "--listen", listen,
                           "--pub", f"127.0.0.1:{free_port()}", "--metrics", metrics],
                          capture_output=True, text=True, timeout=30, env=child_env(),
                          cwd=str(REPO))
    assert proc.returncode == 1, proc.stderr
    assert "cannot start" in proc.stderr
    with first.client() as c:  # the first node is unharmed
        assert c.ping()["node"] == "n0"


def test_restarts_outside_the_window_do_not_count_and_backoff_doubles(node_factory):
    """Supervision (docs/OPERATIONS.md): restarts are counted within restart_window_s
    only, and each restart within it waits twice as long as the one before."""
    node = node_factory("--restart-limit", "1", "--restart-window-s", "0.5",
                        "--restart-backoff-s", "0.4")
    with node.client() as c:
        c.call("flaky/w", "calls")
        crashed = time.monotonic()
        assert _code(c.call, "flaky/w", "boom") == "internal"
        _wait_restarted(c)
        assert time.monotonic() - crashed >= 0.4             # the first backoff
        # Wait the window out: the first crash no longer counts, so one more crash
        # is the first of a new window and restarts, where limit 1 would fail it.
        wait_until(lambda: time.monotonic() - crashed > 0.6, what="the window to pass")
        assert _code(c.call, "flaky/w", "boom") == "internal"
        _wait_restarted(c)
        assert c.call("flaky/w", "calls") == {"calls": 1, "init": None}
    node2 = node_factory("--restart-limit", "3", "--restart-backoff-s", "0.3")
    with node2.client() as c:
        c.call("flaky/b", "calls")
        assert _code(c.call, "flaky/b", "boom") == "internal"
        _wait_restarted(c)
        second = time.monotonic()
        assert _code(c.call, "flaky/b", "boom") == "internal"
        # The second backoff is 0.6 s: a constant 0.3 s backoff would be active by now.
        wait_until(lambda: time.monotonic() - second > 0.45, what="past the first backoff")
        assert _state_counts(c) == {"degraded": 1}
        _wait_restarted(c)
        assert time.monotonic() - second >= 0.6
