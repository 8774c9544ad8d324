"""The simulator's engine (``protocols.sim.Simulator``): virtual time, the faulty
network, crashes, pauses, partitions and timers, each held exactly.

Every simulation test trusts this engine: a simulator that delivered to a crashed
node, let a partition leak, or fired a superseded timer would pass protocols that
are wrong.  These tests drive it with tiny scripted machines, not the real ones, so
each rule is seen alone.
"""

from __future__ import annotations

import random

import pytest

from protocols import peer
from protocols.effects import (GOSSIP, HANDOFF, Answer, MembersChanged, QuorumChanged,
                               Refuted, Send, seed_id)
from protocols.machine import UnhandledEffect
from protocols.sim import NetworkConfig, SendFrames, SimulationError, Simulator


class Scripted:
    """A bare machine: records what it gets; sends and sets timers as told."""

    def __init__(self, *, deadlines=(), on_receive=None, on_tick=None):
        self.got: list[tuple[float, str, dict]] = []
        self.ticks: list[float] = []
        self.deadlines = list(deadlines)  # next_deadline() answers, first first
        self.on_receive = on_receive or (lambda sender, message, now: [])
        self.on_tick = on_tick

    def receive(self, sender, message, now):
        self.got.append((now, sender, message))
        return self.on_receive(sender, message, now)

    def tick(self, now):
        self.ticks.append(now)
        if self.deadlines and self.deadlines[0] <= now:
            self.deadlines.pop(0)
        return self.on_tick(now) if self.on_tick else []

    def next_deadline(self):
        return self.deadlines[0] if self.deadlines else None


class Started(Scripted):
    """A machine with ``start(now)``: records when it started, sends its first words."""

    def __init__(self, first=(), **kwargs):
        super().__init__(**kwargs)
        self.started: list[float] = []
        self.first = list(first)

    def start(self, now):
        self.started.append(now)
        return list(self.first)


def sim_of(*node_ids, seed=1, **kwargs):
    sim = Simulator(seed, **kwargs)
    for node_id in node_ids:
        sim.add(node_id, Scripted())
    return sim


def say(sim, sender, to, n=1):
    """Node ``sender`` sends ``n`` gossip messages {"n": i} to ``to`` (as its effects)."""
    sim.run_effects(sender, [Send(to, GOSSIP, {"n": i}) for i in range(n)])


# -- the network's configuration ----------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"drop_rate": -0.01}, {"drop_rate": 1.01},
                                    {"dup_rate": -0.01}, {"dup_rate": 1.01}])
def test_fault_rates_are_probabilities(kwargs):
    with pytest.raises(ValueError, match=r"^drop_rate and dup_rate are probabilities in \[0, 1\]$"):
        NetworkConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"delay_min_s": -0.001},
                                    {"delay_min_s": 0.02, "delay_max_s": 0.01}])
def test_delays_must_be_ordered_and_not_negative(kwargs):
    with pytest.raises(ValueError, match=r"^need 0 <= delay_min_s <= delay_max_s$"):
        NetworkConfig(**kwargs)


def test_the_extremes_of_each_fault_are_allowed():
    NetworkConfig(drop_rate=0.0, dup_rate=1.0, delay_min_s=0.0, delay_max_s=0.0)
    NetworkConfig(drop_rate=1.0, dup_rate=0.0, delay_min_s=0.005, delay_max_s=0.005)


# -- delivery -----------------------------------------------------------------------


def test_a_message_arrives_once_after_a_delay_in_range_as_a_copy():
    sim = sim_of("a", "b", network=NetworkConfig(delay_min_s=0.002, delay_max_s=0.004))
    message = {"hello": [1, 2]}
    sim.run_effects("a", [Send("b", GOSSIP, message)])
    assert sim.pending() == 1 and 0.002 <= sim.next_event_at() <= 0.004
    sim.run_until(1.0)
    [(at, sender, got)] = sim.machine("b").got
    assert 0.002 <= at <= 0.004 and sender == "a"
    assert got == message and got is not message  # framed and decoded: nothing shared
    assert (sim.stats.sent, sim.stats.delivered, sim.stats.dropped) == (1, 1, 0)
    assert sim.now == 1.0  # the clock ends at t even when idle before it


