"""Transport selection, fallback and circuit breakers (node/transports/select.py,
protocols/breaker.py), with in-test transports that fail on command."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.transports.base import BridgeHandle, Transport
from node.transports.select import Policy, TransportSet, parse_labels
from protocols.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Scripted(Transport):
    """A transport whose sends succeed, fail at once, or fail later, as told."""

    def __init__(self, name: str, acks: bool = False):
        self.name, self.acks = name, acks
        self.sent: list = []
        self.mode = "ok"        # ok | refuse | later
        self.later: list = []   # give-ups to call later
        self.replies: list = []

    def start(self, loop, inbound): pass
    def stop(self, linger_ms=0): pass
    def endpoints(self): return {self.name: f"{self.name}://me"}
    def set_peers(self, peers, seeds): pass
    def drop_queued(self, peer): pass
    def broadcast(self, topic, frames): self.sent.append(("broadcast", topic))
    def retry(self, now): pass
    has_queued = False
    def health(self): return {"sent": len(self.sent)}

    def reply(self, handle, payload):
        self.replies.append(payload)
        return True

    def send(self, peer, frames, on_give_up=None, now=0.0, prefer=None):
        self.sent.append(peer)
        if self.mode == "refuse":
            on_give_up("unavailable", f"{self.name} refused")
            return False
        if self.mode == "later":
            self.later.append(on_give_up)
        return True


CLOCK = [0.0]  # what the set's clock reads (outcomes reported later use it)


def transport_set(*names, order=("zmq",), rules=(), **kw):
    ts = {n: Scripted(n) for n in ("zmq", *names)}
    s = TransportSet(list(ts.values()), Policy(order, rules), clock=lambda: CLOCK[0], **kw)
    s.set_peers({"p": {"zmq": "tcp://p:1", "quic": "p:2", "http2": "http://p:3",
                       "labels": "zone=eu"},
                  "q": {"zmq": "tcp://q:1", "labels": "transport=http2"}}, [])
    return s, ts


def test_policy_rules_labels_and_the_preferred_transport():
    policy = Policy(("zmq",), ("zone=eu:quic/zmq", "dc=x:http2"))
    assert policy.chain({"zone": "eu"}) == ["quic", "zmq"]
    assert policy.chain({"dc": "x", "zone": "eu"}) == ["quic", "zmq"]  # first rule wins
    assert policy.chain({"transport": "http2"}) == ["http2", "zmq"]
    assert policy.chain({}, prefer="quic") == ["quic", "zmq"]
    assert parse_labels("zone=eu,dc=fra1,junk,=x") == {"zone": "eu", "dc": "fra1"}


def test_only_transports_both_sides_run_are_tried_zmq_last():
    s, _ = transport_set("quic", rules=("zone=eu:quic/http2",))
    assert s.chain("p") == ["quic", "zmq"]       # http2 not run here; zmq the last resort
    assert s.chain("q") == ["zmq"]               # q prefers http2, but we do not run it
    assert s.chain("seed:tcp://x:1") == ["zmq"]  # addresses are dialled by zmq only


def test_a_give_up_falls_back_to_the_next_transport_at_once_or_later():
    s, ts = transport_set("quic", rules=("zone=eu:quic/zmq",))
    told = []
    ts["quic"].mode = "refuse"
    assert s.send("p", [b"f"], lambda *a: told.append(a)) is True
    assert ts["quic"].sent == ["p"] and ts["zmq"].sent == ["p"] and told == []
    ts["quic"].mode = "later"
    assert s.send("p", [b"f"], lambda *a: told.append(a))
    ts["zmq"].mode = "refuse"
    ts["quic"].later.pop()("unavailable", "lost")  # the queued send gave up: next one
    assert told == [("unavailable", "zmq refused")]  # all failed: told once, the last
    assert s.stats["zmq"]["fallbacks"] == 2 and s.stats["quic"]["errors"] == 2


def test_an_open_breaker_is_skipped_then_half_opens_and_closes():
    s, ts = transport_set("quic", rules=("zone=eu:quic/zmq",), breaker_failures=2,
                          breaker_open_s=1.0)
    ts["quic"].mode = "refuse"
    CLOCK[0] = 0.0
    s.send("p", [b"f"], None, 0.0)
    CLOCK[0] = 0.1
    s.send("p", [b"f"], None, 0.1)
    assert s.breakers() == [{"peer": "p", "transport": "quic", "state": OPEN, "opened": 1,
                             "rejected": 0}]
    ts["quic"].mode = "ok"
    s.send("p", [b"f"], None, 0.5)
    assert ts["quic"].sent == ["p", "p"] and s.stats["quic"]["skipped_open"] == 1
    s.send("p", [b"f"], None, 1.2)   # past open_s: the trial goes over quic, and closes it
    assert ts["quic"].sent[-1] == "p" and s.breakers() == []


def test_replies_go_back_through_the_transport_that_minted_the_handle():
    s, ts = transport_set("quic")
    s.reply((b"id",), b"z")
    s.reply(BridgeHandle(ts["quic"]), b"q")
    assert ts["zmq"].replies == [b"z"] and ts["quic"].replies == [b"q"]
    s.broadcast(b"g", [b"x"])
    assert ts["zmq"].sent == [("broadcast", b"g")] and ts["quic"].sent == []


def test_breaker_opens_on_a_failure_rate_too():
    b = Breaker(failures_max=100, failure_rate=0.5, window=4, open_s=1.0)
    for ok in (True, False, True, False):
        b.record(ok, 0.0)
    assert b.state == OPEN


def test_a_half_open_trial_that_never_reports_counts_as_failed():
    b = Breaker(failures_max=1, open_s=1.0)
    b.record(False, 0.0)
    assert not b.allow(0.5) and b.allow(1.0) and b.state == HALF_OPEN
    assert not b.allow(1.5)            # the trial is out
    assert not b.allow(2.1) and b.state == OPEN and b.opened == 2
    assert b.allow(3.2)
    b.record(True, 3.3)
    assert b.state == CLOSED


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 0.5)), max_size=200))
def test_breaker_never_allows_while_open_and_always_recovers(outcomes):
    b = Breaker(failures_max=3, failure_rate=0.6, window=10, open_s=1.0)
    now = 0.0
    for ok, step in outcomes:
        now += step
        if b.allow(now):
            assert b.state in (CLOSED, HALF_OPEN)
            b.record(ok, now)
        else:
            assert b.state in (OPEN, HALF_OPEN)
    # whatever happened, a long quiet spell lets a trial through again
    assert b.allow(now + 2.5) or b.allow(now + 5.0)


def test_bad_breaker_settings_are_refused():
    with pytest.raises(ValueError):
        Breaker(failures_max=0)


def test_a_module_named_in_config_registers_its_transport():
    from node import transports
    assert "test-h2" not in transports.available()
    transports.load_modules(["synthesis_test_transport"])
    assert {"zmq", "http2", "quic", "test-h2"} <= set(transports.available())
    made = transports.create("test-h2", node_id="n", bind="127.0.0.1:0", max_message_bytes=1024,
                             metrics=None, log=None)
    assert made.name == "test-h2"
    with pytest.raises(ValueError, match="unknown transport"):
        transports.create("nope")
    with pytest.raises(ValueError, match="already registered"):
        transports.register("zmq", object)


# --- the breaker alone, exactly (mutation testing: scripts/mutation.sh) -------------

def test_breaker_defaults_are_the_documented_ones():
    b = Breaker()
    assert (b.failures_max, b.failure_rate, b.window, b.open_s) == (5, 0.5, 20, 5.0)
    assert (b.state, b.opened, b.rejected) == (CLOSED, 0, 0)


@pytest.mark.parametrize("settings", [
    {"failures_max": 0}, {"failure_rate": 0.0}, {"failure_rate": 1.01}, {"window": 0},
    {"open_s": 0.0}, {"failures_max": 1, "window": 0}, {"failure_rate": 0.5, "window": 0},
    {"window": 1, "open_s": 0.0}])
def test_each_bad_breaker_setting_is_refused_with_the_rules(settings):
    with pytest.raises(ValueError, match=r"^failures_max >= 1, 0 < failure_rate <= 1, "
                                         r"window >= 1, open_s > 0$"):
        Breaker(**settings)


def test_the_edge_breaker_settings_are_accepted():
    b = Breaker(failures_max=1, failure_rate=1.0, window=1, open_s=0.001)
    assert (b.failure_rate, b.window) == (1.0, 1)


def test_a_fresh_breaker_opened_late_on_a_clock_far_from_zero():
    b = Breaker(failures_max=1, open_s=1.0)
    assert b.allow(0.5) and b.allow(1000.0)    # closed: no clock involved
    b.record(False, 1000.0)
    assert not b.allow(1000.5) and b.rejected == 1
    assert not b.allow(1000.999) and b.rejected == 2   # one each: counted exactly
    assert b.allow(1001.0) and b.state == HALF_OPEN    # exactly open_s later: a trial


def test_the_half_open_trial_waits_exactly_open_s_then_counts_as_failed():
    b = Breaker(failures_max=1, open_s=1.0)
    b.record(False, 10.0)
    assert b.allow(11.0)                     # the trial goes out at 11.0
    assert not b.allow(11.999) and b.rejected == 1
    assert not b.allow(12.0)                 # open_s after the trial: failed, open again
    assert (b.state, b.opened, b.rejected, b.opened_at) == (OPEN, 2, 2, 12.0)
    assert not b.allow(12.5) and b.rejected == 3
    assert b.allow(13.0) and b.trial_at == 13.0


def test_a_closing_trial_forgets_the_failures_before_it():
    b = Breaker(failures_max=2, failure_rate=1.0, window=3, open_s=1.0)
    b.record(False, 0.0)
    b.record(False, 0.0)
    assert b.allow(1.0)
    b.record(True, 1.0)
    assert (b.state, b.trial_at) == (CLOSED, None)
    b.record(False, 1.1)                     # one failure after closing: not two in a row
    assert b.state == CLOSED
    b.record(True, 1.2)
    b.record(False, 1.3)                     # the window holds F T F: rate 2/3 < 1
    assert b.state == CLOSED
    b.record(False, 1.4)
    assert b.state == OPEN and b.opened == 2


def test_a_success_resets_the_run_of_failures_to_zero():
    b = Breaker(failures_max=2, failure_rate=1.0, window=20)
    b.record(False, 0.0)
    b.record(True, 0.0)
    b.record(False, 0.0)
    assert b.state == CLOSED                 # F T F: never two in a row
    b.record(False, 0.0)
    assert b.state == OPEN


def test_the_failure_rate_counts_failures_only_over_a_full_window():
    b = Breaker(failures_max=100, failure_rate=0.5, window=4)
    for ok in (False, False, True):
        b.record(ok, 0.0)
    assert b.state == CLOSED                 # 2 of 3: the window is not full yet
    b.record(True, 0.0)
    assert b.state == OPEN                   # 2 of 4 = the rate
    c = Breaker(failures_max=100, failure_rate=0.5, window=4)
    for ok in (True, True, True, False):
        c.record(ok, 0.0)
    assert c.state == CLOSED                 # 1 of 4 is under the rate


def test_outcomes_reported_while_open_change_nothing():
    b = Breaker(failures_max=1, failure_rate=1.0, window=2, open_s=1.0)
    b.record(False, 0.0)
    b.record(True, 0.5)
    b.record(False, 0.5)
    assert (b.state, b.opened, b.opened_at) == (OPEN, 1, 0.0)


def test_a_failed_trial_opens_for_open_s_from_its_outcome():
    b = Breaker(failures_max=1, open_s=1.0)
    b.record(False, 0.0)
    assert not b.allow(0.5) and b.allow(1.0)
    assert not b.allow(1.2) and not b.allow(1.4) and b.rejected == 3   # the trial is out
    b.record(False, 1.5)
    assert (b.state, b.opened_at) == (OPEN, 1.5)
    assert not b.allow(2.4) and b.allow(2.5)


def test_the_failure_rate_window_slides_over_the_last_outcomes():
    b = Breaker(failures_max=100, failure_rate=0.5, window=4)
    for ok in (True, True, True, True, False):
        b.record(ok, 0.0)
    assert b.state == CLOSED                 # the last 4: T T T F
    b.record(False, 0.0)
    assert b.state == OPEN                   # the last 4: T T F F
