"""The handoff machine (protocols/handoff.py), driven by hand between two or three nodes.

Every message between machines goes through the peer codec (``peer.encode`` then
``peer.decode``), as the node sends it.  The property test at the end lets
hypothesis reorder, duplicate and drop the messages between an old and a new
owner, and checks that the agent ends up active once, on its owner, carrying its
state unless the new owner gave up waiting (which is counted).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import peer
from protocols.effects import HANDOFF, Install, Send, Surrender
from core_cy import HashRing
from protocols.handoff import (REASONS, WANT_SENDS_MAX, Handoff, HandoffError,
                               previous_ring)
from protocols.routing import Refusal
from protocols.wire import ErrorCode

pytestmark = pytest.mark.timeout(60)

T = 2.0        # timeout_s
WINDOW = 10.0  # window_s
AGENT = "kv/a"
STATE = b"\x81\xa1k\xa1v"


def machine(node_id: str, **options) -> Handoff:
    options = {"timeout_s": T, "window_s": WINDOW, **options}
    return Handoff(node_id, **options)


def wire(sender: str, effect: Send) -> dict:
    """What the receiver gets for ``effect``: framed and decoded as the node does."""
    assert effect.channel == HANDOFF
    event = peer.decode(peer.encode(effect.channel, sender, effect.message))
    assert isinstance(event, peer.HandedOff) and event.sender == sender
    return event.message


def deliver(sender: str, effect: Send, receiver: Handoff, now: float) -> list:
    assert effect.to == receiver.node_id
    return receiver.receive(sender, wire(sender, effect), now)


def new_owner(members=("old", "new"), **options) -> Handoff:
    new = machine("new", **options)
    new.members_changed(members)
    new.ring_changed(lambda agent_id: "old", 0.0)
    return new


def sends(effects: list) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def kinds(effects: list) -> list[str]:
    return [e.message["kind"] for e in sends(effects)]


# ------------------------------------------------------------------ the happy path

def test_state_moves_to_the_new_owner_with_the_held_requests_and_is_acked():
    old, new = machine("old"), new_owner()
    old.members_changed(["old", "new"])
    assert new.expecting(AGENT, 1.0) == "old"
    (want,) = new.hold(AGENT, "r1", 10, 1.0)
    assert want == Send("old", HANDOFF, {"v": 1, "kind": "want", "agent": AGENT})
    assert new.hold(AGENT, "r2", 20, 1.1) == []      # one want per agent
    assert new.held_now == 2
    assert deliver("new", want, old, 1.2) == [Surrender(AGENT, "new")]
    # The node took the agent out of its host and hands its state over.
    (state,) = old.send_state(AGENT, "new", "kv", STATE, ["g1", "g2"], 1.3)
    assert state.to == "new" and state.message["kind"] == "state" and old.kept_now == 1
    install, ack = deliver("old", state, new, 1.4)
    assert install == Install(AGENT, "kv", STATE, ("g1", "g2"), ("r1", "r2"))
    assert ack.message["kind"] == "ack"
    assert deliver("new", ack, old, 1.5) == []
    assert (old.kept_now, old.sent, old.acked, new.held_now, new.installed) == (0, 1, 1, 0, 1)
    assert old.tick(100.0) == [] and old.next_deadline() is None


def test_an_unasked_state_is_installed_and_its_duplicates_only_acked():
    """A node leaving gracefully pushes its agents' states unasked."""
    old, new = machine("old"), machine("new")
    (state,) = old.send_state(AGENT, "new", "counter", None, [], 0.0)
    first = deliver("old", state, new, 0.1)
    assert first[0] == Install(AGENT, "counter", None, (), ())
    again = deliver("old", state, new, 0.2)
    assert kinds(again) == ["ack"] and not any(isinstance(e, Install) for e in again)
    assert new.duplicates == 1


def test_a_second_state_of_the_same_agent_from_the_same_sender_is_installed():
    """Only the very same send is a duplicate: the agent may come back and leave again."""
    old, new = machine("old"), machine("new")
    (first,) = old.send_state(AGENT, "new", "kv", b"1", [], 0.0)
    (second,) = old.send_state(AGENT, "new", "kv", b"2", [], 0.1)  # supersedes the first
    assert old.kept_now == 1
    assert deliver("old", first, new, 0.2)[0].state == b"1"
    install, ack = deliver("old", second, new, 0.3)
    assert install.state == b"2"
    # The ack of the superseded send does not forget the newer one.
    assert deliver("new", sends(deliver("old", first, new, 0.4))[0], old, 0.5) == []
    assert old.kept_now == 1
    deliver("new", ack, old, 0.6)
    assert old.kept_now == 0


def test_want_for_an_agent_the_node_lacks_is_answered_none_and_activates_fresh():
    old, new = machine("old"), new_owner()
    (want,) = new.hold(AGENT, "r1", 1, 0.0)
    assert deliver("new", want, old, 0.1) == [Surrender(AGENT, "new")]
    (none,) = old.none(AGENT, "new")
    assert deliver("old", none, new, 0.2) == [Install(AGENT, None, None, (), ("r1",))]
    assert new.expecting(AGENT, 0.3) is None   # handled for this ring change
    assert deliver("old", none, new, 0.4) == []  # a duplicate none: nothing waits


