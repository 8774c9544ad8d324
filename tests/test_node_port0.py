"""A node on port 0: it binds free ports and reports them (ready file, stdout line).

Choosing a free port in the test and letting the node bind it later is a race: any
process can take the port in between.  With ``--listen 127.0.0.1:0`` the node binds
a free port itself; the ready file and the stdout line say which.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from node.client import Client
from support import REPO, START_TIMEOUT_S, child_env

pytestmark = pytest.mark.timeout(90)


class PortZeroNode:
    """``synthesis-node --listen 127.0.0.1:0`` with derived pub and metrics, no node
    id: everything it binds and its id come from the ready file."""

    def __init__(self, tmp_path: Path, name: str, *args: str):
        self.ready_path = tmp_path / f"{name}.ready.json"
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--listen", "127.0.0.1:0",
                 "--ready-file", str(self.ready_path), "--gossip-interval-s", "0.2", *args],
                stdout=out, stderr=err, env=child_env(), cwd=str(REPO))

    def ready(self) -> dict:
        """The ready file this process wrote (a file from an earlier run does not count)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                info = json.loads(self.ready_path.read_text())
            except FileNotFoundError:
                info = {}
            if info.get("pid") == self.proc.pid:
                return info
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no ready file (exit {self.proc.poll()}):\n"
                                     + self.err_path.read_text(errors="replace")[-3000:])
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def start(tmp_path):
    started: list[PortZeroNode] = []

    def start_node(name: str, *args: str) -> PortZeroNode:
        node = PortZeroNode(tmp_path, name, *args)
        started.append(node)
        return node

    yield start_node
    for node in started:
        node.kill()


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def test_port_0_node_reports_where_it_serves(start):
    node = start("solo")
    info = node.ready()
    assert set(info) == {"node_id", "address", "pub", "metrics", "pid"}
    assert info["pid"] == node.proc.pid
    host, port = host_port(info["address"])
    assert host == "127.0.0.1" and port != 0
    assert info["node_id"] == f"127.0.0.1:{port}"    # derived from the bound port
    pub_host, pub_port = host_port(info["pub"])
    metrics_host, metrics_port = host_port(info["metrics"])
    assert pub_host == metrics_host == "127.0.0.1"
    assert len({port, pub_port, metrics_port}) == 3 and 0 not in (pub_port, metrics_port)
    with Client(info["address"], timeout_s=5) as c:
        assert c.ping() == {"node": info["node_id"]}
        member = c.status()["members"][0]
        assert member["address"] == info["address"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=5) as r:
        assert json.loads(r.read())["node"] == info["node_id"]
    assert node.out_path.read_text() == \
        f"synthesis-node serving {info['node_id']} at {info['address']}\n"
    logged = [json.loads(line) for line in node.err_path.read_text().splitlines()
              if line.startswith("{")]
    serving = [r for r in logged if r["event"] == "node_serving"]
    assert serving and serving[0]["node_id"] == info["node_id"]
    assert serving[0]["address"] == info["address"]


def test_two_port_0_nodes_join_through_the_reported_address(start):
    first = start("a")
    first_info = first.ready()
    second = start("b", "--seed", first_info["address"], "--metrics", "off")
    second_info = second.ready()
    assert second_info["metrics"] is None
    ids = {first_info["node_id"], second_info["node_id"]}
    assert len(ids) == 2
    deadline = time.monotonic() + START_TIMEOUT_S
    seen: dict[str, set] = {}
    while time.monotonic() < deadline:
        for info in (first_info, second_info):
            with Client(info["address"], timeout_s=3) as c:
                members = c.status()["members"]
            seen[info["node_id"]] = {(m["node"], m["address"]) for m in members
                                     if m.get("reachable")}
        if all(len(view) == 2 for view in seen.values()):
            break
        time.sleep(0.1)
    expected = {(i["node_id"], i["address"]) for i in (first_info, second_info)}
    assert seen == {node_id: expected for node_id in ids}
    with Client(second_info["address"], timeout_s=5) as c:   # routing across both
        owners = {c.spawn("counter", f"counter/p{i}")["node"] for i in range(16)}
    assert owners == ids


def test_stale_ready_file_is_replaced_and_a_missing_directory_is_an_error(tmp_path, start):
    stale = tmp_path / "stale.ready.json"
    stale.write_text('{"address": "tcp://127.0.0.1:1", "pid": 1}')   # an earlier run's
    node = start("stale")
    info = node.ready()
    assert info["pid"] == node.proc.pid and info["address"] != "tcp://127.0.0.1:1"
    bad = subprocess.run([sys.executable, "-m", "node.cli", "--listen", "127.0.0.1:0",
                          "--metrics", "off", "--ready-file",
                          str(tmp_path / "missing" / "ready.json")],
                         capture_output=True, text=True, timeout=30, env=child_env(),
                         cwd=str(REPO))
    assert bad.returncode == 1, bad.stderr
    assert "cannot start" in bad.stderr and "ready.json" in bad.stderr
    assert bad.stdout == ""   # it never served
