"""Scatter-gather and pipelines across whole simulated nodes (issue 13).

``SimNode`` runs ``protocols/strategies.py`` as the node's runtime does, so these
runs check whole-cluster behaviour under a seeded faulty network: every pipeline
and scatter is answered exactly once, by its entry node, by its deadline, with an
answer of the strategy's shape (NodeSim's invariants (a), (c), (f); a failure names
the seed and the command that replays it), and on a healthy network with exactly
the values the counters' semantics give: ``incr`` adds its data and answers the new
value, ``get`` answers the value and ignores its data, and a pipeline feeds each
stage's answer to the next stage as its data.
"""

from __future__ import annotations

import random

import pytest

from protocols import wire
from protocols.sim import InvariantViolation, NodeSim, Scenario, SimNode, node_id, run_scenario
from protocols.wire import ErrorCode

PIPELINE, SCATTER = wire.ROUTING_PIPELINE, wire.ROUTING_SCATTER

# Random client load of pipelines (3 stages) and scatters (24 targets) over 5 nodes,
# besides direct calls; clients stop at 8 s.
LOAD = dict(nodes=5, duration_s=8.0, warmup_s=2.0, calls_per_s=5.0, pipelines_per_s=12.0,
            scatters_per_s=4.0, stages=3, targets=24, delay_max_s=0.05)


def faulty(seed: int, **options) -> Scenario:
    """Loss (10 or 20%), duplication, one node crashing and restarting mid-run; the
    composite calls' timeout_ms below, at and above the forward timeout (2 s).  No
    replication: with it a crash waits until every agent's copies are whole again,
    which under this load may not happen before the clients stop."""
    return Scenario(**{**dict(seed=seed, **LOAD, drop_rate=(0.1, 0.2)[seed % 2],
                              dup_rate=0.1, crashes=1,
                              routed_timeout_ms=(0, 700, 3000)[seed % 3], replicas=1),
                       **options})


def routed(ns: NodeSim, routing: str) -> list:
    return [c for c in ns.calls.values() if c.routing == routing]


def assert_answered_once_by_deadline(ns: NodeSim) -> None:
    """What NodeSim checks as it goes, asserted on the record: each call has one
    answer (a second one is a violation when it happens), or its entry crashed."""
    for call_id, call in ns.calls.items():
        assert call.lost or call.answer is not None, (call_id, ns.scenario.command())
        if call.deadline is not None and not call.lost:
            assert call.answered_at <= call.deadline + ns.DEADLINE_SLACK_S, call_id


# ------------------------------------------------------------- faulty networks

@pytest.mark.parametrize("seed", range(60))
def test_lossy_duplicating_runs_with_an_owner_crash_answer_each_call_once(seed):
    ns = NodeSim(faulty(seed))
    result = ns.run()
    stats = result.stats
    assert stats.dropped and stats.duplicated, result.summary()
    assert ns.losses, result.summary()  # the crash
    assert_answered_once_by_deadline(ns)
    pipelines, scatters = routed(ns, PIPELINE), routed(ns, SCATTER)
    assert len(pipelines) > 40 and len(scatters) > 10, result.summary()
    # Not vacuous: composite calls do get through these faults.
    assert any(c.answer and c.answer[0] == "data" for c in pipelines), result.summary()
    entries = [e for c in scatters if c.answer and c.answer[0] == "data"
               for e in c.answer[1].values()]
    assert len(entries) > len(scatters) and any("data" in e for e in entries)


@pytest.mark.parametrize("seed", range(100, 108))
def test_replicated_lossy_duplicating_runs_answer_each_call_once(seed):
    """3 copies, quorum writes: an incr stage's reply waits for a replica's ack."""
    ns = NodeSim(faulty(seed, crashes=0, replicas=3))
    result = ns.run()
    assert result.stats.dropped and result.stats.duplicated, result.summary()
    assert_answered_once_by_deadline(ns)
    assert any(c.answer and c.answer[0] == "data" for c in routed(ns, PIPELINE))


def test_same_seed_same_run_with_composite_calls():
    one, two = run_scenario(faulty(3)), run_scenario(faulty(3))
    assert one.digest == two.digest and one.summary() == two.summary()


# ------------------------------------------------------------- healthy: exact values

