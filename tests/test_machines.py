"""Routing, status collection and shutdown as pure machines: no sockets, no clocks.

Each test drives one machine with made-up times and checks what it asks for.
"""

from __future__ import annotations

import random

import pytest

from protocols.effects import STATUS_QUERY, Answer, Fail, Send, Unresponsive
from protocols.machine import Effects, UnhandledEffect
from protocols.routing import FORWARDS_MAX, Refusal, Router
from protocols.shutdown import CLOSED, CLOSING, DRAINING, FORWARDS, Phase, Shutdown
from protocols.status import StatusCollector, StatusError
from protocols.wire import ErrorCode

KEY = b"k" * 8
TIMEOUT_S = 5.0


def router(node_id="a", members=("a", "b", "c"), **kw) -> Router:
    r = Router(node_id, KEY, max_hops=kw.pop("max_hops", 2), forward_timeout_s=TIMEOUT_S, **kw)
    r.members_changed(members)
    return r


def subject_owned_by(r: Router, owner: str) -> str:
    for i in range(10_000):
        if r.route(f"counter/{i}", None, 0) == owner:
            return f"counter/{i}"
    raise AssertionError(f"no subject owned by {owner}")


# --------------------------------------------------------------------------- routing


def test_route_names_the_ring_owner_and_every_node_agrees():
    a, b = router("a"), router("b")
    for i in range(200):
        assert a.route(f"kv/{i}", None, 0) == b.route(f"kv/{i}", None, 0)


def test_hop_limit_and_ttl():
    r = router()
    remote = subject_owned_by(r, "b")
    assert r.route(remote, None, 1) == "b"             # max_hops 2: one more hop allowed
    assert isinstance(r.route(remote, None, 2), Refusal)
    refusal = r.route(remote, 0, 0)                    # ttl 0: the entry node must own it
    assert refusal.code == "unavailable" and "hop limit (0)" in refusal.message
    assert r.route(remote, 1, 0) == "b"
    local = subject_owned_by(r, "a")
    assert r.route(local, 0, 5) == "a"                 # a local agent needs no hop


def test_a_forward_is_answered_once_by_its_reply():
    r = router()
    token = r.forward_started("client-1", "req-1", "incr", "b", now=10.0, arrived=9.9)
    assert len(token) == 16 and r.owns_token(token) and r.in_flight == 1
    pending = r.reply_arrived(token)
    assert (pending.handle, pending.request_id, pending.arrived) == ("client-1", "req-1", 9.9)
    assert r.reply_arrived(token) is None and r.late_replies == 1   # a duplicate reply
    assert r.tick(10.0 + TIMEOUT_S + 1) == []                       # and no timeout later
    assert r.in_flight == 0 and r.next_deadline() is None


def test_a_silent_owner_is_answered_timeout_by_the_entry_node():
    r = router()
    t1 = r.forward_started("c1", "r1", "incr", "b", now=0.0, arrived=0.0)
    r.forward_started("c2", "r2", "incr", "c", now=1.0, arrived=1.0)
    assert r.next_deadline() == TIMEOUT_S
    assert r.tick(TIMEOUT_S - 0.001) == []
    [fail, silent] = r.tick(TIMEOUT_S)
    assert (fail.handle, fail.request_id, fail.code) == ("c1", "r1", "timeout")
    assert silent == Unresponsive("b")  # what waits on the way to b can be dropped
    assert r.next_deadline() == 1.0 + TIMEOUT_S
    assert r.reply_arrived(t1) is None  # the owner answering late changes nothing


def test_a_forward_given_longer_ends_at_its_own_deadline_and_only_once():
    """A piece of a pipeline or scatter waits for its request's deadline, beyond the
    forward timeout; the usual forwards time out around it as before."""
    r = router()
    long = r.forward_started("p", "r1", "t", "b", now=0.0, arrived=0.0, timeout_s=20.0)
    short = r.forward_started("s", "r2", "t", "b", now=1.0, arrived=1.0, timeout_s=2.0)
    r.forward_started("d", "r3", "t", "c", now=2.0, arrived=2.0)
    assert r.in_flight == 3 and r.next_deadline() == 1.0 + TIMEOUT_S  # 2 s is no longer
    first = r.tick(2.0 + TIMEOUT_S)
    assert [f.handle for f in first if type(f) is Fail] == ["s", "d"]
    assert r.next_deadline() == 20.0
    assert r.tick(19.9) == []
    [fail] = r.tick(20.0)
    assert (fail.handle, fail.code) == ("p", "timeout") and r.in_flight == 0
    assert r.reply_arrived(long) is None and r.reply_arrived(short) is None
    assert r.next_deadline() is None


