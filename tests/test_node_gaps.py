"""Claims of docs/OPERATIONS.md and README that only a real node can hold (issue #14):
``/health`` while a node drains, multicast gaps counted by the subscriber, and each
supervision policy (node-wide and per behavior) on a crashing agent."""

from __future__ import annotations

import http.client
import json
import os
import signal
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from node.client import RemoteError
from support import REPO, TESTS, Cluster, NodeProcess, metric_samples, wait_until

pytestmark = pytest.mark.timeout(90)

RESTARTED = ("synthesis_agents_restarted_total", ())
FAILED = ("synthesis_agents_failed_total", ())
DROPPED = ("synthesis_multicast_dropped_total", ())


def _code(fn, *args, **kwargs) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        fn(*args, **kwargs)
    return err.value


def _health(node: NodeProcess) -> tuple[int, dict] | None:
    """(HTTP status, JSON body) of the node's /health, or None once nothing listens.

    A connection the closing server accepted and then dropped (reset, or closed
    without an answer) is neither: it reads as status 0, so a poll goes on."""
    url = f"http://127.0.0.1:{node.metrics_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:   # 503 and other statuses carry a body too
        return err.code, json.loads(err.read())
    except urllib.error.URLError as err:
        if isinstance(err.reason, ConnectionRefusedError):
            return None
        if isinstance(err.reason, ConnectionResetError):
            return 0, {}
        raise
    except (ConnectionResetError, http.client.RemoteDisconnected):
        return 0, {}


# --- /health while a real node drains (OPERATIONS.md "Shutdown", "Health") ----------

def test_health_is_503_stopping_while_draining_then_refused(node_factory):
    node = node_factory("--shutdown-timeout-s", "3", metrics=True)
    assert _health(node)[0] == 200
    with node.client() as c:
        for _ in range(4):   # one runs, three wait: the drain has about 3 s of work
            c.send("slow/drain", "sleep", {"s": 1.0})
        c.ping()   # answered after the node took in the sends: one runs, three wait
    node.signal(signal.SIGTERM)
    draining = wait_until(lambda: (h := _health(node)) and h[0] == 503 and h,
                          timeout_s=5, what="/health 503 after SIGTERM")
    assert draining[1]["status"] == "stopping", draining
    assert node.proc.poll() is None, "503 must be served while the node still drains"
    wait_until(lambda: _health(node) is None, timeout_s=15,
               what="/health refusing connections after the metrics server stopped")
    assert node.proc.wait(10) == 0, node.log()
    stopping = [json.loads(line) for line in node.log().splitlines()
                if '"node_stopping"' in line]
    assert stopping and stopping[0]["pending"] >= 2, node.log()  # it did have work to drain


# --- multicast gaps counted by a real subscriber (PROTOCOL.md 9.5) ----------------------

MULTICASTS = 500


@pytest.fixture(scope="module")
def low_hwm_pair(tmp_path_factory):
    """Two nodes whose PUB/SUB high-water mark is one message: a burst drops."""
    pair = Cluster(2, tmp_path_factory.mktemp("gaps"), metrics=True, args=("--pub-hwm", "1"))
    try:
        yield pair
    finally:
        pair.close()


def _members_by_home(pair, group: str) -> dict[str, list[str]]:
    agents = [f"member/{group}-{i}" for i in range(12)]
    homes: dict[str, list[str]] = {"n0": [], "n1": []}
    with pair.nodes[0].client() as c:
        for agent in agents:
            homes[c.spawn("member", agent, init={"group": group})["node"]].append(agent)
    assert homes["n0"] and homes["n1"], homes   # 12 ids on 2 nodes: both hold some
    return homes


def _seen(pair, agents: list[str]) -> dict[str, list]:
    with pair.nodes[1].client() as c:
        return {a: c.call(a, "seen")["seen"] for a in agents}


def _publish_until_seen(pair, group: str, agents: list[str], tag: str) -> int:
    """Publish ``tag-K`` through n0 every 0.1 s until every agent's last note is the
    latest one sent; returns how many were published.  Then no earlier multicast is
    still on its way, and any gap before the last one has been counted."""
    with pair.nodes[0].client() as pub:
        for k in range(100):
            pub.publish(group, "note", f"{tag}-{k}")
            time.sleep(0.1)
            if all(seen and seen[-1] == f"{tag}-{k}" for seen in _seen(pair, agents).values()):
                return k + 1
    pytest.fail(f"{tag} multicasts never reached {agents}")


def test_multicast_gaps_counted_match_what_members_missed(low_hwm_pair):
    pair, group = low_hwm_pair, "gaps"
    homes = _members_by_home(pair, group)
    everyone = homes["n0"] + homes["n1"]
    _publish_until_seen(pair, group, everyone, "probe")   # n1's SUB is connected
    before = metric_samples(pair.nodes[1]).get(DROPPED, 0.0)
    with pair.nodes[0].client() as pub:
        for i in range(MULTICASTS):
            pub.publish(group, "note", i)
    # End markers: a drop is a gap only once a later seq arrives.
    markers = _publish_until_seen(pair, group, everyone, "end")
    sent = MULTICASTS + markers
    dropped = metric_samples(pair.nodes[1])[DROPPED] - before
    after_probe = {a: _after_last_probe(s) for a, s in _seen(pair, everyone).items()}
    for agent in homes["n0"]:   # the entry node delivers to its own members, not via PUB
        assert len(after_probe[agent]) == sent, agent
    missed = {sent - len(after_probe[agent]) for agent in homes["n1"]}
    assert len(missed) == 1, missed   # one SUB per node: its members miss the same ones
    assert missed.pop() == dropped > 0, (dropped, sent)