# ------------------------------------------------------------------ losses and departures

def test_lost_state_is_resent_every_timeout_then_given_back():
    old = machine("old", attempts_max=3)
    (first,) = old.send_state(AGENT, "new", "kv", STATE, ["g"], 0.0)
    assert old.next_deadline() == T
    assert old.tick(T - 0.01) == []
    assert sends(old.tick(T)) == [first]
    assert sends(old.tick(2 * T)) == [first]
    assert old.resent == 2
    (back,) = old.tick(3 * T)  # three sends, none acked: it comes back
    assert back == Install(AGENT, "kv", STATE, ("g",), ())
    assert (old.kept_now, old.returned, old.next_deadline()) == (0, 1, None)


def test_repeated_want_resends_the_state_in_flight_instead_of_surrendering():
    old, new = machine("old"), new_owner()
    (want,) = new.hold(AGENT, "r1", 1, 0.0)
    deliver("new", want, old, 0.1)
    (state,) = old.send_state(AGENT, "new", "kv", STATE, [], 0.1)  # ... and it is lost
    (want_again,) = new.tick(T / WANT_SENDS_MAX)
    assert want_again == want
    assert deliver("new", want_again, old, 0.6) == [state]
    assert deliver("old", state, new, 0.7)[0].held == ("r1",)


def test_wants_are_resent_a_bounded_number_of_times():
    new = new_owner()
    effects = new.hold(AGENT, "r1", 1, 0.0)
    now = 0.0
    while new.next_deadline() is not None and now < T:
        now = new.next_deadline()
        effects += new.tick(now)
    assert kinds(effects) == ["want"] * WANT_SENDS_MAX
    assert effects[-1] == Install(AGENT, None, None, (), ("r1",))
    assert now == T and new.timed_out == 1


def test_target_leaving_gives_the_state_back():
    old = machine("old")
    old.members_changed(["old", "new", "other"])
    old.send_state(AGENT, "new", "kv", STATE, ["g"], 0.0)
    old.send_state("kv/b", "other", "kv", b"b", [], 0.0)
    assert old.members_changed(["old", "other"]) == [Install(AGENT, "kv", STATE, ("g",), ())]
    assert old.kept_now == 1


def test_previous_owner_leaving_releases_the_holds_fresh():
    new = new_owner(members=("old", "new", "other"))
    new.hold(AGENT, "r1", 1, 0.0)
    new.hold(AGENT, "r2", 1, 0.1)
    assert new.members_changed(["new", "other"]) == [Install(AGENT, None, None, (), ("r1", "r2"))]
    assert (new.owner_lost, new.held_now) == (1, 0)
    assert new.expecting(AGENT, 0.2) is None  # the old owner is not a member


def test_hold_timeout_activates_fresh_and_a_late_state_is_still_installed_for_the_node():
    old, new = machine("old"), new_owner()
    (want,) = new.hold(AGENT, "r1", 1, 0.0)
    deliver("new", want, old, 0.0)
    (state,) = old.send_state(AGENT, "new", "kv", STATE, [], 0.0)
    timeout = [e for e in new.tick(T) if isinstance(e, Install)]
    assert timeout == [Install(AGENT, None, None, (), ("r1",))] and new.timed_out == 1
    # The state arrives late: installed (the node keeps the active one and counts).
    late, ack = deliver("old", state, new, T + 0.5)
    assert late.state == STATE and late.held == ()
    deliver("new", ack, old, T + 0.6)
    assert old.kept_now == 0


# ------------------------------------------------------------------ the window

def test_expecting_only_inside_the_window_and_only_other_live_owners():
    new = new_owner(members=("old", "new"))
    assert new.expecting(AGENT, WINDOW - 0.01) == "old"
    assert new.expecting(AGENT, WINDOW) is None
    assert new.next_deadline() == WINDOW
    new.tick(WINDOW)
    assert new.next_deadline() is None
    with pytest.raises(ValueError):
        new.hold(AGENT, "r1", 1, WINDOW)  # nothing expected: the node activates fresh
    mine = machine("new")
    mine.members_changed(["new", "old"])
    mine.ring_changed(lambda agent_id: "new", 0.0)
    assert mine.expecting(AGENT, 1.0) is None        # it was ours before too
    mine.ring_changed(lambda agent_id: "gone", 1.0)  # the latest change wins
    assert mine.expecting(AGENT, 2.0) is None        # not a member
    assert machine("x").expecting(AGENT, 0.0) is None  # no ring change yet


def test_a_wait_outlives_the_window_and_keeps_its_owner():
    new = new_owner()
    new.hold(AGENT, "r1", 1, WINDOW - 0.5)
    new.ring_changed(lambda agent_id: "other", WINDOW - 0.4)
    assert new.expecting(AGENT, WINDOW + 0.1) == "old"
    assert new.hold(AGENT, "r2", 1, WINDOW + 0.1) == []
    assert new.held_now == 2