class Exact:
    """A scripted fault-free run whose every composite answer is known in advance.

    Phase 1 sets counters to random values with one-target scatters.  Phase 2 sends
    at once, from random entry nodes: pipelines of 3..5 stages, consecutive stages
    owned by different nodes (3 owners at least), whose incr stages write counters
    of their own and whose get stages read shared counters (left alone in phase 2:
    no answer depends on the order things run in); scatter gets
    of those shared counters; and scatter incrs over a pool of their own, checked
    per counter: the answers it gave, in increasing order, go up by each call's
    increment (each incr applied once, atomically).  Last, one scatter reads every
    counter back.
    """

    SHARED, POOL, PIPELINES = 40, 40, 15

    def __init__(self, seed: int, sim_class: type = NodeSim):
        self.rng = random.Random(seed)
        self.ns = sim_class(Scenario(seed=seed, nodes=5, duration_s=5.0, warmup_s=2.0,
                                   calls_per_s=0.0, exact=True))
        self.value: dict[str, int] = {}           # the model: counter -> value
        self.shared = [f"counter/g{i}" for i in range(self.SHARED)]
        self.pool = [f"counter/h{i}" for i in range(self.POOL)]
        self.expected: dict[int, object] = {}      # call -> its exact answer
        self.incrs: list[tuple[int, int]] = []     # (scatter incr call, increment)
        self.pipelines: list[tuple[list, int]] = []  # (stages, data)
        self.ns.sim.at(2.0, self.set_counters)
        self.ns.sim.at(3.0, self.compose)

    def entry(self) -> str:
        return node_id(self.rng.randrange(self.ns.scenario.nodes))

    def owner(self, agent: str) -> str:
        return self.ns.sim.machine(node_id(0)).router.ring.owner(agent)

    def set_counters(self, sim) -> None:
        self.pipelines = [(self.stages(j, self.rng.randint(3, 5)), self.rng.randint(1, 9))
                          for j in range(self.PIPELINES)]
        written = [a for stages, _ in self.pipelines for a, mtype in stages if mtype == "incr"]
        for agent in self.shared + written:
            self.value[agent] = n = self.rng.randint(1, 1000)
            self.expected[self.ns.issue_scatter(self.entry(), "incr", [agent], n)] = \
                {agent: {"data": n}}

    def compose(self, sim) -> None:
        for stages, data in self.pipelines:
            self.expected[self.ns.issue_pipeline(self.entry(), stages, data)] = \
                self.run_model(stages, data)
        for _ in range(3):
            targets = self.rng.sample(self.shared, 30)
            self.expected[self.ns.issue_scatter(self.entry(), "get", targets, None)] = \
                {t: {"data": self.value[t]} for t in targets}
        for _ in range(6):
            n = self.rng.randint(1, 50)
            call_id = self.ns.issue_scatter(self.entry(), "incr", self.rng.sample(self.pool, 30), n)
            self.incrs.append((call_id, n))

    def stages(self, j: int, count: int) -> list[tuple[str, str]]:
        """Stages whose consecutive owners differ, on 3 nodes at least."""
        stages: list[tuple[str, str]] = []
        owners: list[str] = []
        candidates = (f"counter/q{j}.{k}" for k in range(10_000))
        while len(stages) < count:
            if self.rng.random() < 0.6:
                agent, mtype = next(candidates), "incr"
            else:
                agent, mtype = self.rng.choice(self.shared), "get"
            owner = self.owner(agent)
            fresh = len(set(owners)) >= 3 or owner not in owners
            if (not owners or owner != owners[-1]) and fresh:
                stages.append((agent, mtype))
                owners.append(owner)
        return stages

    def run_model(self, stages: list[tuple[str, str]], data: int) -> int:
        for agent, mtype in stages:
            if mtype == "get":
                data = self.value[agent]
            else:
                self.value[agent] = data = self.value[agent] + data
        return data

    def check(self) -> None:
        ns = self.ns
        ns.run()
        for call_id, expected in self.expected.items():
            assert ns.calls[call_id].answer == ("data", expected), (call_id, ns.scenario.seed)
        self.check_pool_incrs()
        everything = sorted(self.value)
        read = ns.issue_scatter(self.entry(), "get", everything, None)
        ns.sim.run_for(3.0)
        assert ns.calls[read].answer == ("data", {a: {"data": self.value[a]} for a in everything})

    def check_pool_incrs(self) -> None:
        applied: dict[str, list[tuple[int, int]]] = {}   # counter -> (answer, increment)
        for call_id, n in self.incrs:
            kind, gathered = self.ns.calls[call_id].answer
            assert kind == "data"
            for agent, entry in gathered.items():
                applied.setdefault(agent, []).append((entry["data"], n))
        for agent, answers in applied.items():
            before = 0
            for value, n in sorted(answers):
                assert value - before == n, (agent, sorted(answers))
                before = value
            self.value[agent] = before