def _after_last_probe(seen: list) -> list:
    last = max(i for i, x in enumerate(seen) if isinstance(x, str) and x.startswith("probe-"))
    return seen[last + 1:]


# --- supervision: node-wide policy ------------------------------------------------------

def test_restart_policy_brings_the_agent_back_and_counts_it(node_factory):
    node = node_factory("--supervision", "restart", "--restart-backoff-s", "0.05",
                        metrics=True)
    with node.client() as c:
        c.spawn("flaky", "flaky/r", init={"keep": 1})
        assert c.call("flaky/r", "calls") == {"calls": 1, "init": {"keep": 1}}
        assert _code(c.call, "flaky/r", "boom").code == "internal"
        wait_until(lambda: metric_samples(node)[RESTARTED] == 1, what="restart counted")
        # The same activation restarted: on_start ran again with the spawn's init.
        assert c.call("flaky/r", "calls") == {"calls": 1, "init": {"keep": 1}}
    assert metric_samples(node)[FAILED] == 0
    assert '"agent_restarted"' in node.log()


def test_stop_policy_removes_a_spawned_agent_for_good(node_factory):
    node = node_factory("--supervision", "stop", metrics=True)
    with node.client() as c:
        c.spawn("flaky", "worker-1", init={"keep": 1})   # no BEHAVIOR/ prefix: not virtual
        assert c.call("worker-1", "calls") == {"calls": 1, "init": {"keep": 1}}
        assert _code(c.call, "worker-1", "boom").code == "internal"
        # PROTOCOL.md 5 (stop): a stopped spawned id answers unknown_agent until spawned again.
        assert _code(c.call, "worker-1", "calls").code == "unknown_agent"
        assert _code(c.call, "worker-1", "calls").code == "unknown_agent"
        c.spawn("flaky", "worker-1")
        assert c.call("worker-1", "calls") == {"calls": 1, "init": None}
    samples = metric_samples(node)
    assert (samples[RESTARTED], samples[FAILED]) == (0, 0)


def test_escalate_policy_fails_the_agent_and_logs_it(node_factory):
    node = node_factory("--supervision", "escalate", "--restart-backoff-s", "0.05",
                        metrics=True)
    with node.client() as c:
        c.spawn("flaky", "flaky/e", init={"keep": 1})
        assert _code(c.call, "flaky/e", "boom").code == "internal"
        # No supervisor above an agent yet: escalation fails it, with no restart.
        failed = _code(c.call, "flaky/e", "calls")
        assert failed.code == "unavailable" and "has failed" in failed.message, failed
        assert c.status()["members"][0]["agents_by_state"] == {"failed": 1}
        c.spawn("flaky", "flaky/e", init={"again": True})   # a spawn replaces it
        assert c.call("flaky/e", "calls") == {"calls": 1, "init": {"again": True}}
    samples = metric_samples(node)
    assert (samples[RESTARTED], samples[FAILED]) == (0, 1)
    events = [json.loads(line).get("event") for line in node.log().splitlines()
              if line.startswith("{")]
    assert events.count("agent_escalated") == 1 and events.count("agent_failed") == 1, events
    assert events.index("agent_escalated") < events.index("agent_failed")


# --- supervision: per-behavior class attributes override the node's policy ---------------

OVERRIDES = textwrap.dedent('''
    """Flaky behaviors whose class attributes override the node's supervision."""
    from node import behavior
    from synthesis_test_behaviors import Flaky


    @behavior("flaky_stop")
    class FlakyStop(Flaky):
        supervision = "stop"


    @behavior("flaky_escalate")
    class FlakyEscalate(Flaky):
        supervision = "escalate"


    @behavior("flaky_no_restarts")
    class FlakyNoRestarts(Flaky):
        restart_limit = 0
''')


@pytest.fixture
def override_node(tmp_path):
    """A node whose own policy is restart, loading the overriding behaviors too."""
    (tmp_path / "gap_overrides.py").write_text(OVERRIDES)
    path = os.pathsep.join([str(tmp_path), str(REPO), str(TESTS)])
    node = NodeProcess("ov", tmp_path, metrics=True, env={"PYTHONPATH": path},
                       args=("--behavior", "gap_overrides", "--supervision", "restart",
                             "--restart-limit", "3", "--restart-backoff-s", "0.05"))
    try:
        node.wait_serving()
        yield node
    finally:
        node.kill()


def _crash(c, agent: str) -> None:
    assert _code(c.call, agent, "boom").code == "internal"


def test_behavior_supervision_overrides_the_node_policy(override_node):
    node = override_node
    with node.client() as c:
        for behavior in ("flaky_stop", "flaky_escalate", "flaky_no_restarts"):
            c.spawn(behavior, behavior, init={"keep": 1})   # spawned ids: not virtual
        c.spawn("flaky", "plain", init={"keep": 1})
        for agent in ("flaky_stop", "flaky_escalate", "flaky_no_restarts", "plain"):
            _crash(c, agent)
        # The node's restart policy still applies to the behavior without overrides.
        wait_until(lambda: metric_samples(node)[RESTARTED] == 1, what="plain restarted")
        assert c.call("plain", "calls") == {"calls": 1, "init": {"keep": 1}}
        assert _code(c.call, "flaky_stop", "calls").code == "unknown_agent"
        for agent in ("flaky_escalate", "flaky_no_restarts"):
            assert _code(c.call, agent, "calls").code == "unavailable", agent
    samples = metric_samples(node)
    assert (samples[RESTARTED], samples[FAILED]) == (1, 2)
    escalated = [json.loads(line)["agent_id"] for line in node.log().splitlines()
                 if '"agent_escalated"' in line]
    assert escalated == ["flaky_escalate"]