# ------------------------------------------------------------------ bounds

def test_holds_past_their_bounds_are_refused_overloaded():
    new = new_owner(held_max=3, held_bytes_max=100)
    for n in range(3):
        assert not isinstance(new.hold(AGENT, n, 10, 0.0), Refusal)
    refusal = new.hold(AGENT, 3, 10, 0.0)
    assert isinstance(refusal, Refusal) and refusal.code == ErrorCode.OVERLOADED
    other = new_owner(held_max=10, held_bytes_max=100)
    other.hold(AGENT, "big", 90, 0.0)
    assert other.hold("kv/b", "more", 11, 0.0).code == ErrorCode.OVERLOADED
    assert (new.refused, other.refused, other.held_now) == (1, 1, 1)


def test_states_past_the_kept_bounds_come_back_at_once():
    old = machine("old", kept_max=1, kept_bytes_max=10)
    assert kinds(old.send_state("kv/a", "new", "kv", b"x" * 10, [], 0.0)) == ["state"]
    assert old.send_state("kv/b", "new", "kv", b"y", [], 0.0) == \
        [Install("kv/b", "kv", b"y", (), ())]
    assert (old.kept_now, old.returned) == (1, 1)


# ------------------------------------------------------------------ validation

GOOD_STATE = {"v": 1, "kind": "state", "agent": AGENT, "seq": 1, "behavior": "kv",
              "state": STATE, "groups": ["g"]}


@pytest.mark.parametrize("message, reason", [
    ([1], "bad_message"),
    ({"kind": "want", "agent": AGENT}, "bad_version"),
    ({"v": 0, "kind": "want", "agent": AGENT}, "bad_version"),
    ({"v": True, "kind": "want", "agent": AGENT}, "bad_version"),
    ({"v": 1, "kind": "take", "agent": AGENT}, "bad_kind"),
    ({"v": 1, "kind": ["want"], "agent": AGENT}, "bad_kind"),
    ({"v": 1, "kind": "want", "agent": ""}, "bad_agent"),
    ({"v": 1, "kind": "want", "agent": "a" * 1025}, "bad_agent"),
    ({"v": 1, "kind": "want", "agent": b"kv/a"}, "bad_agent"),
    ({"v": 1, "kind": "ack", "agent": AGENT}, "bad_seq"),
    ({"v": 1, "kind": "ack", "agent": AGENT, "seq": -1}, "bad_seq"),
    ({**GOOD_STATE, "seq": "1"}, "bad_seq"),
    ({**GOOD_STATE, "behavior": 7}, "bad_behavior"),
    ({**GOOD_STATE, "behavior": ""}, "bad_behavior"),
    ({**GOOD_STATE, "state": "text"}, "bad_state"),
    ({**GOOD_STATE, "groups": "g"}, "bad_groups"),
    ({**GOOD_STATE, "groups": [""]}, "bad_groups"),
    ({**GOOD_STATE, "groups": [1]}, "bad_groups"),
    ({**GOOD_STATE, "groups": ["g"] * 65}, "bad_groups"),
])
def test_bad_messages_raise_handoff_error_and_change_nothing(message, reason):
    new = new_owner()
    new.hold(AGENT, "r1", 1, 0.0)
    with pytest.raises(HandoffError) as info:
        new.receive("old", message, 0.1)
    assert info.value.reason == reason and reason in REASONS
    assert new.held_now == 1


def test_a_newer_version_with_unknown_keys_is_read_by_the_keys_it_knows():
    new = machine("new")
    (install, _) = new.receive("old", {**GOOD_STATE, "v": 3, "later": {"x": 1},
                                       "behavior": None, "state": None}, 0.0)
    assert install == Install(AGENT, None, None, ("g",), ())


def test_handoff_bodies_may_carry_a_kv_agent_s_full_state():
    state = bytes(16 << 20)
    (send,) = machine("old").send_state(AGENT, "new", "kv", state, [], 0.0)
    assert wire("old", send)["state"] == state


# ------------------------------------------------------------------ texts, bounds, counters

@pytest.mark.parametrize("message, text", [
    ([1], "bad_message: a handoff message is a map, got list"),
    ({"v": 0, "kind": "want", "agent": AGENT}, "bad_version: 'v' must be an integer >= 1"),
    ({"v": 1, "kind": "take", "agent": AGENT},
     "bad_kind: 'kind' must be one of ['ack', 'none', 'state', 'want']"),
    ({"v": 1, "kind": "want", "agent": ""},
     "bad_agent: 'agent' must be a string of 1..1024 characters"),
    ({"v": 1, "kind": "ack", "agent": AGENT, "seq": 1 << 64},
     "bad_seq: 'seq' must be an integer 0..18446744073709551615"),
    ({**GOOD_STATE, "behavior": ""}, "bad_behavior: 'behavior' must be a non-empty string or nil"),
    ({**GOOD_STATE, "state": "text"}, "bad_state: 'state' must be bytes (msgpack bin) or nil"),
    ({**GOOD_STATE, "groups": ["g" * 513]},
     "bad_groups: 'groups' must be a list of at most 64 strings of 1..512 characters"),
])
def test_a_bad_message_is_refused_with_a_stable_text(message, text):
    """The text of each HandoffError is "reason: detail" (logs read it)."""
    with pytest.raises(HandoffError) as info:
        machine("new").receive("old", message, 0.0)
    assert str(info.value) == text and info.value.detail == text.split(": ", 1)[1]


