"""Metrics of real node processes: the latency histograms fill in from real traffic,
the shipped Grafana dashboard and Prometheus alert rules name only metrics a live
node exports (and the alerts match docs/OPERATIONS.md), and idle connections to the
metrics port cannot hold the node's threads (issue 6 #11)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import psutil
import pytest
import yaml  # PyYAML: in the `test` extra
from prometheus_client.parser import text_string_to_metric_families

from node.client import AsyncClient
from node.metrics import HTTP_CONNECTIONS_MAX, HTTP_THREADS_SLACK
from support import REPO, Cluster, NodeProcess

pytestmark = pytest.mark.timeout(90)

DASHBOARD = REPO / "configs" / "grafana-dashboard.json"
ALERTS = REPO / "configs" / "prometheus-alerts.yml"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
# Metric names are told from PromQL functions and labels by their prefixes.
_METRIC_RE = re.compile(r"\b((?:synthesis|process|python)_[a-zA-Z0-9_]*[a-zA-Z0-9])\b")
# Series Prometheus makes itself, not read from /metrics.
PROMETHEUS_MADE = {"up"}


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    c = Cluster(2, tmp_path_factory.mktemp("metrics-live"), metrics=True)
    yield c
    c.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can hold, empty families included."""
    names = {name for name, _ in values(text)}
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = match.groups()
        names.add(name)
        if kind == "histogram":
            names |= {name + "_bucket", name + "_count", name + "_sum"}
    return names


def count(got: dict, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def test_latency_histograms_count_local_and_forwarded_calls(cluster2):
    entry, owner = cluster2.nodes
    calls = 40   # distinct agents: about half are owned by each node
    before_entry, before_owner = values(scrape(entry.metrics_port)), values(scrape(owner.metrics_port))
    with entry.client() as c:
        for i in range(calls):
            c.call(f"counter/live-{i}", "incr")
    after_entry, after_owner = values(scrape(entry.metrics_port)), values(scrape(owner.metrics_port))

    def delta(after, before, name, **labels):
        return count(after, name, **labels) - count(before, name, **labels)

    forwarded = delta(after_entry, before_entry, "synthesis_messages_forwarded_total", type="incr")
    assert 0 < forwarded < calls
    assert delta(after_entry, before_entry, "synthesis_request_seconds_count",
                 path="forwarded") == forwarded
    assert delta(after_entry, before_entry, "synthesis_forward_seconds_count") == forwarded
    assert delta(after_entry, before_entry, "synthesis_request_seconds_count",
                 path="local") == calls - forwarded
    # The owner handled the forwarded calls, but no client of its own made them.
    assert delta(after_owner, before_owner, "synthesis_handler_latency_seconds_count",
                 type="incr") == forwarded
    assert delta(after_owner, before_owner, "synthesis_request_seconds_count", path="local") == 0
    # A forward's round trip is part of its request's time, and neither is free.
    fwd_sum = delta(after_entry, before_entry, "synthesis_forward_seconds_sum")
    req_sum = delta(after_entry, before_entry, "synthesis_request_seconds_sum", path="forwarded")
    assert 0 < fwd_sum <= req_sum


def test_mailbox_wait_counts_queued_messages(cluster2):
    async def burst() -> None:  # async handlers always go through the mailbox
        async with AsyncClient(cluster2.nodes[0].address, timeout_s=10) as c:
            await asyncio.gather(*(c.call("slow/mailbox", "sleep", {"s": 0.05})
                                   for _ in range(5)))
    asyncio.run(burst())
    scrapes = [values(scrape(n.metrics_port)) for n in cluster2.nodes]
    [owner] = [got for got in scrapes
               if count(got, "synthesis_handler_latency_seconds_count", type="sleep") == 5]
    assert count(owner, "synthesis_mailbox_wait_seconds_count") >= 5
    # They queued behind one another: about 0.05 + 0.1 + 0.15 + 0.2 s in all.
    assert count(owner, "synthesis_mailbox_wait_seconds_sum") >= 0.1


def test_dashboard_and_alert_rules_name_only_exported_metrics(cluster2):
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert all({"alert", "expr", "labels", "annotations"} <= set(rule) for rule in alerts)
    exprs += [rule["expr"] for rule in alerts]
    named = {m for expr in exprs for m in _METRIC_RE.findall(expr)}
    assert len(named) >= 25, sorted(named)   # the pattern finds names at all

    exported = set()
    for node in cluster2.nodes:
        exported |= exported_names(scrape(node.metrics_port))
    assert named - exported == set()
    for rule in alerts:   # anything else a rule reads is made by Prometheus
        bare = set(re.findall(r"\b([a-z_]+)\{", rule["expr"])) - exported
        assert bare <= PROMETHEUS_MADE, (rule["alert"], bare)


def test_alert_rules_match_the_operations_guide():
    rules = yaml.safe_load(ALERTS.read_text())
    in_rules = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    guide = OPERATIONS.read_text()
    section = guide[guide.index("### Alerts"):]
    section = section[:section.index("\n### ", 1)]
    in_guide = set(re.findall(r"`(Synthesis[A-Za-z]+)`", section))
    assert in_rules and in_rules == in_guide


def test_idle_metrics_connections_cannot_hold_threads(tmp_path):
    """Slowloris: hundreds of idle connections to the metrics port (issue 6 #11)."""
    node = NodeProcess("slowloris", tmp_path, metrics=True)
    conns: list[socket.socket] = []
    try:
        node.wait_serving()
        proc = psutil.Process(node.proc.pid)
        baseline = proc.num_threads()
        bound = baseline + HTTP_CONNECTIONS_MAX + HTTP_THREADS_SLACK
        peak = baseline
        for _ in range(300):
            conns.append(socket.create_connection(("127.0.0.1", node.metrics_port), timeout=5))
            peak = max(peak, proc.num_threads())
        for _ in range(20):   # held a while: still bounded
            peak = max(peak, proc.num_threads())
            time.sleep(0.02)
        assert peak <= bound, (baseline, peak)
        # A health check and a scrape still get through while the attack holds.
        with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/health",
                                    timeout=5) as resp:
            assert resp.status == 200
        got = values(scrape(node.metrics_port))
        assert count(got, "synthesis_limited_total", reason="http_connections_max") >= 300 - \
            HTTP_CONNECTIONS_MAX
        assert count(got, "synthesis_http_connections_open") <= HTTP_CONNECTIONS_MAX
        with node.client() as c:
            c.ping()
    finally:
        for conn in conns:
            conn.close()
        node.kill()
