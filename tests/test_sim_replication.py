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
# so (e)'s upper bound applies too.
CRASHY = dict(nodes=6, duration_s=20.0, drop_rate=0.05, delay_max_s=0.1, partitions=1,
              crashes=2, pauses=1, stops=1)


# tests/test_sim_node.py's FAULTY: every fault once, duplication too.
EVERY_FAULT = dict(nodes=5, duration_s=20.0, drop_rate=0.1, dup_rate=0.1, delay_max_s=0.2,
                   partitions=1, crashes=1, pauses=1, stops=1)


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


class NeverPrunes(SimNode):
    """Planted bug: the node never learns which replicas are live, so it never folds."""

    def _on_members(self, effect):
        super()._on_members(effect)
        self.replication.live_replicas = None


def test_checker_catches_a_node_that_never_prunes():
    planted = type("WithNeverPrunes", (NodeSim,), {"node_class": NeverPrunes})
    with pytest.raises(InvariantViolation) as info:
        planted(Scenario(seed=232, nodes=5, duration_s=20.0, stops=2)).run()
    assert "(g)" in str(info.value) and "retired replicas" in str(info.value)


# ------------------------------------------------------------- bugs found

# Scenarios that found bugs (fixed since in node/state.py, protocols/replication.py
# and protocols/membership.py; kept as regressions): what each one showed.
FOUND_BUGS = {
    "refuted_node_folded": (
        dict(seed=232, nodes=5, duration_s=20.0, stops=2),
        "the node folded the counter rows of live nodes (live replica ids came from "
        "Member.generation, the incarnation a refuted suspicion bumps); later, as owner, "
        "state_for folded into its own folded row: CrdtError, the agent could not activate"),
    "seeds_down_never_joins": (
        dict(seed=14, **EVERY_FAULT),
        "a restarted node sent its join only to its seeds; its one other seed down, it "
        "never joined, was never quorate and never downed the dead seed, whose restart "
        "was then no ring change there: its copies never came back"),
}


@pytest.mark.parametrize("name", sorted(FOUND_BUGS))
def test_scenarios_that_found_bugs(name):
    run_scenario(Scenario(**FOUND_BUGS[name][0]))


def test_a_restarted_owner_gets_its_copies_back():
    """Was a bug: an owner that restarted before it was downed (the ring unchanged)
    got no copy back (its replicas held 59, it nothing, 48 acknowledged at quorum);
    now a generation jump makes replicas push their copies to it."""
    run_scenario(Scenario(seed=6, **EVERY_FAULT, fast_restarts=True))


def test_no_push_storm_while_rings_disagree():
    """Was a bug: an owner and a stray, their rings disagreeing, answered each
    other's pushes and full states at once, without backoff (200,000 events in 0.1 s
    of virtual time); a repair already scheduled is now never brought forward."""
    run_scenario(Scenario(**{**vars(swarm(3022)), "steps_max": 200_000}))


# ------------------------------------------------------------- long run

def swarm(seed: int) -> Scenario:
    rng = random.Random(seed)
    return Scenario(seed=seed, nodes=rng.randint(4, 9), duration_s=15.0,
                    drop_rate=rng.choice([0.0, 0.05, 0.15]), dup_rate=rng.choice([0.0, 0.05]),
                    delay_max_s=rng.choice([0.01, 0.1, 0.3]), partitions=rng.randint(0, 2),
                    crashes=rng.randint(0, 3), pauses=rng.randint(0, 2), stops=rng.randint(0, 2),
                    consistency=rng.choice(["quorum", "quorum", "all"]),
                    steps_max=400_000)  # a message storm fails fast


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_swarm_of_replicated_fault_mixes():
    failures = []
    for seed in range(3000, 3100):
        try:
            run_scenario(swarm(seed))
        except InvariantViolation as exc:
            failures.append(str(exc).splitlines()[-1])
    assert not failures, "\n".join(failures)