def test_forwards_given_longer_end_on_reply_leave_and_stop():
    r = router()
    t1 = r.forward_started("p1", "r1", "t", "b", now=0.0, arrived=0.0, timeout_s=60.0)
    r.forward_started("p2", "r2", "t", "c", now=0.0, arrived=0.0, timeout_s=60.0)
    r.forward_started("p3", "r3", "t", "b", now=0.0, arrived=0.0, timeout_s=60.0)
    assert r.reply_arrived(t1).handle == "p1"
    [gone] = r.members_changed(("a", "b"))
    assert (gone.handle, gone.code) == ("p2", "unavailable")
    [stopped] = r.stop()
    assert stopped.handle == "p3" and r.in_flight == 0 and r.next_deadline() is None
    assert r.tick(100.0) == []


def test_forwards_to_an_owner_that_left_are_answered_unavailable():
    r = router()
    r.forward_started("c1", "r1", "get", "b", now=0.0, arrived=0.0)
    r.forward_started("c2", "r2", "get", "c", now=0.0, arrived=0.0)
    [fail] = r.members_changed(["a", "c"])
    assert (fail.request_id, fail.code) == ("r1", "unavailable")
    assert r.in_flight == 1


def test_a_send_the_transport_gave_up_is_answered_with_its_code():
    r = router()
    token = r.forward_started("c1", "r1", "get", "b", now=0.0, arrived=0.0)
    [fail] = r.send_failed(token, "overloaded", "queue to b is full")
    assert fail.code == "overloaded"
    assert r.send_failed(token, "unavailable", "again") == []   # once only
    assert r.tick(100.0) == []


def test_stop_answers_everything_in_flight_and_then_nothing_remains():
    r = router()
    for i in range(5):
        r.forward_started(f"c{i}", f"r{i}", "get", "b", now=float(i), arrived=0.0)
    fails = r.stop()
    assert sorted(f.request_id for f in fails) == [f"r{i}" for i in range(5)]
    assert {f.code for f in fails} == {"unavailable"}
    assert r.in_flight == 0 and r.tick(1e9) == [] and r.next_deadline() is None


def test_tokens_are_unique_and_foreign_ones_are_not_ours():
    r = router()
    tokens = {r.forward_started("c", str(i), "get", "b", 0.0, 0.0) for i in range(1000)}
    assert len(tokens) == 1000
    other = Router("b", b"o" * 8, max_hops=2, forward_timeout_s=1.0)
    foreign = other.forward_started("c", "x", "get", "a", 0.0, 0.0)
    assert not r.owns_token(foreign) and r.reply_arrived(foreign) is None


def test_answered_forwards_behind_a_slow_one_are_not_kept():
    """One forward waiting on a frozen owner must not pin every later, answered one
    (a deadline queue separate from the table did, by the thousands per second)."""
    r = router()
    r.forward_started("slow", "s", "get", "b", now=0.0, arrived=0.0)
    for i in range(10_000):
        r.reply_arrived(r.forward_started("c", str(i), "get", "c", now=1.0, arrived=1.0))
    assert r.in_flight == 1 and len(r._pending) == 1
    assert r.next_deadline() == TIMEOUT_S


