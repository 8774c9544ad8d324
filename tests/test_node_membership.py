"""SWIM membership between real node processes (127.0.0.1, port 0): join, crash,
freeze, graceful leave, partition and corruption, seen through ``members`` on every
node and through counter agents that must keep answering with the right state.

Measured figures (detection, convergence, failure streaks) are printed: run with
``-s`` to see them.  Bounds are generous (a loaded 2-core machine runs all the
nodes); the protocol's own targets are tighter (a crash is detected within about 3 s
with the default timings).
"""

from __future__ import annotations

import collections
import itertools
import signal
import threading
import time
from pathlib import Path

import pytest

import core_cy
from node.client import CallTimeout, Client, RemoteError
from node.transports.faults import write_faults
from support import Cluster, NodeProcess, member_states, member_view, metric_samples, wait_until

pytestmark = pytest.mark.timeout(120)

COUNTERS = tuple(f"counter/{i}" for i in range(200))
POLL_S = 0.05                 # how often every node's view is read while measuring
CRASH_DETECTED_BOUND_S = 8.0  # the target is 3 s; the slack is for a loaded machine
CONVERGE_BOUND_S = 15.0       # after SIGCONT, a heal, or the end of corruption
CORRUPTION_S = 4.0            # how long peer traffic is corrupted
# Fast timings for the tests that are not about the default ones: a crash is
# suspected after ~0.2 s and declared dead ~0.6-1.2 s later.
FAST = ("--probe-interval-s", "0.2", "--probe-timeout-s", "0.1",
        "--stable-after-s", "0.5", "--handoff-timeout-s", "1.0")


# --- reading the cluster -----------------------------------------------------------------

def names(nodes: list[NodeProcess]) -> list[str]:
    return [node.name for node in nodes]


def all_alive(nodes: list[NodeProcess]) -> bool:
    """Every node lists exactly ``nodes``, all alive, and is quorate."""
    want = dict.fromkeys(names(nodes), "alive")
    for node in nodes:
        view = member_view(node)
        if view is None or not view["quorate"] or member_states(view) != want:
            return False
    return True


def seconds_until(condition, timeout_s: float, what: str) -> float:
    """Seconds from now until ``condition()`` holds, polled every POLL_S."""
    started = time.monotonic()
    wait_until(condition, timeout_s=timeout_s, what=what, poll_s=POLL_S)
    return time.monotonic() - started