def test_the_largest_fields_a_message_may_carry_are_taken():
    """Bounds are inclusive: a 1024-character agent id and behavior, seq 0 and
    2**64 - 1, 64 groups of 512 characters, and a later version."""
    new = machine("new")
    top = {**GOOD_STATE, "v": 2, "agent": "a" * 1024, "behavior": "b" * 1024,
           "seq": (1 << 64) - 1, "groups": ["g" * 512] * 64}
    install, ack = new.receive("old", top, 0.0)
    assert install.agent_id == "a" * 1024 and len(install.groups) == 64
    assert ack.message == {"v": 1, "kind": "ack", "agent": "a" * 1024, "seq": (1 << 64) - 1}
    assert new.receive("old", {**GOOD_STATE, "agent": "x", "seq": 0}, 0.0)[0].agent_id == "x"


@pytest.mark.parametrize("options", [{"timeout_s": 0.0}, {"window_s": -0.1},
                                     {"attempts_max": 0}])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError,
                       match=r"^timeout_s > 0, window_s >= 0 and attempts_max >= 1$"):
        machine("x", **options)


def test_the_smallest_good_options_are_taken():
    """A zero window (no waiting for handoffs) and a single send are allowed."""
    old = machine("old", window_s=0.0, attempts_max=1, timeout_s=0.5)
    old.send_state(AGENT, "new", "kv", STATE, [], 0.0)
    assert old.tick(0.5) == [Install(AGENT, "kv", STATE, (), ())]


def test_hold_without_an_expected_handoff_names_the_agent():
    with pytest.raises(ValueError, match=r"^no handoff expected for 'kv/a': activate it fresh$"):
        machine("new").hold(AGENT, "r", 1, 0.0)


def test_a_refused_hold_names_what_is_held():
    new = new_owner(held_max=2)
    new.hold(AGENT, "r1", 10, 0.0)
    new.hold(AGENT, "r2", 20, 0.0)
    refusal = new.hold(AGENT, "r3", 1, 0.0)
    assert refusal == Refusal(ErrorCode.OVERLOADED, "node holds its limit of requests waiting "
                                                    "for agents to move (2 requests, 30 bytes)")
    assert new.hold(AGENT, "r4", 1, 0.0).code == ErrorCode.OVERLOADED and new.refused == 2


def test_holds_fill_the_byte_bound_exactly():
    """held_bytes_max is inclusive, and a released wait gives its bytes back."""
    new = new_owner(held_bytes_max=100)
    assert new.hold(AGENT, "r1", 60, 0.0) != [] and new.hold(AGENT, "r2", 40, 0.0) == []
    assert isinstance(new.hold(AGENT, "r3", 1, 0.0), Refusal)
    new.receive("old", {"v": 1, "kind": "none", "agent": AGENT}, 0.1)
    assert new.held_now == 0
    assert isinstance(new.hold("kv/b", "r4", 101, 0.1), Refusal)
    assert new.hold("kv/b", "r4", 100, 0.1) != [] and new.held_now == 1


def test_kept_states_fill_their_byte_bound_exactly_and_give_bytes_back():
    """kept_bytes_max is inclusive; superseded, acked and given back states free
    their bytes."""
    old = machine("old", kept_bytes_max=10, attempts_max=1)
    old.members_changed(["old", "new"])
    old.send_state("kv/a", "new", "kv", b"x" * 6, [], 0.0)
    old.send_state("kv/a", "new", "kv", b"x" * 10, [], 0.0)  # supersedes: 6 freed
    assert old.kept_now == 1
    (state,) = old.send_state("kv/a", "new", "kv", b"y" * 10, [], 0.0)
    old.receive("new", {"v": 1, "kind": "ack", "agent": "kv/a", "seq": state.message["seq"]},
                0.0)
    assert old.kept_now == 0 and old.acked == 1
    assert kinds(old.send_state("kv/b", "new", "kv", b"z" * 10, [], 0.0)) == ["state"]
    old.tick(T)  # its one send unacked: given back
    assert kinds(old.send_state("kv/c", "new", "kv", b"w" * 10, [], T)) == ["state"]
    old.members_changed(["old"])  # the target left: given back
    assert kinds(old.send_state("kv/d", "new", "kv", b"v" * 10, [], T)) == ["state"]
    assert old.send_state("kv/e", "new", "kv", b"u", [], T) == [Install("kv/e", "kv", b"u", (), ())]
    assert (old.sent, old.returned) == (6, 3)