def test_forwards_in_flight_are_bounded_in_bytes():
    r = router(forward_bytes_max=3 << 20)
    t1 = r.forward_started("c", "1", "put", "b", 0.0, 0.0, nbytes=1 << 20)
    r.forward_started("c", "2", "put", "b", 0.0, 0.0, nbytes=2 << 20)
    refusal = r.forward_started("c", "3", "put", "b", 0.0, 0.0, nbytes=1)
    assert isinstance(refusal, Refusal) and refusal.code == "overloaded"
    r.reply_arrived(t1)                    # an answer frees its bytes
    assert isinstance(r.forward_started("c", "4", "put", "b", 0.0, 0.0, nbytes=1 << 20), bytes)
    r.tick(TIMEOUT_S)                      # and so does a timeout
    assert r.bytes_in_flight == 0 and r.in_flight == 0


def test_the_forward_table_is_bounded():
    r = router(forwards_max=3)
    for i in range(3):
        assert isinstance(r.forward_started("c", str(i), "get", "b", 0.0, 0.0), bytes)
    refusal = r.forward_started("c", "x", "get", "b", 0.0, 0.0)
    assert isinstance(refusal, Refusal) and refusal.code == "overloaded"
    assert FORWARDS_MAX >= 10_000


def test_every_forward_ends_exactly_once_whatever_the_interleaving():
    """Random replies, give-ups, departures, ticks and a final stop: each request id
    gets exactly one end, and the table is empty afterwards."""
    for seed in range(30):
        rng = random.Random(seed)
        r = router()
        tokens, ended = {}, []
        now = 0.0
        for step in range(300):
            now += rng.uniform(0, 0.2)
            roll = rng.random()
            if roll < 0.4:
                rid = f"r{step}"
                tokens[rid] = r.forward_started("c", rid, "get", rng.choice("bc"), now, now)
            elif roll < 0.6 and tokens:
                rid = rng.choice(sorted(tokens))
                pending = r.reply_arrived(tokens[rid])
                if pending is not None:
                    ended.append(pending.request_id)
            elif roll < 0.7 and tokens:
                rid = rng.choice(sorted(tokens))
                ended += [f.request_id for f in r.send_failed(tokens[rid], "overloaded", "x")]
            elif roll < 0.75:
                ended += [f.request_id for f in r.members_changed(rng.choice([("a", "b"), ("a", "b", "c")]))]
            else:
                ended += [f.request_id for f in r.tick(now) if isinstance(f, Fail)]
        ended += [f.request_id for f in r.stop()]
        assert sorted(ended) == sorted(tokens), f"seed={seed}"
        assert r.in_flight == 0


# --------------------------------------------------------------------------- status


MEMBERS = {"a": "tcp://a:1", "b": "tcp://b:1", "c": "tcp://c:1"}


def test_status_asks_every_other_member_and_answers_when_all_did():
    s = StatusCollector("a", timeout_s=1.0)
    effects = s.start("client", "q1", {"node": "a"}, MEMBERS, now=0.0)
    assert effects == [Send("b", STATUS_QUERY, "1"), Send("c", STATUS_QUERY, "1")]
    assert s.receive("b", {"token": "1", "status": {"node": "b", "agents": 2}}, 0.1) == []
    [answer] = s.receive("c", {"token": "1", "status": {"node": "c"}}, 0.2)
    assert isinstance(answer, Answer) and answer.handle == "client"
    assert [row["node"] for row in answer.data["members"]] == ["a", "b", "c"]
    assert s.in_flight == 0 and s.next_deadline() is None


def test_status_answers_at_its_deadline_with_unreachable_rows():
    s = StatusCollector("a", timeout_s=1.0)
    s.start("client", "q1", {"node": "a"}, MEMBERS, now=0.0)
    s.receive("b", {"token": "1", "status": {"node": "b"}}, 0.5)
    assert s.next_deadline() == 1.0 and s.tick(0.99) == []
    [answer] = s.tick(1.0)
    rows = {row["node"]: row for row in answer.data["members"]}
    assert rows["c"] == {"node": "c", "address": "tcp://c:1", "reachable": False}
    assert s.receive("c", {"token": "1", "status": {"node": "c"}}, 1.5) == []  # too late


def test_a_lone_node_answers_at_once():
    [answer] = StatusCollector("a", 1.0).start("h", "q", {"node": "a"}, {"a": "x"}, 0.0)
    assert answer.data == {"node": "a", "members": [{"node": "a"}]}


