"""The owner's pruning rule for replicated counters (node/state.py fold_retired):
rows of replicas that are no longer members fold into the owner's row, the value
stays, and a stale copy merged later counts nothing twice."""

from __future__ import annotations

from protocols.crdt import GCounter, PNCounter, decode_fields, encode_fields, merge_fields
from node.state import fold_retired

OLD_OWNER, NEW_OWNER, OTHER = 11, 22, 33
NOW_NS = 1_000_000_000


def written_by(replica: int, up: int, down: int = 0) -> PNCounter:
    counter = PNCounter().bind(replica)
    counter.increment(up)
    if down:
        counter.decrement(down)
    return counter


def test_a_retired_owner_row_folds_into_the_new_owner_and_the_value_stays():
    fields = {"count": written_by(OLD_OWNER, 7, 2)}
    fields["count"].merge(written_by(NEW_OWNER, 3))
    stale = decode_fields(encode_fields(fields))  # a replica's copy from before the fold
    assert fields["count"].value() == 8
    assert fold_retired(fields, frozenset({NEW_OWNER, OTHER}), NEW_OWNER, NOW_NS) == 1
    assert fields["count"].value() == 8
    assert fields["count"].replicas() == [NEW_OWNER]
    merge_fields(fields, stale)  # the old row comes back from a stale copy ...
    assert fields["count"].value() == 8  # ... and counts nothing twice
    delta = fields["count"].take_delta()
    replica_copy = stale["count"]
    replica_copy.merge(delta)  # a replica that gets the fold's delta agrees
    assert replica_copy.value() == 8


def test_live_rows_and_other_fields_are_left_alone():
    fields = {"count": written_by(NEW_OWNER, 4), "hits": GCounter().bind(OTHER)}
    fields["hits"].increment(5)
    assert fold_retired(fields, frozenset({NEW_OWNER, OTHER}), NEW_OWNER, NOW_NS) == 0
    assert fields["count"].replicas() == [NEW_OWNER] and fields["hits"].replicas() == [OTHER]
    assert fields["count"].take_delta() is not None  # the increment, not a fold
    assert fields["hits"].value() == 5
