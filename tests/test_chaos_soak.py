"""Soak under failures: a node is killed and restarted twice while clients keep calling.

Invariants: every call ends (a reply, 'unavailable', or a client timeout: never
a hang or another error); no increment acknowledged at `quorum` is lost, on the
victim's agents too (their replicas outlive it); no counter exceeds the
increments sent to it; once the victim is back, its agents answer again.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from node.client import AsyncClient, CallTimeout, RemoteError
from support import Cluster, NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

AGENTS = [f"counter/soak-{i}" for i in range(60)]
ROUNDS_S = 3.0


async def _hammer(address: str, acked: dict[str, int], sent: dict[str, int],
                  outcomes: dict[str, int], seconds: float) -> None:
    async with AsyncClient(address, timeout_s=2.0) as c:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for agent in AGENTS:
                sent[agent] = sent.get(agent, 0) + 1
            results = await asyncio.gather(
                *(c.call(a, "incr", consistency="quorum") for a in AGENTS),
                return_exceptions=True)
            for agent, r in zip(AGENTS, results):
                if isinstance(r, dict):
                    acked[agent] = max(acked.get(agent, 0), r["value"])
                    outcomes["ok"] += 1
                elif isinstance(r, RemoteError) and r.code == "unavailable":
                    outcomes["unavailable"] += 1
                elif isinstance(r, CallTimeout) or (
                        isinstance(r, RemoteError) and r.code == "timeout"):
                    outcomes["timeout"] += 1
                else:
                    raise AssertionError(f"unexpected outcome for {agent}: {r!r}")


def test_kill_and_restart_under_load(tmp_path):
    cluster = Cluster(3, tmp_path)
    try:
        n0, n1, n2 = cluster.nodes
        with n0.client() as c:
            owners = {a: c.spawn("counter", a)["node"] for a in AGENTS}
        assert set(owners.values()) == {"n0", "n1", "n2"}
        acked: dict[str, int] = {}
        sent: dict[str, int] = {}
        outcomes = {"ok": 0, "unavailable": 0, "timeout": 0}
        for round_no in range(2):
            asyncio.run(_hammer(n0.address, acked, sent, outcomes, ROUNDS_S / 2))
            cluster.nodes[2].kill()
            asyncio.run(_hammer(n1.address, acked, sent, outcomes, ROUNDS_S / 2))
            (tmp_path / f"r{round_no}").mkdir()
            reborn = NodeProcess("n2", tmp_path / f"r{round_no}", seeds=(n0.address,))
            cluster.nodes[2] = reborn
            reborn.wait_serving()
            cluster.wait_converged()
        asyncio.run(_hammer(n1.address, acked, sent, outcomes, ROUNDS_S / 2))
        assert outcomes["ok"] > 0 and outcomes["unavailable"] + outcomes["timeout"] > 0, outcomes
        with n0.client() as c:
            for agent in AGENTS:
                value = c.call(agent, "get")["value"]
                # A call that timed out or was refused may still have applied,
                # hence a range: at least every acknowledged increment, at most
                # every increment sent.
                assert acked.get(agent, 0) <= value <= sent[agent], \
                    (agent, owners[agent], value, acked.get(agent), sent[agent])
    finally:
        cluster.close()