def test_status_collections_are_bounded():
    s = StatusCollector("a", timeout_s=1.0, waits_max=2)
    s.start("h", "1", {}, MEMBERS, 0.0)
    s.start("h", "2", {}, MEMBERS, 0.0)
    [fail] = s.start("h", "3", {}, MEMBERS, 0.0)
    assert isinstance(fail, Fail) and fail.code == "overloaded"
    s.tick(1.0)  # the deadline frees both slots
    assert isinstance(s.start("h", "4", {}, MEMBERS, 1.0)[0], Send)


@pytest.mark.parametrize("sender, message", [
    ("b", "not a map"),
    ("b", {"token": 1, "status": {}}),
    ("b", {"token": "1", "status": []}),
    ("b", {"token": "1", "status": {"node": "c"}}),   # b answering as c
    ("z", {"token": "1", "status": {"node": "z"}}),   # nobody asked z
])
def test_bad_status_answers_are_protocol_errors_and_change_nothing(sender, message):
    s = StatusCollector("a", timeout_s=1.0)
    s.start("h", "q", {"node": "a"}, MEMBERS, 0.0)
    with pytest.raises(StatusError):
        s.receive(sender, message, 0.1)
    assert s.in_flight == 1


def test_stop_answers_open_collections():
    s = StatusCollector("a", timeout_s=1.0)
    s.start("h", "q", {"node": "a"}, MEMBERS, 0.0)
    [answer] = s.stop()
    assert answer.request_id == "q" and s.in_flight == 0


# --------------------------------------------------------------------------- shutdown


def test_shutdown_runs_its_phases_in_order_as_work_completes():
    sd = Shutdown(timeout_s=5.0)
    assert sd.begin(10.0) == [Phase(DRAINING)] and sd.next_deadline() == 15.0
    assert sd.forwards_settled(11.0) == []       # not before the agents are idle
    assert sd.agents_idle(11.0) == [Phase(FORWARDS)]
    assert sd.forwards_settled(12.0) == [Phase(CLOSING)]
    assert sd.next_deadline() is None
    assert sd.closed() == [Phase(CLOSED)]
    assert sd.begin(20.0) == [] and sd.tick(100.0) == []


def test_the_deadline_ends_every_waiting_phase():
    sd = Shutdown(timeout_s=5.0)
    sd.begin(0.0)
    assert sd.tick(4.9) == []
    assert sd.tick(5.0) == [Phase(FORWARDS), Phase(CLOSING)]
    sd2 = Shutdown(timeout_s=5.0)
    sd2.begin(0.0)
    sd2.agents_idle(1.0)
    assert sd2.tick(5.0) == [Phase(CLOSING)]


# --------------------------------------------------------------------------- effects


def test_an_effect_nobody_handles_is_an_error():
    seen = []
    table = Effects({Send: seen.append})
    table.run([Send("b", "gossip", {})])
    with pytest.raises(UnhandledEffect):
        table.run([Answer("h", "r", 1)])
    assert seen == [Send("b", "gossip", {})]


def test_the_node_handles_every_effect_its_machines_emit():
    """The runtime's table covers every effect type the machines can return."""
    from node.config import NodeConfig
    from node.runtime import Node
    from protocols import effects, shutdown

    node = Node(NodeConfig(listen="127.0.0.1:7999", metrics="off"))
    emitted = {effects.Send, effects.MembersChanged, effects.Refuted, effects.Answer,
               effects.Fail, shutdown.Phase}
    assert emitted <= node._effects.handles()


# --------------------------------------------------------------------------- exact answers
# What each machine hands back is checked whole: the client reads the code and the
# message of a Fail, and the node reads the rest.