def test_delays_come_from_the_seeded_rng_alone_when_there_are_no_faults():
    """No fault configured, no random draw for it: the delays are the seed's first
    uniforms, so adding a fault rate of 0 changes no run."""
    sim = sim_of("a", "b", seed=7)
    say(sim, "a", "b", n=3)
    expected = random.Random(7)
    assert sorted(at for at, *_ in sim._queue) == sorted(
        expected.uniform(0.001, 0.010) for _ in range(3))


def test_drop_rate_one_loses_everything_and_counts_it():
    sim = sim_of("a", "b", network=NetworkConfig(drop_rate=1.0))
    say(sim, "a", "b", n=5)
    sim.run_until(1.0)
    assert sim.machine("b").got == []
    assert (sim.stats.sent, sim.stats.dropped, sim.stats.delivered) == (5, 5, 0)


def test_dup_rate_one_delivers_every_message_twice():
    sim = sim_of("a", "b", network=NetworkConfig(dup_rate=1.0))
    say(sim, "a", "b", n=3)
    sim.run_until(1.0)
    assert sorted(m["n"] for _, _, m in sim.machine("b").got) == [0, 0, 1, 1, 2, 2]
    assert (sim.stats.duplicated, sim.stats.delivered) == (3, 6)


def test_some_loss_loses_some():
    sim = sim_of("a", "b", network=NetworkConfig(drop_rate=0.5))
    say(sim, "a", "b", n=400)
    sim.run_until(1.0)
    assert 100 < sim.stats.dropped < 300
    assert sim.stats.dropped + sim.stats.delivered == 400


def test_a_seed_address_reaches_whoever_is_at_it():
    sim = Simulator(1)
    sim.add("a", Scripted())
    sim.add("b", Scripted(), address="127.0.0.1:7001")
    assert sim.address_of("b") == "127.0.0.1:7001" and sim.address_of("a") == "a"
    sim.run_effects("a", [Send(seed_id("127.0.0.1:7001"), GOSSIP, {"join": 1})])
    sim.run_until(1.0)
    assert [m for _, _, m in sim.machine("b").got] == [{"join": 1}]


def test_a_message_to_nobody_is_undeliverable():
    sim = sim_of("a")
    say(sim, "a", "ghost", n=2)
    sim.run_effects("a", [Send(seed_id("10.9.9.9:1"), GOSSIP, {"join": 1})])  # no one there
    sim.run_until(1.0)
    assert (sim.stats.sent, sim.stats.undeliverable, sim.stats.delivered) == (3, 3, 0)


def test_without_the_wire_round_trip_gossip_is_handed_over_as_is():
    sim = sim_of("a", "b", wire_roundtrip=False)
    message = {"x": 1}
    sim.run_effects("a", [Send("b", GOSSIP, message)])
    sim.run_until(1.0)
    [(_, sender, got)] = sim.machine("b").got
    assert got is message and sender == "a"
    with pytest.raises(SimulationError, match="without the wire round trip only 'gossip' is "
                                              "carried, not 'handoff'"):
        sim.run_effects("a", [Send("b", HANDOFF, {"x": 1})])


def test_a_bare_machine_takes_gossip_frames_only():
    sim = sim_of("a", "b", answers=lambda node_id, effect: None)
    frames = peer.encode(HANDOFF, "a", {"op": "want"})
    sim.run_effects("a", [SendFrames("b", frames)])
    kind = type(peer.decode(frames)).__name__
    with pytest.raises(SimulationError, match=f"^b is a bare machine: it takes gossip, not {kind}$"):
        sim.run_until(1.0)


class WholeNode(Scripted):
    """A machine that decodes its own frames, as ``SimNode`` does."""

    def receive_frames(self, frames, now):
        self.got.append((now, "", frames))
        return []