def test_seqs_count_up_from_seq_start_and_an_ack_must_match_sender_and_seq():
    """Each state sent takes the next seq; an ack of another seq or from another
    node forgets nothing."""
    old = machine("old", seq_start=100)
    (a,) = old.send_state("kv/a", "new", "kv", None, [], 0.0)
    (b,) = old.send_state("kv/b", "new", "kv", None, [], 0.0)
    assert (a.message["seq"], b.message["seq"]) == (101, 102)
    old.receive("other", {"v": 1, "kind": "ack", "agent": "kv/a", "seq": 101}, 0.0)
    old.receive("new", {"v": 1, "kind": "ack", "agent": "kv/a", "seq": 102}, 0.0)
    old.receive("new", {"v": 1, "kind": "ack", "agent": "kv/z", "seq": 101}, 0.0)
    assert old.kept_now == 2 and old.acked == 0
    old.receive("new", {"v": 1, "kind": "ack", "agent": "kv/a", "seq": 101}, 0.0)
    assert old.kept_now == 1 and old.acked == 1


def test_resends_go_in_due_order_and_count():
    """Each resend moves its state to the back of the queue, due timeout_s later."""
    old = machine("old", attempts_max=3)
    old.send_state("kv/a", "new", "kv", None, [], 0.0)
    old.send_state("kv/b", "new", "kv", None, [], 0.5)
    assert [e.message["agent"] for e in old.tick(T)] == ["kv/a"]
    assert old.next_deadline() == T + 0.5
    assert [e.message["agent"] for e in old.tick(T + 0.5)] == ["kv/b"]
    assert old.next_deadline() == 2 * T
    assert [e.message["agent"] for e in old.tick(10 * T)] == ["kv/a", "kv/b"]
    assert old.resent == 4 and old.sent == 2


def test_a_want_from_another_node_than_the_target_surrenders():
    """A state in flight to one node is not resent to another that asks."""
    old = machine("old")
    old.send_state(AGENT, "new", "kv", STATE, [], 0.0)
    assert old.receive("other", {"v": 1, "kind": "want", "agent": AGENT}, 0.0) == [
        Surrender(AGENT, "other")]
    assert old.resent == 0


def test_a_none_from_a_node_not_asked_is_ignored():
    new = new_owner(members=("old", "new", "other"))
    new.hold(AGENT, "r1", 1, 0.0)
    assert new.receive("other", {"v": 1, "kind": "none", "agent": AGENT}, 0.1) == []
    assert new.held_now == 1


def test_a_duplicate_state_releases_requests_held_since_to_a_fresh_activation():
    """After an install (and a passivation), requests held for the agent are released
    fresh by a duplicate of the installed state; the duplicate is acked, not
    installed again."""
    new = new_owner()
    state = {**GOOD_STATE, "seq": 7}
    new.receive("old", state, 0.0)
    new.ring_changed(lambda agent_id: "old", 0.5)  # a later change: expected again
    new.hold(AGENT, "r1", 1, 0.5)
    install, ack = new.receive("old", state, 0.6)
    assert install == Install(AGENT, None, None, (), ("r1",))
    assert ack.message == {"v": 1, "kind": "ack", "agent": AGENT, "seq": 7}
    assert (new.installed, new.duplicates, new.held_now) == (1, 1, 0)
    assert kinds(new.receive("old", state, 0.7)) == ["ack"] and new.duplicates == 2


def test_installs_are_remembered_until_the_old_owner_stops_resending():
    """A state installed is recognised as a duplicate for max(window_s, timeout_s *
    (attempts_max + 1)), then forgotten (installed again)."""
    new = machine("new", window_s=1.0, attempts_max=2)
    new.receive("old", GOOD_STATE, 0.0)
    assert new.next_deadline() == 3 * T
    new.tick(3 * T - 0.01)
    assert kinds(new.receive("old", GOOD_STATE, 3 * T - 0.01)) == ["ack"]
    new.tick(3 * T)
    assert new.next_deadline() is None
    assert isinstance(new.receive("old", GOOD_STATE, 3 * T)[0], Install)
    wide = machine("new", window_s=100.0)
    wide.receive("old", GOOD_STATE, 0.0)
    wide.ring_changed(lambda agent_id: "old", 0.0)
    wide.tick(99.0)
    assert kinds(wide.receive("old", GOOD_STATE, 99.0)) == ["ack"]


def test_installs_remembered_are_bounded_by_held_max_oldest_first():
    new = machine("new", held_max=2)
    for agent in ("kv/1", "kv/2", "kv/3"):
        new.receive("old", {**GOOD_STATE, "agent": agent}, 0.0)
    assert isinstance(new.receive("old", {**GOOD_STATE, "agent": "kv/1"}, 0.0)[0], Install)
    assert kinds(new.receive("old", {**GOOD_STATE, "agent": "kv/3"}, 0.0)) == ["ack"]


def test_an_agent_released_fresh_is_not_expected_again_after_this_change():
    """A wait that timed out (or was answered none) is remembered for this ring
    change: the next miss activates fresh; a later ring change expects it again."""
    new = new_owner()
    new.hold(AGENT, "r1", 1, 0.0)
    new.tick(T)
    assert new.expecting(AGENT, T) is None and new.timed_out == 1
    new.ring_changed(lambda agent_id: "old", T)
    assert new.expecting(AGENT, T) == "old"