def test_every_way_a_forward_ends_is_one_whole_fail():
    r = router()
    t1 = r.forward_started("c1", "r1", "incr", "b", now=0.0, arrived=0.0)
    r.forward_started("c2", "r2", "get", "c", now=0.0, arrived=0.0)
    r.forward_started("c3", "r3", "put", "b", now=1.0, arrived=1.0)
    assert r.send_failed(t1, "overloaded", "queue to b is full") == [
        Fail("c1", "r1", "overloaded", "queue to b is full", "incr")]
    assert r.members_changed(["a", "b"]) == [
        Fail("c2", "r2", "unavailable", "owner 'c' left the member view", "get")]
    assert r.tick(1.0 + TIMEOUT_S) == [
        Fail("c3", "r3", "timeout", "owner 'b' did not answer within 5 s", "put"),
        Unresponsive("b")]
    r.forward_started("c4", "r4", "get", "b", now=2.0, arrived=2.0)
    assert r.stop() == [Fail("c4", "r4", "unavailable", "node is shutting down", "get")]


def test_a_reply_hands_back_the_whole_pending_forward():
    r = router()
    token = r.forward_started("c1", "r1", "incr", "b", now=10.0, arrived=9.5)
    pending = r.reply_arrived(token)
    assert (pending.token, pending.handle, pending.request_id, pending.mtype, pending.owner,
            pending.deadline, pending.arrived, pending.forwarded_at, pending.nbytes) == (
        token, "c1", "r1", "incr", "b", 10.0 + TIMEOUT_S, 9.5, 10.0, 0)
    assert r.bytes_in_flight == 0


def test_full_forward_tables_say_which_bound_was_reached():
    r = router(forwards_max=1, forward_bytes_max=100)
    assert r.forward_started("c", "1", "get", "b", 0.0, 0.0, nbytes=60) != b""
    assert r.forward_started("c", "2", "get", "b", 0.0, 0.0) == Refusal(
        "overloaded", "1 forwards in flight on this node")
    r2 = router(forward_bytes_max=100)
    r2.forward_started("c", "1", "get", "b", 0.0, 0.0, nbytes=60)
    assert r2.forward_started("c", "2", "get", "b", 0.0, 0.0, nbytes=41) == Refusal(
        "overloaded", "60 bytes of forwards in flight on this node")


def test_every_late_reply_is_counted():
    r = router()
    for _ in range(3):
        assert r.reply_arrived(b"x" * 16) is None
    assert r.late_replies == 3


def test_a_new_router_owns_every_subject_before_it_hears_of_members():
    r = Router("a", KEY, max_hops=2, forward_timeout_s=1.0)
    assert [r.route(f"kv/{i}", 0, 0) for i in range(20)] == ["a"] * 20
    assert r.ring.vnodes == 160 and r.is_member("a") and not r.is_member("b")


def test_the_ring_keeps_its_vnodes_and_agrees_with_a_ring_of_the_members():
    from core_cy import HashRing

    many = [f"n{i}" for i in range(12)]  # more changes at once than RING_REBUILD_CHANGES
    for members in (many, ["b", "c"]):   # one rebuild, and one change at a time
        r = router("a", members=["a", *members], vnodes=7)
        expected = HashRing(tuple(sorted({"a", *members})), vnodes=7)
        assert r.ring.vnodes == 7
        assert [r.route(f"kv/{i}", None, 0) for i in range(300)] == [
            expected.owner(f"kv/{i}") for i in range(300)]
        assert all(r.is_member(m) for m in members) and not r.is_member("zz")


def test_a_leaving_node_is_not_on_its_own_ring_and_forwards_everything():
    r = router("a", members=["b", "c"])
    assert not r.is_member("a")
    assert {r.route(f"kv/{i}", None, 0) for i in range(200)} == {"b", "c"}
    assert router("a", members=[]).route("kv/1", None, 0) == "a"  # never an empty ring


def test_a_minority_node_refuses_every_agent_request_unavailable():
    r = router()
    r.set_quorate(False, 2, 5)
    refusal = r.route("kv/1", None, 0)
    assert type(refusal) is Refusal and refusal.code == ErrorCode.UNAVAILABLE
    assert refusal.message == ("this node is on the minority side of a split (2 of 5 members "
                               "reachable): it serves no agents until the cluster heals")
    assert not r.quorate
    r.set_quorate(True, 3, 5)
    assert r.quorate and r.route("kv/1", None, 0) in ("a", "b", "c")


