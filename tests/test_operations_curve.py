"""docs/OPERATIONS.md "Securing a cluster", the loopback walk-through, run as written:
the same shell lines and the same configs/curve-*.toml files, with free ports in place
of 7500/7510/7520 (and the metrics ports) so the test never collides with anything."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO, free_port

pytestmark = pytest.mark.timeout(90)


def walkthrough() -> list[str]:
    """The shell lines of the walk-through, continuation lines joined."""
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    section = doc.split("**On one machine, to try it**", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip()]


def free_pair() -> int:
    """A free port whose next port (the derived PUB port) is free too."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def test_the_loopback_curve_walkthrough_runs_as_written(tmp_path):
    ports = {str(p): str(free_pair()) for p in (7500, 7510, 7520)}
    ports.update({str(p): str(free_port()) for p in (9500, 9510, 9520)})

    def ported(text: str) -> str:
        return re.sub(r"\b(7500|7510|7520|9500|9510|9520)\b", lambda m: ports[m.group(1)], text)

    (tmp_path / "configs").mkdir()
    for name in ("curve-a.toml", "curve-b.toml", "curve-c.toml"):
        text = ported((REPO / "configs" / name).read_text())
        (tmp_path / "configs" / name).write_text(text)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("NOTIFY_SOCKET", None)
    nodes: list[subprocess.Popen] = []
    last = None
    line = ""
    try:
        for line in map(ported, walkthrough()):
            if line.endswith("&"):
                log = open(tmp_path / f"node{len(nodes)}.log", "wb")
                nodes.append(subprocess.Popen(shlex.split(line[:-1]), cwd=tmp_path, env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
                time.sleep(0.5 if len(nodes) == 1 else 0)  # the seed first, as a shell would
                continue
            if nodes:  # a reader waits a moment for the nodes: here, until they meet
                _wait_three_members(line, tmp_path, env)
            last = subprocess.run(line, shell=True, cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=30)
            assert last.returncode == 0, (line, last.stderr)
        assert json.loads(last.stdout) == {"value": 5}
    finally:
        for proc in nodes:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    secret = tmp_path / "keys" / "a.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"


def _wait_three_members(line: str, cwd: Path, env: dict) -> None:
    command = line.split(" call ")[0] + " members --json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=30)
        if done.returncode == 0:
            rows = json.loads(done.stdout)["members"]
            if sorted(r["node_id"] for r in rows if r["state"] == "alive") == ["a", "b", "c"]:
                return
        time.sleep(0.3)
    raise AssertionError(f"the three nodes never listed each other: {done.stdout} {done.stderr}")