def test_a_ring_change_reroutes_waits_for_agents_owned_elsewhere_now():
    """With the owner function, waits for agents this node no longer owns end: their
    requests come back to be routed again and no more wants go out."""
    new = new_owner()
    new.hold("kv/a", "r1", 1, 0.0)
    new.hold("kv/b", "r2", 1, 0.0)
    effects = new.ring_changed(lambda agent_id: "old", 0.1,
                               owner=lambda agent_id: "new" if agent_id == "kv/b" else "x")
    assert effects == [Install("kv/a", None, None, (), ("r1",))]
    assert (new.rerouted, new.held_now) == (1, 1)
    assert [e.message["agent"] for e in new.tick(T / WANT_SENDS_MAX)] == ["kv/b"]
    assert new.ring_changed(lambda agent_id: "old", 0.2) == []


def test_stop_hands_back_every_held_request():
    new = new_owner()
    new.hold("kv/a", "r1", 1, 0.0)
    new.hold("kv/b", "r2", 1, 0.0)
    new.hold("kv/a", "r3", 1, 0.0)
    assert new.stop() == ["r1", "r3", "r2"] and new.held_now == 0
    assert new.next_deadline() == WINDOW


def test_members_changed_counts_each_wait_whose_owner_left():
    new = new_owner(members=("old", "new", "other"))
    new.hold("kv/a", "r1", 1, 0.0)
    new.hold("kv/b", "r2", 1, 0.0)
    new.members_changed(["new", "other"])
    assert new.owner_lost == 2
    assert new.expecting("kv/a", 0.1) is None


def test_next_deadline_is_the_earliest_of_every_timer():
    """Kept states, held waits, wants, remembered installs and the window."""
    new = new_owner()
    assert new.next_deadline() == WINDOW
    new.hold(AGENT, "r1", 1, 1.0)
    assert new.next_deadline() == 1.0 + T / WANT_SENDS_MAX
    new.receive("old", GOOD_STATE, 1.2)  # installed: the want is moot
    keep = max(WINDOW, T * 6)
    assert new.next_deadline() == WINDOW
    new.tick(WINDOW)
    assert new.next_deadline() == 1.2 + keep
    old = machine("old")
    old.send_state(AGENT, "new", "kv", None, [], 3.0)
    assert old.next_deadline() == 3.0 + T


def test_previous_ring_of_a_node_that_was_serving_or_not():
    """A serving node's previous owners are the old ring's; a node that served
    nothing (joining) takes the new ring without itself; a lone node keeps the old."""
    old = HashRing(("a", "b"), vnodes=8)
    assert previous_ring(old, frozenset("abc"), "c", True).nodes == old.nodes
    ring = previous_ring(old, frozenset("abc"), "c", False)
    assert sorted(ring.nodes) == ["a", "b"] and ring.vnodes == 8
    assert sorted(previous_ring(HashRing(("x",)), frozenset("abd"), "d", False).nodes) == [
        "a", "b"]
    assert previous_ring(old, frozenset("c"), "c", False).nodes == old.nodes
    assert previous_ring(HashRing(("x",)), frozenset("ab"), "b", False).nodes == ("a",)


def test_wants_stop_at_want_sends_max_even_when_the_last_is_due_before_the_deadline():
    """With a timeout whose quarter does not add up exactly, a fifth want would fall
    just before the wait's deadline: it is not sent."""
    new = new_owner(timeout_s=0.09)
    effects = new.hold(AGENT, "r1", 1, 0.1)
    while (now := new.next_deadline()) is not None and now < 0.19:
        effects += new.tick(now)
    assert kinds(effects) == ["want"] * WANT_SENDS_MAX


def test_expecting_asks_the_previous_owner_of_that_very_agent():
    new = machine("new")
    new.members_changed(["old", "other", "new"])
    new.ring_changed(lambda agent_id: "other" if agent_id == "kv/b" else "old", 0.0)
    assert (new.expecting("kv/a", 0.0), new.expecting("kv/b", 0.0)) == ("old", "other")
    assert [e.to for e in new.hold("kv/b", "r", 1, 0.0)] == ["other"]


def test_reroutes_count_across_ring_changes():
    new = new_owner()
    for n, agent in enumerate(("kv/a", "kv/b")):
        new.hold(agent, "r", 1, float(n))
        new.ring_changed(lambda agent_id: "old", float(n), owner=lambda agent_id: "x")
    assert new.rerouted == 2