def test_a_whole_node_gets_the_frames_themselves_and_the_time():
    sim = Simulator(1, answers=lambda node_id, effect: None)
    sim.add("a", Scripted())
    sim.add("b", WholeNode())
    frames = peer.encode(HANDOFF, "a", {"op": "want"})
    sim.run_effects("a", [SendFrames("b", frames), Send("b", GOSSIP, {"n": 1})])
    sim.run_until(1.0)
    got = sorted(sim.machine("b").got, key=lambda g: len(g[2][1]))
    assert [g[2] for g in got] == sorted([frames, peer.encode(GOSSIP, "a", {"n": 1})],
                                         key=lambda f: len(f[1]))
    assert all(0.001 <= at <= 0.010 for at, _, _ in got)


def test_frames_sent_inside_a_partition_group_arrive():
    sim = Simulator(1, answers=lambda node_id, effect: None)
    sim.add("a", Scripted())
    sim.add("b", WholeNode())
    sim.add("c", Scripted())
    sim.partition(["a", "b"], ["c"])
    sim.run_effects("a", [SendFrames("b", peer.encode(HANDOFF, "a", {"op": "want"}))])
    sim.run_until(1.0)
    assert len(sim.machine("b").got) == 1 and sim.stats.partitioned == 0


def test_frames_sent_across_a_partition_are_lost_like_any_message():
    sim = Simulator(1, answers=lambda node_id, effect: None)
    sim.add("a", Scripted())
    sim.add("b", WholeNode())
    sim.partition(["a"], ["b"])
    sim.run_effects("a", [SendFrames("b", peer.encode(HANDOFF, "a", {"op": "want"}))])
    sim.run_until(1.0)
    assert sim.machine("b").got == [] and sim.stats.partitioned == 1


# -- topology -----------------------------------------------------------------------


def test_node_ids_and_addresses_are_unique():
    sim = Simulator(1)
    sim.add("a", Scripted(), address="x:1")
    with pytest.raises(ValueError, match=r"^node 'a' already in the simulation$"):
        sim.add("a", Scripted())
    with pytest.raises(ValueError, match=r"^address 'x:1' already in the simulation$"):
        sim.add("b", Scripted(), address="x:1")
    assert sim.node_ids == ["a"]


def test_a_partition_keeps_messages_inside_groups_until_healed():
    sim = sim_of("a", "b", "c", "d")
    sim.partition(["a", "b"], ["c"])  # d is left out: a group of its own (with others left out)
    assert sim.connected("a", "b") and not sim.connected("a", "c")
    assert not sim.connected("c", "d") and not sim.connected("a", "d") and sim.connected("d", "d")
    for to in ("b", "c", "d"):
        say(sim, "a", to)
    sim.run_until(1.0)
    assert [len(sim.machine(n).got) for n in "bcd"] == [1, 0, 0]
    assert sim.stats.partitioned == 2
    sim.heal()
    assert sim.connected("a", "c")
    say(sim, "a", "c")
    sim.run_until(2.0)
    assert len(sim.machine("c").got) == 1


def test_nodes_left_out_of_every_group_form_one_group():
    sim = sim_of("a", "b", "c")
    sim.partition(["a"])
    assert sim.connected("b", "c") and not sim.connected("a", "b")


def test_a_node_in_two_partition_groups_is_refused():
    sim = sim_of("a", "b")
    with pytest.raises(ValueError, match=r"^'a' is in two partition groups$"):
        sim.partition(["a"], ["b", "a"])


def test_a_partition_that_starts_while_a_message_flies_drops_it_on_arrival():
    sim = sim_of("a", "b")
    say(sim, "a", "b")
    sim.partition(["a"], ["b"])
    sim.run_until(1.0)
    assert sim.machine("b").got == [] and sim.stats.partitioned == 1


# -- crashes and restarts -------------------------------------------------------------


