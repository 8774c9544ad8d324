"""A node on the pure-Python ring and a node on the compiled ring agree on every owner.

Clients and nodes may compute placement with either implementation (or another
language, per docs/PROTOCOL.md); a cluster mixing them must still give each
agent exactly one owner.
"""

from __future__ import annotations

import pytest

import core_cy
from support import NodeProcess

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif("cython" not in core_cy.implementations(), reason="compiled core_cy not built")
def test_pure_and_compiled_nodes_place_agents_identically(tmp_path):
    pure = NodeProcess("pure", tmp_path, env={"SYNTHESIS_PURE": "1"})
    try:
        fast = NodeProcess("fast", tmp_path, seeds=(pure.address,))
        try:
            for node in (pure, fast):
                node.wait_serving()
            with pure.client() as a, fast.client() as b:
                _wait_two_members(a)
                _wait_two_members(b)
                kernels = {m["node"]: m["kernels"] for m in a.status()["members"]}
                assert kernels == {"pure": "python", "fast": "cython"}
                owners = set()
                for i in range(40):
                    agent = f"counter/mixed-{i}"
                    from_pure = a.spawn("counter", agent)["node"]
                    from_fast = b.spawn("counter", agent)["node"]  # idempotent on the owner
                    assert from_pure == from_fast, agent
                    owners.add(from_pure)
                    a.call(agent, "incr")
                    assert b.call(agent, "get") == {"value": 1}
                assert owners == {"pure", "fast"}
                ring = core_cy.implementations()["python"].HashRing(["pure", "fast"])
                assert all(ring.owner(f"counter/mixed-{i}") ==
                           a.spawn("counter", f"counter/mixed-{i}")["node"] for i in range(40))
        finally:
            fast.kill()
    finally:
        pure.kill()


def _wait_two_members(client) -> None:
    import time
    deadline = time.monotonic() + 15
    while sum(1 for m in client.status()["members"] if m.get("reachable")) < 2:
        assert time.monotonic() < deadline, "nodes did not converge"
        time.sleep(0.05)