def test_an_install_remembered_again_moves_behind_the_later_ones():
    """Installs are forgotten in expiry order; one installed again expires from its
    new install, so earlier ones behind it are still forgotten on time."""
    new = machine("new", window_s=0.0, attempts_max=1)  # remembered 2 * T
    new.receive("old", {**GOOD_STATE, "agent": "kv/a", "seq": 1}, 0.0)
    new.receive("old", {**GOOD_STATE, "agent": "kv/b", "seq": 2}, 1.0)
    new.receive("old", {**GOOD_STATE, "agent": "kv/a", "seq": 3}, 2.0)
    new.tick(1.0 + 2 * T)
    assert isinstance(new.receive("old", {**GOOD_STATE, "agent": "kv/b", "seq": 2},
                                  1.0 + 2 * T)[0], Install)
    assert kinds(new.receive("old", {**GOOD_STATE, "agent": "kv/a", "seq": 3},
                             1.0 + 2 * T)) == ["ack"]
    assert new.installed == 4


def test_the_defaults_the_node_relies_on():
    """Seqs count from 1 (seq_start 0) and up to 10,000 requests are held."""
    old = machine("old")
    (state,) = old.send_state(AGENT, "new", "kv", None, ["g"], 0.0)
    assert state.message == {"v": 1, "kind": "state", "agent": AGENT, "seq": 1,
                             "behavior": "kv", "state": None, "groups": ["g"]}
    new = new_owner()
    for n in range(10_000):
        new.hold(f"kv/{n}", n, 0, 0.0)
    assert isinstance(new.hold("kv/x", "over", 0, 0.0), Refusal)


def test_a_ring_change_before_any_membership_expects_nobody():
    """No members known yet: no previous owner is a member to ask."""
    new = machine("new")
    new.ring_changed(lambda agent_id: "old", 0.0)
    assert new.expecting(AGENT, 0.0) is None


def test_states_kept_are_bounded_in_count_and_in_their_sum_of_bytes():
    """kept_max states at once; kept_bytes_max bytes of every kept state together."""
    old = machine("old", kept_max=2)
    old.send_state("kv/a", "new", "kv", None, [], 0.0)
    old.send_state("kv/b", "new", "kv", None, [], 0.0)
    assert old.send_state("kv/c", "new", "kv", None, [], 0.0) == [
        Install("kv/c", "kv", None, (), ())]
    sized = machine("old", kept_bytes_max=10)
    sized.send_state("kv/a", "new", "kv", b"x" * 6, [], 0.0)
    sized.send_state("kv/b", "new", "kv", b"y" * 4, [], 0.0)
    assert sized.send_state("kv/c", "new", "kv", b"z", [], 0.0) == [
        Install("kv/c", "kv", b"z", (), ())]


def test_none_answers_in_version_1():
    assert machine("old").none(AGENT, "new") == [
        Send("new", HANDOFF, {"v": 1, "kind": "none", "agent": AGENT})]


def test_every_resend_ack_and_timeout_counts_once():
    """resent counts each repeated want answered, acked each ack, timed_out each wait
    that ended without a state."""
    old = machine("old")
    (state,) = old.send_state(AGENT, "new", "kv", None, [], 0.0)
    old.send_state("kv/b", "new", "kv", None, [], 0.0)
    for _ in range(2):
        old.receive("new", {"v": 1, "kind": "want", "agent": AGENT}, 0.1)
    assert old.resent == 2
    for agent, seq in ((AGENT, 1), ("kv/b", 2)):
        old.receive("new", {"v": 1, "kind": "ack", "agent": agent, "seq": seq}, 0.2)
    assert old.acked == 2
    new = new_owner()
    new.hold("kv/a", "r1", 1, 0.0)
    new.hold("kv/b", "r2", 1, 0.0)
    new.tick(T)
    assert new.timed_out == 2


def test_states_given_back_in_one_tick_do_not_stop_the_others():
    """Several states past their last send are all given back in the same tick."""
    old = machine("old", attempts_max=1)
    old.send_state("kv/a", "new", "kv", b"a", [], 0.0)
    old.send_state("kv/b", "new", "kv", b"b", [], 0.0)
    assert old.tick(T) == [Install("kv/a", "kv", b"a", (), ()), Install("kv/b", "kv", b"b", (), ())]


# ------------------------------------------------------------------ the property

OTHER = "kv/none"  # an agent the old owner does not have


