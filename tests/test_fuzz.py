"""Fuzz tests of the parsers a hostile connection reaches (issue 11, "Fuzzing").

The targets and their contracts are in ``tests/fuzz_strategies.py``: client envelopes
(``wire.parse_request``, ``wire.refusal``), peer frames (``peer.decode``, every op),
and the membership, handoff and replication machines fed decoded bodies.  Every input
parses or raises the module's own error; the machines stay usable afterwards.

Each target runs a bounded number of examples here (about 12 s of CPU together); the
``slow`` variants run 6 times as many.  ``scripts/fuzz.py --seconds N``
runs the same targets for a time.  Below them, every crash fuzzing found, replayed
from the exact input it was shrunk to.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_strategies import (ENCODED_FIELDS, TARGETS, gossip_machine, node_stack, pack,
                             pack_map, pack_replacing, replication_machine)
from protocols import wire
from protocols.effects import Install, Send
from protocols.handoff import Handoff
from protocols.membership import Member, MembershipError
from protocols.replication import ReplicationError

pytestmark = pytest.mark.timeout(300)

# Examples per target in the default run: 2-3 s each on a shared 2-core machine (the
# gossip target runs up to six messages through a whole machine per example).
EXAMPLES = {"wire": 1000, "peer": 1000, "gossip": 200, "handoff": 400, "replication": 400}
SLOW_FACTOR = 6


def fuzz(name: str, examples: int):
    """A hypothesis test running ``examples`` inputs of target ``name``."""
    target = TARGETS[name]

    def run(case):
        target.run(case)

    run.__name__ = run.__qualname__ = f"fuzz_{name}"  # the example database's key
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])(given(target.inputs)(run))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name):
    fuzz(name, EXAMPLES[name])()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_longer(name):
    fuzz(name, EXAMPLES[name] * SLOW_FACTOR)()


# --- regressions: crashes fuzzing found, each replayed from its exact input ----------

DEEP_LIST = b"\x91" * 1000 + b"\xc0"  # a list nested 1,000 deep: msgpack decodes it


def test_the_deep_list_is_deeper_than_a_node_can_repr():
    """The premise of the repr regressions below: with a node's stack, the repr of
    this value raises RecursionError, so an error message may not show it whole."""
    value = msgpack.unpackb(DEEP_LIST)
    with node_stack(), pytest.raises(RecursionError):
        repr(value)


@pytest.mark.parametrize("body", [
    b"\x83\xa1v\x02\xa4kind\x90\xa1u\x90",  # kind: [] (unhashable: TypeError)
    b"\x82\xa1v\x02\xa4kind" + DEEP_LIST,    # kind: deep list (its repr: RecursionError)
    b"\x82\xa1v" + DEEP_LIST + b"\xa4kind\xa4sync",  # v: deep list
    b"\x83\xa1v\x02\xa4kind\xa4sync\xa1u\x91" + DEEP_LIST,  # an entry that is a deep list
    # an entry whose st is [] (unhashable)
    b"\x83\xa1v\x02\xa4kind\xa4sync\xa1u\x91" + pack(
        {"id": "n5", "gen": 1, "ep": {"zmq": "tcp://h:1", "zmq-pub": "tcp://h:2"}, "st": []}),
])
def test_gossip_refuses_unhashable_and_deep_values_as_membership_errors(body):
    TARGETS["gossip"].run((False, [("n1", body, 0.0)]))  # the target's own contract
    machine = gossip_machine(seeded=False)
    with node_stack(), pytest.raises(MembershipError):
        machine.receive("n1", msgpack.unpackb(body), 0.0)


def test_a_member_entry_with_an_unhashable_state_is_a_membership_error():
    entry = {"id": "n5", "gen": 1, "ep": {"zmq": "tcp://h:1", "zmq-pub": "tcp://h:2"},
             "st": ["a"]}
    with pytest.raises(MembershipError, match="'st'"):
        Member.from_wire(entry)


def test_a_handoff_state_without_behavior_or_state_installs_fresh():
    """``behavior`` and ``state`` are optional (nil when absent), as _check_state
    validates them: a message without them was a KeyError."""
    body = b"\x86\xa1v\x01\xa4kind\xa5state\xa5agent\xa2a1\xa3seq\x00\xa5state\xc0\xa6groups\x90"
    TARGETS["handoff"].run([("n0", body, 0.0)])
    effects = Handoff("me", timeout_s=1.0, window_s=10.0).receive("n0", msgpack.unpackb(body), 0.0)
    assert effects[0] == Install("a1", None, None, (), ())
    assert effects[1] == Send("n0", "handoff", {"v": 1, "kind": "ack", "agent": "a1", "seq": 0})


def test_replication_refuses_a_deep_kind_as_bad_kind():
    body = b"\x81\xa1k" + DEEP_LIST
    TARGETS["replication"].run([("n1", body, 0.0)])
    with node_stack(), pytest.raises(ReplicationError) as info:
        replication_machine().receive("n1", msgpack.unpackb(body), 0.0)
    assert info.value.reason == "bad_kind"


@pytest.mark.parametrize("name, path", [
    ("n", (0,)),           # a field's tag (crdt/fields.py)
    ("n", (1, 2)),         # a counter's folded ids (crdt/vclock.py, u64)
    ("s", (1, 2)),         # an OR-Set element (crdt/sets.py)
    ("m", (1, 0, 2)),      # an LWW-Map row's replica (crdt/maps.py, wire_u64)
    ("m", (1, 0, 0)),      # an LWW-Map key (crdt/maps.py, _check_key)
    ("o", (1, 0, 0, 3)),   # an OR-Map value's tag (crdt/maps.py, _decode_value)
])
def test_crdt_fields_with_a_deep_value_are_bad_state(name, path):
    """Each CRDT decoder names a bad value in its error: by a bounded repr, or the
    repr of a value nested 1,000 deep raised RecursionError out of the machine."""
    fields = {name: ENCODED_FIELDS[name]}
    body = pack_map([("k", pack("p")), ("a", pack("a1")), ("b", pack("counter")),
                     ("f", pack_replacing(fields, (name, *path), DEEP_LIST))])
    TARGETS["replication"].run([("n1", body, 0.0)])
    with node_stack(), pytest.raises(ReplicationError) as info:
        replication_machine().receive("n1", msgpack.unpackb(body), 0.0)
    assert info.value.reason == "bad_state"


@pytest.mark.parametrize("version, shown", [(DEEP_LIST, "[[[[[[[...]]]]]]]"), (b"\x02", "2"),
                                            (msgpack.packb("x" * 5000), "'xxxxxxxxxxxx")])
def test_a_client_envelope_with_a_bad_version_is_a_bad_request(version, shown):
    """The version is shown in the error by a bounded repr: a deep one was a
    RecursionError out of parse_request (a client could send it)."""
    frame = b"\x82\xa2id\xa1x\xa1v" + version
    TARGETS["wire"].run((frame, 1 << 20))
    with node_stack(), pytest.raises(wire.WireError) as info:
        wire.parse_request(frame, 1 << 20)
    assert info.value.code == wire.ErrorCode.BAD_REQUEST and info.value.request_id == "x"
    assert f"unsupported protocol version {shown}" in info.value.message
    assert len(info.value.message) < 200
