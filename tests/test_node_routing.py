"""Pipelines and scatter-gather on three real node processes, through the Python client
and through synthesis-ctl: stages on three different nodes compose their replies,
a failing stage is named with its index and agent, a broadcast to 50 agents across
the nodes returns 50 right entries, and per-agent errors and timeouts sit beside
the others' replies.  synthesis-ctl publishes with either strategy.
"""

from __future__ import annotations

import itertools
import json

import pytest

from node.client import Client, RemoteError
from support import wait_until
from test_cli import ctl

pytestmark = pytest.mark.timeout(180)

_names = itertools.count()


def one_agent_per_node(client: Client, behavior: str, nodes: list[str]) -> dict[str, str]:
    """node id -> a fresh agent of ``behavior`` that node owns (spawned there)."""
    found: dict[str, str] = {}
    for _ in range(300):  # with 3 equal nodes, 300 ids all missing one is ~1e-53
        agent = f"{behavior}/r{next(_names)}"
        node = client.spawn(behavior, agent)["node"]
        if node not in found:
            found[node] = agent
            if len(found) == len(nodes):
                return found
        else:
            client.stop(agent)
    raise AssertionError(f"no {behavior} agent found on every node: {found}")


@pytest.fixture(scope="module")
def node_ids(cluster3) -> list[str]:
    return [node.name for node in cluster3.nodes]


@pytest.fixture(scope="module")
def spread(cluster3, node_ids) -> dict:
    """Per behavior, one agent on each node: {"echo": {node: agent}, "counter": ...}."""
    with cluster3.nodes[0].client() as c:
        return {behavior: one_agent_per_node(c, behavior, node_ids)
                for behavior in ("echo", "counter", "kv")}


# --- pipelines -------------------------------------------------------------------------------

def test_three_stages_on_three_nodes_compose_from_every_entry_node(cluster3, node_ids, spread):
    """echo (node A) -> counter incr (node B) -> echo (node C): the counter reads the
    n the first stage passed on, and the last stage returns the counter's reply."""
    a, b, c = node_ids
    stages = [(spread["echo"][a], "pass"), (spread["counter"][b], "incr"),
              (spread["echo"][c], "pass")]
    total = 0
    for n, entry in zip((2, 3, 4), cluster3.nodes):
        with entry.client() as client:
            total += n
            assert client.pipeline(stages, {"n": n, "note": "ignored"}) == {"value": total}
    with cluster3.nodes[1].client() as client:
        assert client.call(spread["counter"][b], "get") == {"value": 2 + 3 + 4}


def test_kv_put_then_get_through_a_pipeline(cluster3, node_ids, spread):
    """echo (A) passes the key/value on, kv put (B) stores it, kv get would need a key
    again: so echo (C) returns kv's acknowledgement, and a direct get sees the value."""
    a, b, c = node_ids
    kv = spread["kv"][b]
    stages = [(spread["echo"][a], "pass"), (kv, "put"), (spread["echo"][c], "pass")]
    with cluster3.nodes[2].client() as client:
        assert client.pipeline(stages, {"key": "colour", "value": ["teal", 7]}) == {"ok": True}
        assert client.call(kv, "get", {"key": "colour"}) == {"found": True,
                                                             "value": ["teal", 7]}


def test_a_failing_middle_stage_names_its_index_and_agent(cluster3, node_ids, spread):
    a, b, c = node_ids
    first, last = spread["counter"][a], spread["counter"][c]
    middle = spread["kv"][b]  # kv has no 'incr'
    with cluster3.nodes[0].client() as client:
        before = [client.call(agent, "get")["value"] for agent in (first, last)]
        with pytest.raises(RemoteError) as info:
            client.pipeline([(first, "incr"), (middle, "incr"), (last, "incr")])
        error = info.value
        assert (error.code, error.stage, error.agent) == ("unknown_type", 1, middle)
        assert f"stage 1 ({middle} incr)" in error.message
        after = [client.call(agent, "get")["value"] for agent in (first, last)]
    assert after == [before[0] + 1, before[1]]  # stage 0 ran, stage 2 never did


def test_an_unknown_agent_at_a_stage_names_its_index_and_agent(cluster3, node_ids, spread):
    a, _, c = node_ids
    with cluster3.nodes[0].client() as client:
        with pytest.raises(RemoteError) as info:
            client.pipeline([(spread["echo"][a], "pass"), ("nosuch/x", "pass"),
                             (spread["echo"][c], "pass")])
    assert info.value.code == "unknown_agent"
    assert (info.value.stage, info.value.agent) == (1, "nosuch/x")


def test_a_slow_stage_is_answered_timeout_by_the_node_before_the_client_gives_up(
        cluster3, node_ids, spread):
    """The client asks for a deadline under its own timeout, so the node's answer
    (not a CallTimeout) tells the caller the pipeline ran out of time."""
    a, _, c = node_ids
    slow = f"slow/r{next(_names)}"
    with cluster3.nodes[0].client(timeout_s=2.0) as client:
        with pytest.raises(RemoteError) as info:
            client.pipeline([(spread["echo"][a], "pass"), (slow, "sleep"),
                             (spread["echo"][c], "pass")], {"s": 4})
    assert info.value.code == "timeout", info.value


# --- scatter-gather --------------------------------------------------------------------------