def test_a_crashed_node_gets_no_messages_and_no_timers():
    sim = Simulator(1)
    sim.add("a", Scripted())
    sim.add("b", Scripted(deadlines=[0.5]))
    say(sim, "a", "b")
    sim.crash("b")
    assert not sim.is_up("b") and sim.up_ids() == ["a"]
    sim.run_until(1.0)
    assert sim.machine("b").got == [] and sim.machine("b").ticks == []
    assert sim.stats.undeliverable == 1


def test_restart_puts_a_fresh_machine_in_place_and_starts_it():
    sim = Simulator(1)
    sim.add("a", Started())
    sim.run_until(0.1)
    with pytest.raises(SimulationError, match=r"^a is up: crash it before restarting it$"):
        sim.restart("a", Started())
    sim.crash("a")
    fresh = Started()
    sim.restart("a", fresh, start_at=0.5)
    assert sim.is_up("a") and sim.machine("a") is fresh
    sim.run_until(1.0)
    assert fresh.started == [0.5]


def test_a_timer_set_before_a_crash_never_fires_after_the_restart():
    sim = Simulator(1)
    old = Scripted(deadlines=[0.5])
    sim.add("a", old)
    sim.run_until(0.1)
    sim.crash("a")
    fresh = Scripted(deadlines=[0.5])  # the same deadline: only the incarnation differs
    sim.restart("a", fresh)
    sim.run_until(1.0)
    assert old.ticks == [] and fresh.ticks == [0.5]


def test_a_start_scheduled_before_a_crash_does_not_run():
    sim = Simulator(1)
    machine = Started()
    sim.add("a", machine, start_at=0.5)
    sim.crash("a")
    sim.run_until(1.0)
    assert machine.started == []


def test_only_the_last_incarnation_starts_after_crashes_in_a_row():
    """Each crash makes the starts scheduled before it void, however many crashes."""
    sim = Simulator(1)
    sim.add("a", Started(), start_at=0.5)
    sim.crash("a")
    sim.restart("a", Started(), start_at=0.6)
    sim.crash("a")
    sim.restart("a", Started(), start_at=0.7)
    sim.crash("a")
    last = Started()
    sim.restart("a", last, start_at=0.9)
    sim.run_until(1.0)
    assert last.started == [0.9]


def test_a_node_crashed_by_its_own_event_keeps_no_timer():
    sim = Simulator(1)
    sim.add("a", Scripted(deadlines=[0.5]))
    sim.run_until(0.1)
    machine = sim.machine("a")
    sim.inject("a", lambda machine, now: sim.crash("a") or [])
    sim.run_until(0.1)
    assert sim.pending() == 1  # the timer armed before the crash, void when due; no new one
    sim.run_until(1.0)
    assert machine.ticks == [] and sim.pending() == 0


def test_a_crash_forgets_what_a_paused_node_held():
    sim = sim_of("a", "b")
    sim.pause("b")
    say(sim, "a", "b")
    sim.run_until(0.5)
    sim.crash("b")
    assert not sim.is_paused("b")
    sim.restart("b", Scripted())
    sim.run_until(1.0)
    assert sim.machine("b").got == []


# -- pauses -------------------------------------------------------------------------


def test_a_paused_node_holds_its_events_and_runs_them_in_order_on_resume():
    sim = Simulator(1, NetworkConfig(delay_min_s=0.01, delay_max_s=0.01))  # arrival = send order
    sim.add("a", Scripted())
    b = Scripted(deadlines=[0.2])
    sim.add("b", b)
    sim.pause("b")
    assert sim.is_paused("b") and "b" in sim.up_ids()
    say(sim, "a", "b", n=3)
    sim.run_until(0.5)
    assert b.got == [] and b.ticks == []
    assert sim.stats.deferred == 4  # three messages and one timer
    sim.resume("b")
    sim.run_until(0.5)
    assert [m["n"] for _, _, m in b.got] == [0, 1, 2]
    assert all(at == 0.5 for at, _, _ in b.got)
    assert b.ticks == [0.5]  # the timer fired once, late, not once per hold