def ring_owners(nodes: list[NodeProcess], agents=COUNTERS,
                extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Agent -> owner on the ring of ``nodes`` (and the node ids ``extra``, not yet
    started), as the nodes compute it."""
    with nodes[0].client() as c:
        vnodes = c.status()["members"][0]["ring"]["vnodes"]
    ring = core_cy.HashRing(tuple(sorted((*names(nodes), *extra))), vnodes=vnodes)
    return {agent: ring.owner(agent) for agent in agents}


def agents_held(node: NodeProcess) -> int | None:
    """How many agents ``node`` holds, by its own ``members`` row."""
    view = member_view(node)
    if view is None:
        return None
    return next(m["agents"] for m in view["members"] if m["node_id"] == node.name)


def holds_exactly(nodes: list[NodeProcess], owners: dict[str, str]) -> bool:
    """Every node holds exactly the counters the ring gives it (nothing twice)."""
    return all(agents_held(node) == sum(1 for o in owners.values() if o == node.name)
               for node in nodes)


def set_counters(client: Client) -> dict[str, int]:
    """Counter i gets the value i + 1; returns the values."""
    values = {}
    for i, agent in enumerate(COUNTERS):
        values[agent] = client.call(agent, "incr", {"n": i + 1})["value"]
        assert values[agent] == i + 1
    return values


def read_counters(client: Client) -> dict[str, int]:
    return {agent: client.call(agent, "get")["value"] for agent in COUNTERS}


def all_counters_answer(client: Client) -> bool:
    """One pass over the counters; False at the first one not served."""
    for agent in COUNTERS:
        try:
            client.call(agent, "get", timeout_s=2.0)
        except (RemoteError, CallTimeout):
            return False
    return True


class CallLoop(threading.Thread):
    """Increments the counters round-robin through one node for as long as it runs,
    checking every reply against the value it expects; counts failures and the
    longest run of consecutive failures (calls and seconds)."""

    def __init__(self, address: str, values: dict[str, int]):
        super().__init__(daemon=True)
        self.address = address
        self.values = dict(values)
        self.calls = 0
        self.failures: list[tuple[str, str]] = []
        self.longest_streak = (0, 0.0)
        self._stop_event = threading.Event()

    def run(self) -> None:
        streak, streak_started = 0, 0.0
        with Client(self.address, timeout_s=5.0) as c:
            while not self._stop_event.is_set():
                agent = COUNTERS[self.calls % len(COUNTERS)]
                self.calls += 1
                error = self._incr(c, agent)
                if error is None:
                    streak = 0
                    continue
                self.failures.append((agent, error))
                if streak == 0:
                    streak_started = time.monotonic()
                streak += 1
                self.longest_streak = max(self.longest_streak,
                                          (streak, time.monotonic() - streak_started))

    def _incr(self, c: Client, agent: str) -> str | None:
        try:
            got = c.call(agent, "incr")["value"]
        except (RemoteError, CallTimeout) as exc:
            self._resync(c, agent)
            return repr(exc)
        expected = self.values[agent] + 1
        self.values[agent] = got  # judge the next calls from what it holds now
        return None if got == expected else f"value {got}, expected {expected}"

    def _resync(self, c: Client, agent: str) -> None:
        """After a failed call nobody knows whether it was applied: read the value, so
        that the one failure is not counted again as a wrong value on the next call."""
        try:
            self.values[agent] = c.call(agent, "get")["value"]
        except (RemoteError, CallTimeout):
            pass  # the next call to it reports the mismatch, if any

    def wait_calls(self, more: int = 50) -> None:
        """Until ``more`` further calls were made (traffic at this point for sure)."""
        target = self.calls + more
        wait_until(lambda: self.calls >= target, timeout_s=15, what=f"{more} more calls")

    def finish(self) -> None:
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), "the call loop did not stop"

    def report(self, what: str) -> str:
        calls, seconds = self.longest_streak
        return (f"{what}: {self.calls} calls, {len(self.failures)} failed, longest failure "
                f"streak {calls} calls / {seconds:.2f} s; first failures: {self.failures[:5]}")


@pytest.fixture
def clusters(tmp_path):
    """Start clusters (``make(size, args=..., ...)``); every node is killed after."""
    started: list[Cluster] = []

    def make(size: int, **options) -> Cluster:
        cluster = Cluster(size, tmp_path, **options)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.close()


# --- 1. join -----------------------------------------------------------------------------

def test_five_nodes_from_one_seed_all_list_five_alive(clusters):
    cluster = clusters(5, args=FAST)
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="every node lists five members alive")
    view = member_view(cluster.nodes[2])
    rows = {m["node_id"]: m for m in view["members"]}
    for node in cluster.nodes:
        assert rows[node.name]["address"] == f"tcp://{node.address}"
        assert rows[node.name]["incarnation"] > 0


# --- 2. crash, with the default timings --------------------------------------------------

def test_killed_node_is_dead_everywhere_within_bound_and_its_agents_move(clusters):
    # Default membership timings; only the sync period, which the shared NodeProcess
    # shortens for the status tests, is set back to its default.
    cluster = clusters(5, args=("--gossip-interval-s", "2.0"))
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="five alive")
    victim, survivors = cluster.nodes[3], cluster.nodes[:3] + cluster.nodes[4:]
    owners = ring_owners(cluster.nodes)
    with survivors[0].client(timeout_s=5.0) as c:
        for agent in COUNTERS:  # quorum: acknowledged once replicas hold it, so it
            # survives the kill (a local write's delta may still be on its way: the
            # last one was lost once in .ci/run, killed within its loop pass)
            assert c.call(agent, "incr", consistency="quorum") == {"value": 1}

    victim.kill()  # SIGKILL: no goodbye
    killed_at = time.monotonic()
    wait_until(lambda: all(member_states(member_view(n)).get(victim.name) == "dead"
                           for n in survivors),
               timeout_s=CRASH_DETECTED_BOUND_S + 5, poll_s=POLL_S,
               what=f"{victim.name} dead in every survivor's view")
    detected_s = time.monotonic() - killed_at
    with survivors[0].client(timeout_s=5.0) as c:
        wait_until(lambda: all_counters_answer(c), timeout_s=CRASH_DETECTED_BOUND_S,
                   what="every counter served again")
        served_s = time.monotonic() - killed_at
        print(f"\ncrash (default timings): dead in every view {detected_s:.2f} s after "
              f"kill -9; every counter served {served_s:.2f} s after")
        assert detected_s <= CRASH_DETECTED_BOUND_S
        assert served_s <= CRASH_DETECTED_BOUND_S
        # Replicated: the victim's counters come back on their new owners with
        # their state (the quorum increment reached the replicas before the kill).
        assert read_counters(c) == {a: 1 for a in COUNTERS}
    assert 0 < sum(owners[a] == victim.name for a in COUNTERS) < len(COUNTERS)


# --- 3. a frozen node ---------------------------------------------------------------------

def test_stopped_node_is_suspected_then_dead_and_rejoins_after_sigcont(clusters):
    cluster = clusters(5, args=FAST)
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="five alive")
    frozen, others = cluster.nodes[4], cluster.nodes[:4]
    incarnation = {m["node_id"]: m["incarnation"]
                   for m in member_view(others[0])["members"]}[frozen.name]
    seen: dict[str, list[str]] = {n.name: [] for n in others}  # states in order seen

    def dead_everywhere() -> bool:
        for node in others:
            state = member_states(member_view(node)).get(frozen.name)
            if state and (not seen[node.name] or seen[node.name][-1] != state):
                seen[node.name].append(state)
        return all(history and history[-1] == "dead" for history in seen.values())

    frozen.signal(signal.SIGSTOP)
    try:
        dead_s = seconds_until(dead_everywhere, CRASH_DETECTED_BOUND_S,
                               f"{frozen.name} dead in every view")
    finally:
        frozen.signal(signal.SIGCONT)
    converged_s = seconds_until(lambda: all_alive(cluster.nodes), CONVERGE_BOUND_S,
                                "five alive again after SIGCONT")
    print(f"\nSIGSTOP: dead everywhere after {dead_s:.2f} s (states seen: {seen}); "
          f"after SIGCONT all five alive everywhere in {converged_s:.2f} s")
    assert any("suspect" in history for history in seen.values()), seen
    for node in cluster.nodes:
        rows = {m["node_id"]: m for m in member_view(node)["members"]}
        assert rows[frozen.name]["incarnation"] > incarnation, (node.name, rows)


# --- 4. join with state handoff ---------------------------------------------------------

def test_joining_node_takes_its_counters_with_their_state_under_load(clusters):
    cluster = clusters(5, args=FAST)
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="five alive")
    with cluster.nodes[0].client() as c:
        values = set_counters(c)
    loop = CallLoop(cluster.nodes[1].address, values)
    loop.start()
    try:
        loop.wait_calls()
        joined_at = time.monotonic()
        cluster.add("n5")
        owners = ring_owners(cluster.nodes)
        wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
                   what="six alive everywhere")
        wait_until(lambda: holds_exactly(cluster.nodes, owners), timeout_s=CONVERGE_BOUND_S,
                   what="every node holds exactly its counters on the six-node ring")
        moved_s = time.monotonic() - joined_at
        loop.wait_calls()
    finally:
        loop.finish()
    print(f"\njoin: counters in place {moved_s:.2f} s after the new node started; "
          + loop.report("calls during the join"))
    assert 0 < list(owners.values()).count("n5") < len(COUNTERS)
    assert loop.failures == []
    with cluster.nodes[5].client() as c:
        assert read_counters(c) == loop.values


def test_request_reaching_a_joining_node_before_the_state_waits_for_it(clusters, tmp_path):
    """An old owner that hears of the join late (its sends to the new node delayed
    0.5 s, well within handoff_timeout_s) must not cost the moved counters their
    state: the new node asks it for them and waits."""
    slow_path = tmp_path / "faults-n2.json"
    cluster = clusters(5, args=FAST + ("--handoff-timeout-s", "3.0"),
                       node_args=lambda name: ("--faults-file", str(slow_path))
                       if name == "n2" else ())
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="five alive")
    before, after = ring_owners(cluster.nodes), ring_owners(cluster.nodes, extra=("n5",))
    moving = [a for a in COUNTERS if before[a] == "n2" and after[a] == "n5"]
    assert moving
    entry = cluster.nodes[0]
    with entry.client() as c:
        values = set_counters(c)
        write_faults(slow_path, [{"peers": ["n5"], "direction": "out", "delay_ms": [500, 500]}])
        cluster.add("n5")
        wait_until(lambda: member_states(member_view(entry)).get("n5") == "alive",
                   timeout_s=CONVERGE_BOUND_S, poll_s=0.01, what="the entry node sees n5")
        asked_at = time.monotonic()
        got = {agent: c.call(agent, "get")["value"] for agent in moving}
        print(f"\nlate old owner: {len(moving)} moved counters read in "
              f"{time.monotonic() - asked_at:.2f} s")
    assert got == {agent: values[agent] for agent in moving}


# --- 5. graceful leave --------------------------------------------------------------------

def test_leaving_node_hands_its_counters_off_with_their_state(clusters):
    cluster = clusters(4, args=FAST)
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="four alive")
    leaver, stay = cluster.nodes[3], cluster.nodes[:3]
    with stay[0].client() as c:
        values = set_counters(c)
    loop = CallLoop(stay[0].address, values)
    loop.start()
    try:
        loop.wait_calls()
        leaver.signal(signal.SIGTERM)
        left_at = time.monotonic()
        assert leaver.proc.wait(15) == 0
        exited_s = time.monotonic() - left_at
        owners = ring_owners(stay)
        wait_until(lambda: all(member_states(member_view(n)).get(leaver.name, "left")
                               in ("left", "dead") for n in stay),
                   timeout_s=CONVERGE_BOUND_S, what=f"{leaver.name} gone from every view")
        wait_until(lambda: holds_exactly(stay, owners), timeout_s=CONVERGE_BOUND_S,
                   what="the three hold exactly their counters")
        loop.wait_calls()
    finally:
        loop.finish()
    print(f"\nleave: the node exited {exited_s:.2f} s after SIGTERM; "
          + loop.report("calls during the leave"))
    assert loop.failures == []
    with stay[2].client() as c:
        assert read_counters(c) == loop.values


def test_call_in_flight_to_a_leaving_owner_gets_the_owners_answer(clusters):
    """The owner leaves while a call is in its turn: it finishes the call, the entry
    node waits for that answer (not 'unavailable' the moment the owner leaves the
    view), and the agent moves on with the state the call left."""
    cluster = clusters(3, args=FAST)
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="three alive")
    entry, leaver = cluster.nodes[0], cluster.nodes[2]
    candidates = [f"slow/leave-{i}" for i in range(100)]
    agent = next(a for a, owner in ring_owners(cluster.nodes, candidates).items()
                 if owner == leaver.name)
    answers: list = []

    def call_slowly() -> None:
        with entry.client(timeout_s=10.0) as c:
            try:
                answers.append(c.call(agent, "sleep", {"s": 1.5}))
            except (RemoteError, CallTimeout) as exc:
                answers.append(exc)

    caller = threading.Thread(target=call_slowly, daemon=True)
    caller.start()
    wait_until(lambda: agents_held(leaver) == 1, timeout_s=10,
               what="the slow call has reached its owner")
    leaver.signal(signal.SIGTERM)  # leaves while the call is in its turn
    caller.join(15)
    assert leaver.proc.wait(15) == 0
    assert len(answers) == 1
    assert isinstance(answers[0], dict) and answers[0]["done"] == 1, answers[0]
    with entry.client(timeout_s=10.0) as c:  # handed off with its state after the turn
        assert c.call(agent, "sleep", {"s": 0})["done"] == 2


# --- 6. partition 3 | 2 -------------------------------------------------------------------

def faults_path(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"faults-{name}.json"


def test_partition_minority_refuses_majority_serves_then_heals(clusters, tmp_path):
    cluster = clusters(5, args=FAST,
                       node_args=lambda name: ("--faults-file", str(faults_path(tmp_path, name))))
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="five alive")
    major, minor = cluster.nodes[:3], cluster.nodes[3:]
    for side, other in ((major, minor), (minor, major)):
        for node in side:
            write_faults(faults_path(tmp_path, node.name),
                         [{"peers": names(other), "cut": True}])

    views: dict[str, dict | None] = {}

    def split_seen() -> bool:
        views.update((n.name, member_view(n)) for n in cluster.nodes)
        if any(v is None for v in views.values()):
            return False
        return (all(views[n.name]["quorate"] and all(member_states(views[n.name])[m] == "dead"
                                                     for m in names(minor)) for n in major)
                and not any(views[n.name]["quorate"] for n in minor))

    try:
        split_s = seconds_until(split_seen, CONVERGE_BOUND_S, "the 3-side holds the 2 "
                                "dead and quorate, the 2-side not quorate")
    except AssertionError as exc:  # a quorate 2-side is a split brain: show the views
        raise AssertionError(f"{exc}; last views: " + "; ".join(
            f"{name}: quorate={v and v['quorate']} {member_states(v)}"
            for name, v in views.items())) from None
    with major[0].client(timeout_s=5.0) as c:
        wait_until(lambda: all_counters_answer(c), timeout_s=CONVERGE_BOUND_S,
                   what="the 3-side serves every counter")
        read_counters(c)  # every one answers, first time
    for node in minor:
        with node.client(timeout_s=5.0) as c:
            for agent in COUNTERS:
                with pytest.raises(RemoteError) as refused:
                    c.call(agent, "get")
                assert refused.value.code == "unavailable", (node.name, agent)

    for node in cluster.nodes:
        write_faults(faults_path(tmp_path, node.name), [])
    healed_s = seconds_until(lambda: all_alive(cluster.nodes), CONVERGE_BOUND_S,
                             "one view again after the heal")
    print(f"\npartition: split seen everywhere {split_s:.2f} s after the cut; "
          f"one view (five alive, all quorate) {healed_s:.2f} s after the heal")
    with minor[0].client(timeout_s=5.0) as c:
        wait_until(lambda: all_counters_answer(c), timeout_s=CONVERGE_BOUND_S,
                   what="the healed minority serves every counter again")


# --- 7. corrupted peer messages -----------------------------------------------------------

def peer_refusals(node: NodeProcess) -> dict[str, float]:
    """Peer frames the node refused, by ``peer_*`` reason."""
    return {dict(labels)["reason"]: value
            for (name, labels), value in metric_samples(node).items()
            if name == "synthesis_limited_total"
            and dict(labels).get("reason", "").startswith("peer_")}


def test_corrupted_peer_messages_are_refused_and_invent_no_member(clusters, tmp_path):
    noisy_path = tmp_path / "faults-n4.json"
    cluster = clusters(5, args=FAST, metrics=True,
                       node_args=lambda name: ("--faults-file", str(noisy_path))
                       if name == "n4" else ())
    wait_until(lambda: all_alive(cluster.nodes), timeout_s=CONVERGE_BOUND_S,
               what="five alive")
    noisy = cluster.nodes[4]
    known = set(names(cluster.nodes))
    write_faults(noisy_path, [{"peers": ["*"], "corrupt": 0.2}], seed=7)
    owners = ring_owners(cluster.nodes)
    local = [agent for agent in COUNTERS if owners[agent] == noisy.name]
    remote = [agent for agent in COUNTERS if owners[agent] != noisy.name]
    values = dict.fromkeys(local, 0)
    invented: set[str] = set()
    forwarded: collections.Counter[str] = collections.Counter()  # outcome -> calls
    with noisy.client(timeout_s=5.0) as c:
        deadline = time.monotonic() + CORRUPTION_S
        for turn in itertools.count():
            if time.monotonic() > deadline:
                break
            for node in cluster.nodes:
                invented |= set(member_states(member_view(node))) - known
            # Client traffic passes no faults: what the noisy node owns it still serves.
            agent = local[turn % len(local)]
            values[agent] += 1
            assert c.call(agent, "incr") == {"value": values[agent]}
            # A forward can be corrupted on its way; nothing resends it (no delivery
            # layer yet), so it may time out: counted, not judged.
            forwarded[_outcome(c, remote[turn % len(remote)])] += 1
    write_faults(noisy_path, [])
    corrupted = _fault_count(noisy, "corrupt")
    healed_s = seconds_until(lambda: all_alive(cluster.nodes), CONVERGE_BOUND_S,
                             "five alive after the corruption stopped")
    refused = {node.name: peer_refusals(node) for node in cluster.nodes}
    print(f"\ncorruption: {corrupted:.0f} messages corrupted, refused as peer_* by "
          f"{refused}; {turn} calls to its own counters all answered, forwarded "
          f"ones: {dict(forwarded)}; five alive everywhere {healed_s:.2f} s after it stopped")
    assert invented == set()
    assert corrupted > 0 and sum(sum(r.values()) for r in refused.values()) > 0


def _outcome(c: Client, agent: str) -> str:
    try:
        c.call(agent, "get", timeout_s=1.0)
    except CallTimeout:
        return "timeout"
    except RemoteError as exc:
        return exc.code
    return "answered"


def _fault_count(node: NodeProcess, kind: str) -> float:
    return metric_samples(node).get(("synthesis_limited_total",
                                     (("reason", f"fault_{kind}"),)), 0.0)


def test_a_node_that_cannot_join_holds_requests_within_a_byte_bound(tmp_path):
    """A node whose seed never answers holds agent requests until it joins: at most
    64 MiB of them (the sender controls their size), the rest refused 'overloaded' at
    once, and what it held is answered 'unavailable' when the wait ends."""
    import zmq

    from protocols import wire

    node = NodeProcess("lonely", tmp_path, seeds=("127.0.0.1:1",),
                       args=("--handoff-timeout-s", "8.0"))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        node.wait_serving()
        sock.connect(f"tcp://{node.address}")
        blob = b"x" * 1_000_000  # 80 requests of about 1 MB: 80 MB > 64 MiB
        for i in range(80):
            sock.send(wire.encode(wire.request(f"r{i}", "incr", f"counter/{i}", {"b": blob})))
        codes = collections.Counter()
        deadline = time.monotonic() + 30
        while sum(codes.values()) < 80 and time.monotonic() < deadline:
            if sock.poll(1000):
                reply = wire.decode_map(sock.recv(), 1 << 20)
                codes[reply["data"]["code"]] += 1
    finally:
        sock.close()
        node.kill()
    held = 64 * (1 << 20) // 1_000_030  # envelopes a little over 1 MB each
    assert codes["overloaded"] >= 80 - held - 1 and codes["unavailable"] >= held - 1, codes
    assert sum(codes.values()) == 80, codes