def test_a_new_router_is_quorate_until_told_otherwise():
    assert router().quorate and router().route("kv/1", None, 0) in ("a", "b", "c")


def test_the_owner_cache_is_bounded():
    from protocols.routing import OWNER_CACHE_MAX

    r = router()
    for i in range(OWNER_CACHE_MAX + 1):
        r.route(f"kv/{i}", None, 0)
    assert len(r._cache) <= OWNER_CACHE_MAX
    assert r.route("kv/0", None, 0) == router().route("kv/0", None, 0)


def test_the_token_key_must_be_8_bytes():
    with pytest.raises(ValueError) as info:
        Router("a", b"short", max_hops=2, forward_timeout_s=1.0)
    assert str(info.value) == "the token key is 8 bytes (random, from the node)"


def test_routing_and_shutdown_take_no_peer_messages():
    with pytest.raises(TypeError) as info:
        router().receive("b", {}, 0.0)
    assert str(info.value) == "the router receives no peer messages"
    with pytest.raises(TypeError) as info:
        Shutdown(1.0).receive("b", {}, 0.0)
    assert str(info.value) == "the shutdown sequence receives no peer messages"


def test_status_tokens_start_with_the_node_key_and_every_answer_is_kept():
    s = StatusCollector("a", timeout_s=1.0, key=b"0123456789")
    effects = s.start("client", "q1", {"node": "a"}, MEMBERS, now=0.0)
    token = b"01234567".hex() + "1"
    assert effects == [Send("b", STATUS_QUERY, token), Send("c", STATUS_QUERY, token)]
    s.receive("b", {"token": token, "status": {"node": "b", "agents": 2}}, 0.1)
    [answer] = s.receive("c", {"token": token, "status": {"node": "c", "agents": 0}}, 0.2)
    assert answer == Answer("client", "q1", {"node": "a", "members": [
        {"node": "a"}, {"node": "b", "agents": 2}, {"node": "c", "agents": 0}]})


def test_a_full_status_table_answers_overloaded():
    s = StatusCollector("a", timeout_s=1.0, waits_max=1)
    s.start("h", "1", {}, MEMBERS, 0.0)
    assert s.start("h2", "2", {}, MEMBERS, 0.0) == [
        Fail("h2", "2", "overloaded", "too many status requests in flight", "syn.status")]


@pytest.mark.parametrize("sender, message, why", [
    ("b", "not a map", "a status answer is a map"),
    ("b", {"token": 1, "status": {}}, "a status answer needs 'token' (str) and 'status' (map)"),
    ("b", {"token": "1", "status": {"node": "c"}}, "status from 'b' was not asked for"),
])
def test_bad_status_answers_say_what_is_wrong(sender, message, why):
    s = StatusCollector("a", timeout_s=1.0)
    s.start("h", "q", {"node": "a"}, MEMBERS, 0.0)
    with pytest.raises(StatusError) as info:
        s.receive(sender, message, 0.1)
    assert str(info.value) == why


def test_status_tokens_up_to_their_bound_are_read():
    from protocols.status import TOKEN_LEN_MAX

    s = StatusCollector("a", timeout_s=1.0)
    assert s.receive("b", {"token": "t" * TOKEN_LEN_MAX, "status": {"node": "b"}}, 0.0) == []
    with pytest.raises(StatusError):
        s.receive("b", {"token": "t" * (TOKEN_LEN_MAX + 1), "status": {"node": "b"}}, 0.0)


def test_shutdown_steps_before_their_phase_do_nothing():
    sd = Shutdown(timeout_s=5.0)
    assert sd.next_deadline() is None and sd.tick(1e9) == []   # not begun: no deadline
    assert sd.agents_idle(0.0) == [] and sd.forwards_settled(0.0) == [] and sd.closed() == []
    assert sd.phase == "serving"
    assert sd.begin(0.0) == [Phase(DRAINING)]
    assert sd.closed() == [] and sd.phase == DRAINING


def test_an_unhandled_effect_is_named_in_the_error():
    with pytest.raises(UnhandledEffect, match=r"no handler for effect Answer\(handle='h'"):
        Effects({}).run([Answer("h", "r", 1)])