@pytest.mark.parametrize("seed", range(12))
def test_healthy_network_gives_exact_results(seed):
    Exact(seed).check()


def test_a_failing_stage_is_named_in_the_error():
    ns = NodeSim(Scenario(seed=5, nodes=4, duration_s=4.0, calls_per_s=0.0))
    calls = []
    ns.sim.at(3.0, lambda sim: calls.append(ns.issue_pipeline(
        node_id(1), [("counter/a", "incr"), ("counter/b", "nope"), ("counter/c", "incr")], 2)))
    ns.run()
    kind, code, message = ns.calls[calls[0]].answer
    assert (kind, code) == ("error", ErrorCode.UNKNOWN_TYPE)
    assert message.startswith("stage 1 (counter/b nope): ")


# ------------------------------------------------------------- the checks bite

class RelaysTwice(SimNode):
    """Planted bug: a pipeline's answer goes to its caller twice."""

    def _do_relay(self, effect):
        super()._do_relay(effect)
        super()._do_relay(effect)


class ForgetsStrategyTimers(SimNode):
    """Planted bug: the strategies' deadlines never fire (the router's still do)."""

    def next_deadline(self):
        deadlines = [d for d in (self.membership.next_deadline(), self.router.next_deadline())
                     if d is not None]
        return min(deadlines, default=None)


class SkipsStages(SimNode):
    """Planted bug: a pipeline ends at its first stage."""

    def _handle_local(self, req, envelope, reply_to, hops, now, hold=True):
        if req.routing == PIPELINE:
            req.routing = None
        super()._handle_local(req, envelope, reply_to, hops, now, hold)


def planted(node_class: type) -> type:
    return type(f"With{node_class.__name__}", (NodeSim,), {"node_class": node_class})


@pytest.mark.parametrize("node_class, invariant", [(RelaysTwice, "(a)"),
                                                   (ForgetsStrategyTimers, "(f)")])
def test_the_checker_catches_a_planted_bug(node_class, invariant):
    with pytest.raises(InvariantViolation) as info:
        planted(node_class)(faulty(1)).run()
    message = str(info.value)
    assert "seed=1" in message and invariant in message and "replay: python -m protocols.sim" \
        in message


def test_the_exact_check_catches_a_skipped_stage():
    with pytest.raises(AssertionError) as info:
        Exact(0, planted(SkipsStages)).check()
    assert info.type is AssertionError  # a wrong value, not an invariant of NodeSim's


# ------------------------------------------------------------- an owner down

def test_a_crashed_owner_costs_its_targets_only_and_the_deadline_holds():
    """Crash n004 mid-run: a scatter from n000 right after answers n004's targets
    'timeout' at its deadline and every other target with its value; a pipeline
    through n004 answers 'timeout' by its deadline; once n004 is back and known
    again, the same calls succeed."""
    ns = NodeSim(Scenario(seed=9, nodes=5, duration_s=20.0, calls_per_s=0.0, replicas=1))
    ring = lambda: ns.sim.machine(node_id(0)).router.ring  # noqa: E731
    targets = [f"counter/t{i}" for i in range(40)]
    calls: dict[str, int] = {}

    def pipeline_through_n004(tag: str) -> list[tuple[str, str]]:
        names = (f"counter/{tag}{i}" for i in range(10_000))
        owners = [node_id(1), node_id(4), node_id(2)]
        return [(next(a for a in names if ring().owner(a) == o), "incr") for o in owners]

    def issue(tag: str):
        def go(sim):
            calls[f"{tag} scatter"] = ns.issue_scatter(node_id(0), "get", targets, None, 1000)
            calls[f"{tag} pipeline"] = ns.issue_pipeline(node_id(0), pipeline_through_n004(tag),
                                                         1, 1000)
        return go
    ns.sim.at(4.0, lambda sim: ns.crash(node_id(4), restart_at=6.0))
    ns.sim.at(4.01, issue("down"))
    ns.sim.at(15.0, issue("back"))
    ns.run()
    down = ns.calls[calls["down scatter"]]
    assert down.answered_at == pytest.approx(down.deadline)
    lost = {t for t in targets if ring().owner(t) == node_id(4)}
    assert lost and down.answer[1] == {
        t: ({"error": {"code": ErrorCode.TIMEOUT, "message": "no answer before the "
                       "scatter's deadline"}} if t in lost else {"data": 0}) for t in targets}
    assert ns.calls[calls["down pipeline"]].answer[:2] == ("error", ErrorCode.TIMEOUT)
    assert ns.calls[calls["back scatter"]].answer == ("data", {t: {"data": 0} for t in targets})
    assert ns.calls[calls["back pipeline"]].answer == ("data", 1)