class World:
    """An old and a new owner, a bag of messages in flight, and the two nodes'
    hosts reduced to what handoff touches: which agents are active, with what state."""

    def __init__(self, lossy: bool):
        self.lossy = lossy
        self.now = 0.0
        self.machines = {"old": machine("old", attempts_max=3), "new": new_owner()}
        self.machines["old"].members_changed(["old", "new"])
        self.active: dict[str, dict[str, bytes | None]] = {"old": {AGENT: STATE}, "new": {}}
        self.bag: list[tuple[str, str, dict]] = []  # (to, sender, message)
        self.installs: list[tuple[str, Install]] = []
        self.kept_active = 0  # Installs of an agent already active: the node counts them
        self.held: dict[str, list[str]] = {AGENT: [], OTHER: []}
        self.requests = 0
        self.fresh: list[str] = []  # agents a miss activated fresh (window closed)

    def run(self, node: str, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.bag.append((effect.to, node, wire(node, effect)))
            elif isinstance(effect, Surrender):
                self.surrender(node, effect)
            else:
                assert isinstance(effect, Install), effect
                self.install(node, effect)

    def surrender(self, node: str, effect: Surrender) -> None:
        handoff = self.machines[node]
        if effect.agent_id in self.active[node]:
            state = self.active[node].pop(effect.agent_id)
            self.run(node, handoff.send_state(effect.agent_id, effect.to, "kv", state, ["g"],
                                              self.now))
        else:
            self.run(node, handoff.none(effect.agent_id, effect.to))

    def install(self, node: str, effect: Install) -> None:
        self.installs.append((node, effect))
        if effect.agent_id in self.active[node]:
            self.kept_active += 1
        else:
            self.active[node][effect.agent_id] = effect.state
        if node == "old":  # given back: the old owner hands it on to the owner
            self.hand_on()

    def hand_on(self) -> None:
        if AGENT in self.active["old"]:
            self.surrender("old", Surrender(AGENT, "new"))

    def miss(self, agent_id: str) -> None:
        """A request for ``agent_id`` reaches the new owner."""
        if agent_id in self.active["new"]:
            return
        self.requests += 1
        item = f"r{self.requests}"
        new = self.machines["new"]
        if new.expecting(agent_id, self.now) is None:
            self.active["new"][agent_id] = None  # activated fresh, no handoff
            self.fresh.append(agent_id)
            return
        effects = new.hold(agent_id, item, 1, self.now)
        self.held[agent_id].append(item)
        self.run("new", effects)

    def deliver(self, index: int, keep: bool = False) -> None:
        to, sender, message = self.bag[index] if keep else self.bag.pop(index)
        self.run(to, self.machines[to].receive(sender, message, self.now))

    def advance(self, dt: float) -> None:
        self.now += dt
        for node, handoff in self.machines.items():
            self.run(node, handoff.tick(self.now))

    def heal(self) -> None:
        """No more loss: deliver everything, let every timer run, until quiet."""
        self.hand_on()
        for _ in range(10_000):
            if self.bag:
                self.deliver(0)
                continue
            deadlines = [d for h in self.machines.values()
                         if (d := h.next_deadline()) is not None]
            if not deadlines:
                return
            self.advance(max(0.0, min(deadlines) - self.now))
        raise AssertionError("the machines never went quiet")


ACTIONS = ("deliver", "duplicate", "drop", "advance", "miss", "miss_other")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.booleans())
def test_any_interleaving_ends_with_the_agent_once_on_its_owner(data, lossy, pushed):
    world = World(lossy)
    if pushed:  # the old owner hands the agent on unasked (a graceful leave)
        world.hand_on()
    # Without loss, messages are only delayed: keep the total delay short of the old
    # owner's last resend (attempts_max * timeout_s), or it rightly gives the state back.
    time_left = 3 * T - 0.01
    for _ in range(data.draw(st.integers(0, 40), label="steps")):
        action = data.draw(st.sampled_from(ACTIONS))
        if action in ("deliver", "duplicate", "drop") and world.bag:
            index = data.draw(st.integers(0, len(world.bag) - 1))
            if action == "drop" and lossy:
                world.bag.pop(index)
            elif action != "drop":
                world.deliver(index, keep=action == "duplicate")
        elif action == "advance":
            dt = data.draw(st.sampled_from([0.1, T / 4, T / 2, T, 2 * T]))
            if lossy or dt <= time_left:
                time_left -= dt
                world.advance(dt)
        elif action in ("miss", "miss_other"):
            world.miss(AGENT if action == "miss" else OTHER)
    world.heal()
    new, old = world.machines["new"], world.machines["old"]

    # The agent is active once, on its owner; nothing waits or is kept any more.
    assert AGENT in world.active["new"] and AGENT not in world.active["old"]
    assert (new.held_now, old.kept_now, world.bag) == (0, 0, [])
    # The state was never lost silently: at least one Install carried it, and the
    # agent carries it unless the new owner gave up waiting (counted) or a request
    # came after the window closed (activated fresh, as documented).
    carried = [(node, i) for node, i in world.installs if i.agent_id == AGENT and i.state]
    assert carried
    assert all(i.state == STATE and i.groups == ("g",) for _, i in carried)
    if new.timed_out == 0 and AGENT not in world.fresh:
        assert world.active["new"][AGENT] == STATE
    # Held requests come out exactly once each, in arrival order.
    for agent_id, held in world.held.items():
        released = [item for node, i in world.installs if i.agent_id == agent_id
                    for item in i.held]
        assert released == held
        assert all(node == "new" for node, i in world.installs if i.held)
    # The agent the old owner never had is only ever activated fresh, once.
    assert all(i.state is None for _, i in world.installs if i.agent_id == OTHER)
    assert sum(i.agent_id == OTHER for _, i in world.installs) <= 1
    if not lossy:
        # Only delayed and duplicated: exactly one Install carried the state, on
        # the new owner, and nothing ever came back to the old one.
        assert carried == [("new", carried[0][1])]
        assert old.returned == 0
        assert not world.fresh  # the delays stay inside the window
        if new.timed_out == 0:
            assert world.kept_active == 0
            assert sum(i.agent_id == AGENT for _, i in world.installs) == 1