def test_broadcast_to_fifty_agents_across_three_nodes(cluster3, node_ids):
    agents = [f"counter/fifty{i}" for i in range(50)]
    with cluster3.nodes[1].client(timeout_s=10) as client:
        owners = {client.spawn("counter", agent, {"value": i})["node"]
                  for i, agent in enumerate(agents)}
        assert owners == set(node_ids)
        gathered = client.broadcast(agents, "incr", {"n": 1000})
    assert list(gathered) == agents
    assert gathered == {agent: {"value": i + 1000} for i, agent in enumerate(agents)}


def test_broadcast_reports_each_error_beside_the_others_data(cluster3, node_ids, spread):
    counters = list(spread["counter"].values())
    kv = spread["kv"][node_ids[1]]
    slow = f"slow/r{next(_names)}"
    with cluster3.nodes[2].client(timeout_s=3.0) as client:
        before = {agent: client.call(agent, "get")["value"] for agent in counters}
        gathered = client.broadcast([*counters, kv, "nosuch/x", slow], "incr")
        assert {agent: gathered[agent] for agent in counters} == {
            agent: {"value": value + 1} for agent, value in before.items()}
        errors = {agent: gathered[agent].code for agent in (kv, "nosuch/x", slow)}
        assert errors == {kv: "unknown_type", "nosuch/x": "unknown_agent",
                          slow: "unknown_type"}
        # slow agents sleep on 'sleep': one that does not answer in time is 'timeout'
        late = client.broadcast([counters[0], slow], "sleep", {"s": 5})
    assert isinstance(late[counters[0]], RemoteError) and late[counters[0]].code == "unknown_type"
    assert isinstance(late[slow], RemoteError) and late[slow].code == "timeout"


# --- synthesis-ctl end to end ----------------------------------------------------------------

def test_ctl_pipeline_and_its_failing_stage(cluster3, node_ids, spread):
    a, b, c = node_ids
    at = ("--node", cluster3.nodes[1].address)
    echo_a, counter_b, echo_c = spread["echo"][a], spread["counter"][b], spread["echo"][c]
    with cluster3.nodes[0].client() as client:
        value = client.call(counter_b, "get")["value"]
    ok = ctl(*at, "pipeline", f"{echo_a}:pass", f"{counter_b}:incr", f"{echo_c}:pass",
             '{"n": 5}')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"value": value + 5}
    flag = ctl(*at, "pipeline", "--data", "{\"n\": 1}", f"{echo_a}:pass", f"{counter_b}:incr")
    assert flag.returncode == 0 and json.loads(flag.stdout) == {"value": value + 6}

    failed = ctl(*at, "pipeline", f"{echo_a}:pass", f"{counter_b}:fly", f"{echo_c}:pass")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [
        f"error unknown_type: stage 1 ({counter_b} fly): behavior 'counter' has no "
        f"handler for 'fly'"]


def test_ctl_broadcast_human_json_and_partial_errors(cluster3, node_ids, spread):
    at = ("--node", cluster3.nodes[2].address)
    agents = [f"counter/ctl{i}" for i in range(6)]
    with cluster3.nodes[0].client() as client:
        for i, agent in enumerate(agents):
            client.spawn("counter", agent, {"value": 10 * i})
    human = ctl(*at, "broadcast", *agents, "--type", "get")
    assert human.returncode == 0, human.stderr
    assert [line.split(None, 1) for line in human.stdout.splitlines()] == [
        [agent, json.dumps({"value": 10 * i})] for i, agent in enumerate(agents)]

    as_json = ctl(*at, "--json", "broadcast", *agents, "--type", "incr", "--data", '{"n": 1}')
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {agent: {"data": {"value": 10 * i + 1}}
                                          for i, agent in enumerate(agents)}

    kv = spread["kv"][node_ids[0]]
    partial = ctl(*at, "--json", "broadcast", agents[0], kv, "--type", "get")
    assert partial.returncode == 1
    doc = json.loads(partial.stdout)
    assert doc[agents[0]] == {"data": {"value": 1}}
    assert doc[kv]["error"]["code"] == "bad_request"  # kv get wants a key
    assert partial.stderr.strip().splitlines() == [
        f"error bad_request: 1 of 2 agents answered errors; first {kv}: "
        f"{doc[kv]['error']['message']}"]


def test_ctl_publish_with_each_strategy(cluster3, node_ids):
    """Members on every node get a multicast publish and a gossip publish, each once."""
    group = f"g{next(_names)}"
    members = [f"member/{group}-{i}" for i in range(9)]
    with cluster3.nodes[0].client() as client:
        owners = {client.spawn("member", agent, {"group": group})["node"] for agent in members}
    assert owners == set(node_ids)  # each member joined the group as it started
    at = ("--node", cluster3.nodes[1].address)
    sent = ctl(*at, "publish", "--strategy", "multicast", group, "note", '"by multicast"')
    assert sent.returncode == 0 and sent.stdout.strip() == f"published to group {group}"
    gossip = ctl(*at, "--json", "publish", "--strategy", "gossip", group, "note",
                 '"by gossip"')
    assert gossip.returncode == 0 and json.loads(gossip.stdout) == {"ok": True}

    def all_seen_once() -> bool:  # the two strategies' paths may arrive in either order
        return all(sorted(client.call(m, "seen")["seen"]) == ["by gossip", "by multicast"]
                   for m in members)

    with cluster3.nodes[2].client() as client:
        wait_until(all_seen_once, timeout_s=15, what="every member saw each publish once")
