"""protocols/admission.py: token bucket and in-flight count per client, bounded table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.admission import (BUSY_RETRY_S, CLIENT_INFLIGHT, CLIENT_RATE, CLIENTS_FULL,
                                 EVICT_LOOKS, Admission, Refused)

A, B = b"client-a", b"client-b"


def admit_n(adm: Admission, principal: bytes, n: int, now: float) -> int:
    """How many of ``n`` requests at ``now`` were admitted."""
    return sum(adm.admit(principal, now) is None for _ in range(n))


def test_unlimited_admits_everything_and_tracks_nobody():
    adm = Admission()
    assert admit_n(adm, A, 1000, 0.0) == 1000
    adm.done(A)
    assert len(adm) == 0 and adm.stats()["admitted"] == 1000


def test_burst_then_the_rate():
    adm = Admission(rate=10.0, burst=5)
    assert admit_n(adm, A, 8, 100.0) == 5        # a new client starts with a full bucket
    refused = adm.admit(A, 100.0)
    assert refused == Refused(CLIENT_RATE, pytest.approx(0.1))  # one token per 100 ms
    assert adm.admit(A, 100.05) is not None       # half a token
    assert adm.admit(A, 100.1) is None            # a whole one
    assert admit_n(adm, A, 10, 101.1) == 5        # refills to the burst, no further


def test_retry_hint_is_the_time_to_the_next_token():
    adm = Admission(rate=4.0, burst=1)
    assert adm.admit(A, 0.0) is None
    reason, retry_after_s = adm.admit(A, 0.1)     # 0.4 of a token after 100 ms
    assert reason == CLIENT_RATE and retry_after_s == pytest.approx(0.15)
    assert adm.admit(A, 0.1 + retry_after_s) is None


def test_burst_zero_means_one_second_of_rate():
    assert Admission(rate=50.0).burst == 50.0
    assert Admission(rate=0.2).burst == 1.0       # at least one request


def test_clients_have_buckets_of_their_own():
    adm = Admission(rate=1.0, burst=2)
    assert admit_n(adm, A, 10, 0.0) == 2
    assert admit_n(adm, B, 10, 0.0) == 2
    assert adm.refused[CLIENT_RATE] == 16


def test_in_flight_cap_until_done():
    adm = Admission(inflight_max=3)
    assert admit_n(adm, A, 3, 0.0) == 3
    assert adm.admit(A, 0.0) == Refused(CLIENT_INFLIGHT, BUSY_RETRY_S)
    assert adm.admit(B, 0.0) is None              # another client is not held back
    adm.done(A)
    assert adm.in_flight(A) == 2
    assert adm.admit(A, 0.0) is None


def test_refused_requests_cost_no_token_and_nothing_in_flight():
    adm = Admission(rate=1.0, burst=1, inflight_max=1)
    assert adm.admit(A, 0.0) is None
    assert adm.admit(A, 5.0).reason == CLIENT_INFLIGHT   # at the cap: no token taken
    adm.done(A)
    assert adm.admit(A, 5.0) is None                     # the bucket was still full
    assert adm.in_flight(A) == 1


def test_done_without_admit_never_goes_negative():
    adm = Admission(inflight_max=2)
    adm.done(A)
    assert adm.admit(A, 0.0) is None
    adm.done(A)
    adm.done(A)
    assert adm.in_flight(A) == 0 and adm.unmatched == 2
    assert admit_n(adm, A, 5, 0.0) == 2


def test_a_clock_going_back_refills_nothing():
    adm = Admission(rate=10.0, burst=1)
    assert adm.admit(A, 10.0) is None
    assert adm.admit(A, 5.0) is not None
    assert adm.admit(A, 10.05) is not None
    assert adm.admit(A, 10.1) is None


def test_table_is_bounded_and_forgets_idle_clients_first():
    adm = Admission(rate=1.0, burst=1, inflight_max=10, tracked_max=4)
    for i in range(4):
        assert adm.admit(b"c%d" % i, 0.0) is None
    adm.done(b"c0")                    # idle from t=1 on (nothing in flight, bucket full)
    assert adm.admit(b"new", 0.5) is None  # c0's bucket is still refilling: forgiven
    assert len(adm) == 4 and adm.forgiven == 1 and adm.in_flight(b"c1") == 1
    for name in (b"c1", b"c2", b"c3"):
        adm.done(name)
    assert adm.admit(b"newer", 10.0) is None  # idle ones go without loss
    assert len(adm) == 4 and adm.evicted == 1


def test_a_table_full_of_busy_clients_refuses_newcomers():
    adm = Admission(inflight_max=10, tracked_max=EVICT_LOOKS)
    for i in range(EVICT_LOOKS):
        assert adm.admit(b"c%d" % i, 0.0) is None
    assert adm.admit(b"new", 0.0) == Refused(CLIENTS_FULL, BUSY_RETRY_S)
    assert adm.admit(b"c0", 0.0) is None   # those it knows go on
    adm.done(b"c3")
    adm.done(b"c3")
    assert adm.admit(b"new", 0.0) is None  # room made from the one with nothing in flight
    assert adm.in_flight(b"c3") == 0 and b"c3" not in adm._clients


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Admission(rate=-1.0)
    with pytest.raises(ValueError):
        Admission(tracked_max=0)


def test_stats_name_every_reason():
    adm = Admission(rate=1.0, burst=1, inflight_max=1, tracked_max=1)
    adm.admit(A, 0.0)
    adm.admit(A, 0.0)
    adm.admit(B, 0.0)
    stats = adm.stats()
    assert stats["admitted"] == 1 and stats["refused_client_inflight"] == 1
    assert stats["refused_clients_tracked"] == 1 and stats["refused_client_rate"] == 0
    assert stats["tracked"] == 1


# ------------------------------------------------------------------ properties

# A run: steps of (client, time advance in ms, admit or done).
STEPS = st.lists(st.tuples(st.sampled_from([A, B, b"c"]), st.integers(0, 300),
                           st.booleans()), max_size=300)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS, inflight_max=st.integers(1, 5), tracked_max=st.integers(1, 4))
def test_in_flight_never_negative_nor_past_the_cap(steps, inflight_max, tracked_max):
    adm = Admission(inflight_max=inflight_max, tracked_max=tracked_max)
    mine: dict[bytes, int] = {}   # what each client has really in flight
    now = 0.0
    for principal, advance_ms, admit in steps:
        now += advance_ms / 1000
        if admit:
            if adm.admit(principal, now) is None:
                mine[principal] = mine.get(principal, 0) + 1
        elif mine.get(principal):
            adm.done(principal)
            mine[principal] -= 1
        for p, n in mine.items():
            assert 0 <= n <= inflight_max
            assert adm.in_flight(p) == n   # a client with calls in flight is never forgotten
        assert len(adm) <= tracked_max
    assert adm.unmatched == 0


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.integers(0, 5000), min_size=1, max_size=400),
       rate=st.sampled_from([0.5, 1.0, 3.0, 20.0, 1000.0]), burst=st.integers(0, 10))
def test_rate_bound_over_any_window(times, rate, burst):
    adm = Admission(rate=rate, burst=burst)
    admitted = [t / 1000 for t in sorted(times) if adm.admit(A, t / 1000) is None]
    limit = adm.burst
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            count = j - i + 1
            assert count <= math.floor(limit + rate * (admitted[j] - start) + 2e-6)


@settings(max_examples=100, deadline=None)
@given(times=st.lists(st.integers(0, 2000), min_size=1, max_size=200))
def test_a_steady_client_under_the_rate_is_never_refused(times):
    adm = Admission(rate=10.0, burst=1)
    for t in sorted(set(t - t % 100 for t in times)):   # at most one per 100 ms
        assert adm.admit(A, t / 1000) is None


# ------------------------------------------------------------------ exact edges
# (each pins one boundary or count that scripts/mutation.sh found no test holding)

def test_defaults_and_every_bad_setting_refused_with_the_rules():
    assert Admission().tracked_max == 16_384
    for bad in ({"rate": -1.0}, {"burst": -1}, {"inflight_max": -1}, {"tracked_max": 0}):
        with pytest.raises(ValueError, match=r"^rate, burst and inflight_max must be >= 0, "
                                             r"tracked_max >= 1$"):
            Admission(**bad)


def test_stats_are_exactly_these_counts():
    adm = Admission(inflight_max=1, tracked_max=1)
    assert adm.admit(A, 0.0) is None
    adm.done(A)
    adm.done(A)                          # unmatched
    assert adm.admit(B, 0.0) is None     # A idle: evicted
    assert adm.admit(B, 0.0) is not None
    assert adm.stats() == {"admitted": 2, "refused_client_rate": 0,
                           "refused_client_inflight": 1, "refused_clients_tracked": 0,
                           "tracked": 1, "evicted": 1, "forgiven": 0, "unmatched": 1}


def test_a_token_short_only_by_rounding_is_admitted():
    adm = Admission(rate=1.0, burst=1)
    assert adm.admit(A, 0.0) is None
    assert adm.admit(A, 1.0 - 1e-6) is None   # exactly the rounding allowance short
    assert adm.admit(A, 1.0 - 1e-6) is not None


def test_without_a_rate_an_entry_with_nothing_in_flight_is_idle():
    adm = Admission(inflight_max=5, tracked_max=1)
    for i in range(3):
        assert adm.admit(b"c%d" % i, float(i)) is None
        adm.done(b"c%d" % i)
    assert adm.evicted == 2 and adm.forgiven == 0


def test_idle_means_the_bucket_refilled_to_exactly_the_burst():
    # rate 2, burst 2: one request at 10.0 leaves 1 token, full again at 10.5
    def table_after(one_at: float, newcomer_at: float) -> Admission:
        adm = Admission(rate=2.0, burst=2, tracked_max=1, inflight_max=1)
        assert adm.admit(A, one_at) is None
        adm.done(A)
        assert adm.admit(B, newcomer_at) is None
        return adm

    assert table_after(10.0, 10.25).forgiven == 1   # 1.5 tokens: not full yet
    assert table_after(10.0, 10.5).evicted == 1     # 2.0 tokens: exactly full
    assert table_after(0.0, 0.25).forgiven == 1


def test_counts_of_forgiven_entries_add_up():
    adm = Admission(rate=1.0, burst=1, tracked_max=1)
    for i in range(3):
        assert adm.admit(b"c%d" % i, 0.0) is None   # each leaves a drained bucket
        adm.done(b"c%d" % i)
    assert adm.forgiven == 2 and adm.evicted == 0 and adm.admitted == 3