def test_a_request_follows_an_agent_handed_away_within_the_hop_limit():
    r = router()
    assert r.follow("kv/1", "b", None, 1) == "b"
    refusal = r.follow("kv/1", "b", None, 2)  # max_hops 2: the hop limit is reached
    assert type(refusal) is Refusal and refusal.code == ErrorCode.UNAVAILABLE
    assert "moving to 'b'" in refusal.message and "(2)" in refusal.message
    assert type(r.follow("kv/1", "b", 0, 0)) is Refusal  # ttl 0: the entry must own it


def test_forwards_given_longer_leave_no_heap_behind_once_answered():
    """Answered long forwards must not pile up on the deadline heap for 10 minutes."""
    r = router()
    for i in range(20_000):
        token = r.forward_started("p", f"r{i}", "t", "b", now=0.0, arrived=0.0,
                                  timeout_s=600.0)
        r.reply_arrived(token)
    assert r.in_flight == 0 and len(r._long_heap) <= 1024 + 1


def test_the_long_forward_heap_is_compacted_just_past_twice_the_live_count_plus_1024():
    """The bound is exact: with 11 long forwards live (10 waiting, 1 just started),
    the heap grows to 2 * 11 + 1024 + 1 entries and is compacted on the next start."""
    r = router()
    for i in range(10):
        r.forward_started("w", f"w{i}", "t", "b", now=0.0, arrived=0.0, timeout_s=600.0)
    sizes = []
    for i in range(3000):
        token = r.forward_started("p", f"r{i}", "t", "b", now=0.0, arrived=0.0, timeout_s=600.0)
        sizes.append(len(r._long_heap))
        r.reply_arrived(token)
    assert max(sizes) == 2 * 11 + 1024 + 1
    assert min(sizes[1100:]) == 11  # compacted down to the live ones, then the new one
    assert r.in_flight == 10


def test_the_forward_table_bound_counts_long_forwards_too():
    r = router(forwards_max=3)
    r.forward_started("p", "1", "t", "b", 0.0, 0.0, timeout_s=60.0)
    r.forward_started("p", "2", "t", "b", 0.0, 0.0, timeout_s=60.0)
    r.forward_started("c", "3", "t", "b", 0.0, 0.0)
    refusal = r.forward_started("c", "4", "t", "b", 0.0, 0.0)
    assert type(refusal) is Refusal and refusal.message == "3 forwards in flight on this node"


def test_forwards_to_a_leaving_owner_that_still_answers_are_kept():
    """A node leaving gracefully is off the ring but answers what it was sent."""
    r = router()
    r.forward_started("c1", "r1", "get", "b", now=0.0, arrived=0.0)
    r.forward_started("c2", "r2", "get", "c", now=0.0, arrived=0.0, timeout_s=60.0)
    assert r.members_changed(["a", "c"], reachable=["b"]) == []
    assert r.in_flight == 2
    [fail] = r.members_changed(["a"], reachable=["b"])
    assert (fail.request_id, fail.code) == ("r2", "unavailable")
    assert fail.message == "owner 'c' left the member view"


def test_a_long_forward_the_transport_gave_up_is_answered_once():
    r = router()
    token = r.forward_started("p", "r1", "t", "b", now=0.0, arrived=0.0, timeout_s=60.0)
    [fail] = r.send_failed(token, "unavailable", "no route to b")
    assert (fail.handle, fail.code, fail.message) == ("p", "unavailable", "no route to b")
    assert r.send_failed(token, "unavailable", "again") == [] and r.in_flight == 0


def test_timeouts_say_which_owner_did_not_answer():
    r = router()
    r.forward_started("s", "r1", "t", "b", now=0.0, arrived=0.0)
    r.forward_started("p", "r2", "t", "c", now=0.0, arrived=0.0, timeout_s=60.0)
    [short, unresponsive] = r.tick(TIMEOUT_S)
    assert short.message == f"owner 'b' did not answer within {TIMEOUT_S:g} s"
    assert unresponsive == Unresponsive("b")
    [long] = r.tick(60.0)
    assert long.message == "owner 'c' did not answer in time"