def test_resume_of_a_node_not_paused_and_pause_of_a_crashed_node_do_nothing():
    sim = sim_of("a", "b")
    sim.add("c", Scripted(deadlines=[0.5]))
    before = (sim.digest(), sim.pending())
    sim.resume("c")
    assert (sim.digest(), sim.pending()) == before and not sim.is_paused("c")
    sim.crash("b")
    sim.pause("b")
    assert not sim.is_paused("b")
    sim.resume("b")
    assert not sim.is_up("b")


def test_a_call_to_a_paused_node_waits_and_one_to_a_crashed_node_is_lost():
    sim = sim_of("a", "b")
    calls, lost = [], []
    sim.pause("a")
    sim.inject("a", lambda machine, now: calls.append(now) or [], lost=lambda: lost.append("a"))
    sim.crash("b")
    sim.inject("b", lambda machine, now: calls.append(now) or [], lost=lambda: lost.append("b"))
    sim.inject("b", lambda machine, now: calls.append(now) or [])  # no lost(): nothing runs
    sim.run_until(0.3)
    assert calls == [] and lost == ["b"]
    sim.resume("a")
    sim.run_until(0.3)
    assert calls == [0.3]


def test_a_call_runs_on_the_node_s_machine_now():
    sim = sim_of("a")
    seen = []
    sim.run_until(0.2)
    sim.inject("a", lambda machine, now: seen.append((machine, now)) or [])
    sim.run_until(0.2)
    assert seen == [(sim.machine("a"), 0.2)]


def test_a_start_due_while_paused_runs_on_resume():
    sim = Simulator(1)
    machine = Started()
    sim.add("a", machine, start_at=0.1)
    sim.pause("a")
    sim.run_until(0.4)
    assert machine.started == []
    sim.resume("a")
    sim.run_until(0.4)
    assert machine.started == [0.4]


# -- timers -------------------------------------------------------------------------


def test_tick_runs_at_each_next_deadline_once():
    sim = Simulator(1)
    machine = Scripted(deadlines=[0.25, 0.5, 0.75])
    sim.add("a", machine)
    sim.run_until(1.0)
    assert machine.ticks == [0.25, 0.5, 0.75]
    assert sim.stats.ticks == 3 and sim.next_event_at() is None


def test_a_deadline_in_the_past_ticks_now():
    sim = Simulator(1)
    sim.run_until(2.0)
    machine = Scripted(deadlines=[1.0])
    sim.add("a", machine)
    sim.run_until(3.0)
    assert machine.ticks == [2.0]


def test_a_later_deadline_supersedes_the_earlier_timer():
    sim = sim_of("a")
    b = Scripted(deadlines=[0.5])
    b.on_receive = lambda sender, message, now: b.deadlines.__setitem__(0, 0.8) or []
    sim.add("b", b)
    say(sim, "a", "b")
    sim.run_until(1.0)
    assert b.ticks == [0.8]


def test_a_tick_that_does_nothing_while_its_deadline_stays_due_is_a_broken_machine():
    sim = Simulator(1)
    stuck = Scripted(deadlines=[0.1])
    stuck.tick = lambda now: []  # never moves its deadline on
    sim.add("a", stuck)
    with pytest.raises(SimulationError, match=r"^a: tick\(0\.1\) did nothing but "
                                              r"next_deadline\(\) is still 0\.1$"):
        sim.run_until(1.0)


def test_a_tick_with_effects_may_keep_its_deadline_due():
    sim = sim_of("b")
    sends = Scripted(deadlines=[0.1])
    count = []

    def tick(now):
        count.append(now)
        if len(count) == 3:
            sends.deadlines.clear()
        return [Send("b", GOSSIP, {"t": len(count)})]
    sends.tick = tick
    sim.add("a", sends)
    sim.run_until(1.0)
    assert count == [0.1, 0.1, 0.1] and len(sim.machine("b").got) == 3


# -- machines with start, calls, observers, effects -------------------------------------


