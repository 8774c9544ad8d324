"""Pruning with real processes (docs/STATE.md, 'Pruning'): after a rolling restart of
every node, each counter holds its current owner's row alone, and its value is
intact on the owner and on the replicas that take over when the owner dies."""

from __future__ import annotations

import pytest

from node.client import CallTimeout, RemoteError
from support import member_view, metric_samples, wait_until
from test_node_membership import clusters  # noqa: F401  (a fixture: the nodes are killed after)

AGENTS = [f"tally/p{i}" for i in range(12)]
CALL_S = 10.0


def write_round(node) -> None:
    """One increment of every agent at quorum, through ``node``; each must succeed."""
    with node.client(timeout_s=CALL_S) as c:
        for agent in AGENTS:
            c.call(agent, "incr", consistency="quorum")


def rows(node) -> dict[str, dict]:
    with node.client(timeout_s=CALL_S) as c:
        return {agent: c.call(agent, "rows") for agent in AGENTS}


def all_at(node, value: int) -> bool:
    """Every agent answers ``value`` through ``node`` (False while one fails over)."""
    try:
        return all(r["value"] == value for r in rows(node).values())
    except (RemoteError, CallTimeout):
        return False


def live_replicas(node) -> set[int]:
    view = member_view(node, timeout_s=CALL_S)
    return {m["replica"] for m in view["members"]}


@pytest.mark.timeout(240)
def test_rolling_restart_folds_every_retired_row_and_counts_each_write_once(clusters):
    cluster = clusters(3, metrics=True)
    write_round(cluster.nodes[0])
    first = rows(cluster.nodes[0])
    assert all(r["value"] == 1 and r["rows"] == [r["me"]] for r in first.values())
    for i in range(len(cluster.nodes)):
        cluster.restart(i)
        write_round(cluster.nodes[(i + 1) % len(cluster.nodes)])
    rounds = 1 + len(cluster.nodes)

    entry = cluster.nodes[0]
    live = live_replicas(entry)
    assert len(live) == 3 and 0 not in live
    after = rows(entry)
    for agent, r in after.items():
        assert r["value"] == rounds, (agent, r)
        # The owner's own row alone: every earlier generation's was folded into it.
        assert r["rows"] == [r["me"]] and r["me"] in live, (agent, r, live)
        assert r["folded"] and not set(r["folded"]) & live, (agent, r)
        assert first[agent]["me"] in r["folded"]
    # Counted in /metrics (what the nodes folded since their own last start).
    pruned = sum(metric_samples(node).get(
        ("synthesis_replication_events_total", (("event", "pruned"),)), 0)
        for node in cluster.nodes)
    assert pruned > 0

    # The folds reached the replicas: with an owner killed, its replicas serve the
    # same value (a replica that kept a retired row without its marker would count
    # it twice).
    victim = cluster.nodes[1]
    victim.kill()
    survivor = cluster.nodes[2]
    wait_until(lambda: all_at(survivor, rounds), timeout_s=60, poll_s=0.5,
               what="every counter served with its value after the kill")
    assert all_at(entry, rounds)