# ------------------------------------------------------------- bugs found

def timed_pipeline(seed: int, stages_on: list[int], timeout_ms: int, **options) -> NodeSim:
    """A fault-free cluster whose every hop takes exactly 50 ms; one pipeline of incr
    stages owned by nodes ``stages_on`` enters n000 at 3 s (then another, same
    shape, fresh counters, at 6 s).  Calls 1 and 2."""
    ns = NodeSim(Scenario(seed=seed, nodes=4, duration_s=8.0, calls_per_s=0.0,
                          delay_min_s=0.05, delay_max_s=0.05, **options))
    ring = lambda: ns.sim.machine(node_id(0)).router.ring  # noqa: E731

    def issue(tag: str):
        def go(sim):
            names = (f"counter/{tag}{i}" for i in range(10_000))
            stages = [(next(a for a in names if ring().owner(a) == node_id(k)), "incr")
                      for k in stages_on]
            ns.issue_pipeline(node_id(0), stages, 1, timeout_ms)
        return go
    ns.sim.at(3.0, issue("a"))
    ns.sim.at(6.0, issue("b"))
    ns.run()
    return ns


def test_a_pipeline_may_take_longer_than_one_forward():
    """4 stages on 4 nodes need 4 hops (200 ms) of their 1,000 ms; the forward
    timeout is 120 ms.  The entry answers 'timeout' at 120 ms."""
    ns = timed_pipeline(1, [0, 1, 2, 3], 1000, forward_timeout_s=0.12, replicas=1)
    assert ns.calls[1].answer == ("data", 1), ns.calls[1].answer


def test_consecutive_stages_on_one_node_keep_the_pipeline_deadline():
    """4 stages on n000 (the entry), each waiting for a replica's ack (~100 ms).
    The first pipeline, with a 5 s deadline, shows how long it takes; the second
    gets 1.3 times that, and ends 'timeout' at its third stage."""
    ns = timed_pipeline(2, [0, 0, 0, 0], 5000, replicas=3)
    took_ms = 1000 * (ns.calls[1].answered_at - ns.calls[1].issued_at)
    assert ns.calls[1].answer == ("data", 1) and took_ms > 300
    ns = timed_pipeline(2, [0, 0, 0, 0], int(1.3 * took_ms), replicas=3)
    assert ns.calls[2].answer == ("data", 1), ns.calls[2].answer


def test_an_unknown_agent_at_a_stage_is_named_in_the_error():
    ns = NodeSim(Scenario(seed=6, nodes=4, duration_s=4.0, calls_per_s=0.0))
    ns.sim.at(3.0, lambda sim: ns.issue_pipeline(
        node_id(1), [("counter/a", "incr"), ("nobody/b", "incr")], 2))
    ns.run()
    kind, code, message = ns.calls[1].answer
    assert (kind, code) == ("error", ErrorCode.UNKNOWN_AGENT)
    assert message.startswith("stage 1 (nobody/b incr): "), message


# ------------------------------------------------------------- long run

def swarm(seed: int) -> Scenario:
    """A random mix of faults, sizes and timeouts, drawn from the seed."""
    rng = random.Random(seed)
    return Scenario(
        seed=seed, nodes=rng.randint(2, 9), duration_s=10.0, warmup_s=rng.choice([0.0, 3.0]),
        calls_per_s=rng.choice([0.0, 5.0]), pipelines_per_s=rng.choice([5.0, 20.0]),
        scatters_per_s=rng.choice([2.0, 6.0]), stages=rng.randint(2, 6),
        targets=rng.choice([5, 30, 60]), routed_timeout_ms=rng.choice([0, 300, 1500, 5000]),
        drop_rate=rng.choice([0.0, 0.1, 0.2]), dup_rate=rng.choice([0.0, 0.1, 0.4]),
        delay_max_s=rng.choice([0.01, 0.3, 1.5]), partitions=rng.randint(0, 2),
        crashes=rng.randint(0, 2), pauses=rng.randint(0, 2), stops=rng.randint(0, 2),
        forward_timeout_s=rng.choice([0.05, 0.5, 2.0]), max_hops=rng.choice([1, 2, 3]),
        replicas=rng.choice([1, 3]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_swarm_of_composite_calls_under_random_fault_mixes():
    """Partitions, pauses, graceful stops, timeouts shorter than delays, one hop:
    every call is still answered once.  A failure names its seed and replay."""
    for seed in range(2000, 2300):
        run_scenario(swarm(seed))