def test_start_runs_at_start_at_or_now_and_its_effects_are_carried_out():
    sim = Simulator(1)
    sim.add("b", Scripted())
    sim.run_until(0.2)
    early = Started(first=[Send("b", GOSSIP, {"hi": "early"})])
    sim.add("a", early, start_at=0.1)  # in the past: starts now
    late = Started()
    sim.add("c", late, start_at=0.7)
    sim.run_until(1.0)
    assert early.started == [0.2] and late.started == [0.7]
    assert [m for _, _, m in sim.machine("b").got] == [{"hi": "early"}]


def test_observers_see_every_step_that_ran_a_machine():
    sim = sim_of("a", "b")
    seen = []
    sim.observe(lambda s, node_id, effects: seen.append((s.now, node_id, list(effects))))
    reply = Send("a", GOSSIP, {"pong": 1})
    sim.machine("b").on_receive = lambda sender, message, now: [reply]
    say(sim, "a", "b")  # run_effects: observed too
    sim.run_until(1.0)
    assert [(n, e) for _, n, e in seen] == [("a", [Send("b", GOSSIP, {"n": 0})]),
                                            ("b", [reply]), ("a", [])]


def test_events_due_at_one_time_run_in_the_order_they_were_scheduled():
    sim = Simulator(1)
    ran = []
    for name in "abcde":
        sim.at(0.5, lambda s, name=name: ran.append(name))
    sim.run_until(1.0)
    assert ran == list("abcde")


def test_step_says_whether_it_ran_an_event_of_any_kind():
    sim = Simulator(1, NetworkConfig(delay_min_s=0.1, delay_max_s=0.1))
    sim.add("a", Scripted())
    sim.add("b", Scripted())
    sim.at(0.05, lambda s: None)
    say(sim, "a", "b")
    say(sim, "a", "ghost")
    assert [sim.step(), sim.step(), sim.step(), sim.step()] == [True, True, True, False]
    assert sim.stats.steps == 3  # the action, the delivery, the undeliverable message


def test_an_action_runs_at_its_time_and_never_in_the_past():
    sim = Simulator(1)
    ran = []
    sim.at(0.3, lambda s: ran.append(s.now))
    sim.run_until(0.5)
    sim.at(0.1, lambda s: ran.append(s.now))
    sim.run_until(0.6)
    assert ran == [0.3, 0.5]


def test_membership_effects_are_recorded_and_logged():
    sim = sim_of("a")
    change = MembersChanged({"a": "127.0.0.1:1"})
    refuted, quorum = Refuted("x:1", 3, 4), QuorumChanged(False, 1, 3)
    sim.run_effects("a", [change, refuted, quorum])
    assert sim.changes == [(0.0, "a", change)]
    assert sim.effects_log == [(0.0, "a", refuted), (0.0, "a", quorum)]
    sim.record_changes = False
    sim.run_effects("a", [change])
    assert len(sim.changes) == 1


def test_answers_are_unhandled_without_clients_and_go_to_them_with():
    with pytest.raises(UnhandledEffect):
        sim_of("a").run_effects("a", [Answer("h", "r1", 1)])
    got = []
    sim = sim_of("a", answers=lambda node_id, effect: got.append((node_id, effect)))
    sim.run_effects("a", [Answer("h", "r1", 1)])
    assert got == [("a", Answer("h", "r1", 1))]


def test_a_simulator_is_strict_unless_told_otherwise():
    def broken(sender, message, now):
        raise RuntimeError("bad gossip")

    sim = sim_of("a")
    sim.add("b", Scripted(on_receive=broken))
    say(sim, "a", "b")
    with pytest.raises(RuntimeError, match="bad gossip"):
        sim.run_until(1.0)


def test_a_machine_error_raises_when_strict_and_is_counted_when_not():
    def broken(sender, message, now):
        raise RuntimeError("bad gossip")

    for strict in (True, False):
        sim = sim_of("a", strict=strict)
        sim.add("b", Scripted(on_receive=broken))
        say(sim, "a", "b", n=2)
        if strict:
            with pytest.raises(RuntimeError, match="bad gossip"):
                sim.run_until(1.0)
        else:
            sim.run_until(1.0)
            assert sim.stats.errors == 2 and [n for _, n, _ in sim.errors] == ["b", "b"]


