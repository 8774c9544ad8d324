"""Replication in the whole-node simulator (protocols/sim.py): real SWIM membership,
its downing, handoff and ring changes drive each node's Replication machine as
node/runtime.py and node/state.py drive it.

Invariant (e), checked after heal in every run with ``replicas`` > 1: every node is
up, views agree and replication is quiet; every replica of a counter holds the same
value; that value counts every incr acknowledged at quorum or all and (without
duplication, which can apply a forwarded incr twice) none not sent.  It holds with
crashes because a crash or graceful stop waits until the replicas are whole again
(``NodeSim.replicas_whole``: at most one copy of any agent is lost at a time), and
a crashed node restarts once the others have taken it off the ring (unless
``fast_restarts``).  A failing run names its seed and replay command.
"""

from __future__ import annotations

import random

import pytest

from protocols.effects import REPLICATE, Send
from protocols.sim import InvariantViolation, NodeSim, Scenario, SimNode, run_scenario

# Loss, reordering, a partition, a pause, crashes and a graceful stop; no duplication,
# so (e)'s upper bound applies too.  fold=False: see test_known_bugs.
CRASHY = dict(nodes=6, duration_s=20.0, drop_rate=0.05, delay_max_s=0.1, partitions=1,
              crashes=2, pauses=1, stops=1, fold=False)


# tests/test_sim_node.py's FAULTY: every fault once, duplication too.
EVERY_FAULT = dict(nodes=5, duration_s=20.0, drop_rate=0.1, dup_rate=0.1, delay_max_s=0.2,
                   partitions=1, crashes=1, pauses=1, stops=1, fold=False)


def run_checked(scenario: Scenario) -> NodeSim:
    nodes = NodeSim(scenario)
    nodes.run()
    return nodes


@pytest.mark.parametrize("seed", [201, 202, 203, 204])
def test_quorum_writes_outlive_crashes(seed):
    nodes = run_checked(Scenario(seed=seed, **CRASHY))
    result = nodes.result()
    assert sum(nodes._acked_strong.values()) > 100, result.summary()
    assert result.stats.undeliverable, result.summary()  # a node did go down
    stats = [nodes.sim.machine(n).replication.stats for n in nodes.sim.node_ids]
    assert sum(s["gathers"] for s in stats) and sum(s["fulls_applied"] for s in stats), \
        result.summary()


@pytest.mark.parametrize("seed", [211, 212])
def test_duplication_keeps_the_lower_bound(seed):
    """A duplicated forward may apply an incr twice (no exactly-once here): only
    acknowledged writes are checked, and replicas still agree."""
    run_checked(Scenario(seed=seed, **{**CRASHY, "dup_rate": 0.1}))


@pytest.mark.parametrize("consistency", ["all", "local"])
def test_other_consistencies(consistency):
    """``all`` waits for every replica (timeouts under loss); ``local`` answers at
    once: its incrs are not part of (e)'s lower bound, but replicas still agree."""
    nodes = run_checked(Scenario(seed=221, **{**CRASHY, "consistency": consistency}))
    strong = sum(nodes._acked_strong.values())
    assert (strong > 0) == (consistency == "all"), nodes.result().summary()


def test_fault_free_replicated_counters_are_exact():
    result = run_scenario(Scenario(seed=231, nodes=5, duration_s=12.0, exact=True))
    assert result.errors == {} and result.counters_checked, result.summary()


def test_folding_without_faults():
    """Owners fold retired counter rows (node/state.py) through graceful restarts."""
    nodes = run_checked(Scenario(seed=233, nodes=5, duration_s=20.0, stops=2))
    folded = [agent for n in nodes.sim.node_ids
              for agent, rec in nodes.sim.machine(n).replication.records.items()
              if "n" in rec.fields and rec.fields["n"].folds()]
    assert folded, nodes.result().summary()


def test_same_seed_same_run():
    scenario = Scenario(seed=241, **CRASHY)
    assert run_scenario(scenario).digest == run_scenario(scenario).digest


# ------------------------------------------------------------- the checker bites

class NeverReplicates(SimNode):
    """Planted bug: the node's replication messages never leave it."""

    def _take(self):
        return [e for e in super()._take() if not (type(e) is Send and e.channel == REPLICATE)]


def test_checker_catches_writes_that_never_replicate():
    planted = type("WithNeverReplicates", (NodeSim,), {"node_class": NeverReplicates})
    scenario = Scenario(seed=251, nodes=4, duration_s=10.0)
    with pytest.raises(InvariantViolation) as info:
        planted(scenario).run()
    message = str(info.value)
    assert "seed=251" in message and "(e)" in message and "replay: python -m protocols.sim" \
        in message


# ------------------------------------------------------------- bugs found

@pytest.mark.xfail(strict=True, raises=InvariantViolation, reason=(
    "node/state.py folds the rows of live nodes: members_changed computes live replica "
    "ids from Member.generation, the incarnation, which a refuted suspicion bumps; the "
    "node's replica id keeps its start generation.  Later, as owner, its state_for "
    "calls fold() into its own folded row: CrdtError 'cannot fold into replica ...: it "
    "is retired or folded', so the agent cannot activate there (INTERNAL errors)"))
def test_known_bug_refuted_node_cannot_activate_after_its_row_was_folded():
    run_scenario(Scenario(seed=232, nodes=5, duration_s=20.0, stops=2))


@pytest.mark.xfail(strict=True, raises=InvariantViolation, reason=(
    "protocols/replication.py: a node that restarts before it is downed comes back "
    "with no copies, and the ring does not change: owners keep its acked seq, replicas "
    "offer nothing to a restarted owner; copies stay short after heal, and here the "
    "restarted owner n003 serves counter/5 at 27 while 50 were acknowledged at quorum "
    "(its replicas hold 51)"))
def test_known_bug_fast_restart_leaves_copies_missing():
    run_scenario(Scenario(seed=10, **EVERY_FAULT, fast_restarts=True))


@pytest.mark.xfail(strict=True, raises=InvariantViolation, reason=(
    "protocols/membership.py: a restarted node sends its join only to its seeds; "
    "with its one other seed down it never joins, so it is never quorate (refuses its "
    "agents, never downs the dead seed) although every member gossips with it; the dead "
    "seed stays on its ring, so the seed's restart is no ring change there and the copies "
    "it should get back never come (replicas differ after heal)"))
def test_known_bug_node_whose_seeds_are_down_never_joins():
    run_scenario(Scenario(seed=14, **EVERY_FAULT))


# ------------------------------------------------------------- long run

def swarm(seed: int) -> Scenario:
    rng = random.Random(seed)
    return Scenario(seed=seed, nodes=rng.randint(4, 9), duration_s=15.0,
                    drop_rate=rng.choice([0.0, 0.05, 0.15]), dup_rate=rng.choice([0.0, 0.05]),
                    delay_max_s=rng.choice([0.01, 0.1, 0.3]), partitions=rng.randint(0, 2),
                    crashes=rng.randint(0, 3), pauses=rng.randint(0, 2), stops=rng.randint(0, 2),
                    consistency=rng.choice(["quorum", "quorum", "all"]), fold=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_swarm_of_replicated_fault_mixes():
    failures = []
    for seed in range(3000, 3100):
        try:
            run_scenario(swarm(seed))
        except InvariantViolation as exc:
            failures.append(str(exc).splitlines()[-1])
    assert not failures, "\n".join(failures)