# -- running --------------------------------------------------------------------------


def test_run_until_runs_events_due_at_t_and_stops_when_asked():
    sim = Simulator(1)
    ran = []
    for t in (0.1, 0.2, 0.3):
        sim.at(t, lambda s: ran.append(s.now))
    assert sim.run_until(0.2) is False and ran == [0.1, 0.2] and sim.now == 0.2
    assert sim.run_until(9.0, stop=lambda s: s.now >= 0.3) is True
    assert ran == [0.1, 0.2, 0.3] and sim.now == 0.3  # stopped early: the clock stays
    assert sim.step() is False  # idle


def test_max_steps_bounds_a_run():
    sim = Simulator(5)
    for t in (0.1, 0.2, 0.3):
        sim.at(t, lambda s: None)
    with pytest.raises(ValueError, match=r"^more than 2 steps before t=1\.0 \(seed 5\)$"):
        sim.run_until(1.0, max_steps=2)
    assert sim.stats.steps == 2


def test_a_run_of_exactly_max_steps_is_within_the_bound():
    sim = Simulator(5)
    for t in (0.1, 0.2):
        sim.at(t, lambda s: None)
    assert sim.run_until(1.0, max_steps=2) is False and sim.now == 1.0


def test_run_for_runs_relative_to_now():
    sim = Simulator(1)
    sim.run_until(1.0)
    ran = []
    sim.at(1.4, lambda s: ran.append(s.now))
    sim.at(1.6, lambda s: ran.append(s.now))
    sim.run_for(0.5)
    assert ran == [1.4] and sim.now == 1.5
    assert sim.run_for(5.0, stop=lambda s: bool(ran[1:])) is True and sim.now == 1.6


def _run(seed, drop_rate=0.2):
    sim = Simulator(seed, NetworkConfig(drop_rate=drop_rate, dup_rate=0.2))
    for node_id in "abc":
        sim.add(node_id, Scripted(deadlines=[0.05]))
    for sender in "abc":
        for to in "abc":
            say(sim, sender, to, n=4)
    sim.crash("c")
    sim.run_until(1.0)
    return sim


def _digest_after(action):
    sim = sim_of("a", "b")
    action(sim)
    return sim.digest()


def test_every_fault_action_leaves_its_own_mark_in_the_digest():
    """Two runs that differ only in which node a fault hit, or which groups a
    partition made, must not look the same."""
    def crashed(node_id):
        return lambda sim: sim.crash(node_id)

    def paused_and_resumed(node_id):
        return lambda sim: (sim.pause(node_id), sim.resume(node_id))

    def restarted(node_id):
        return lambda sim: (sim.crash(node_id), sim.restart(node_id, Scripted()))

    digests = [_digest_after(action) for action in (
        crashed("a"), crashed("b"), paused_and_resumed("a"), paused_and_resumed("b"),
        lambda sim: sim.pause("a"), lambda sim: sim.pause("b"),
        restarted("a"), restarted("b"),
        lambda sim: sim.partition(["a"], ["b"]), lambda sim: sim.partition(["a", "b"]),
        lambda sim: (sim.partition(["a"]), sim.heal()), lambda sim: None)]
    assert len(set(digests)) == len(digests)
    both_down = [_digest_after(lambda sim, n=n: (sim.crash("a"), sim.crash("b"),
                                                 sim.restart(n, Scripted()))) for n in "ab"]
    both_paused = [_digest_after(lambda sim, n=n: (sim.pause("a"), sim.pause("b"),
                                                   sim.resume(n))) for n in "ab"]
    assert both_down[0] != both_down[1] and both_paused[0] != both_paused[1]


def test_the_same_seed_gives_the_same_run_to_the_byte():
    assert _run(3).digest() == _run(3).digest()
    assert _run(3).digest() != _run(4).digest()
    assert _run(3).digest() != _run(3, drop_rate=0.5).digest()
    assert _run(3).stats == _run(3).stats
