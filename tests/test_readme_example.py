"""The behavior example in README.md works exactly as the README says to run it:
`synthesis-node --behavior mybehaviors` in a directory holding mybehaviors.py, with no
PYTHONPATH, then `synthesis-ctl call greeter/ann greet '{"name": "Ann"}'`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.client import CallTimeout, Client, RemoteError
from support import REPO, START_TIMEOUT_S, free_port

pytestmark = pytest.mark.timeout(60)

WRAPPER = """\
#!{python}
# The console script's shape when the package is not installed: sys.path[0] is this
# script's directory, not the working directory.
import sys
sys.path.insert(1, {repo!r})
from node.cli import {entry}
sys.exit({entry}())
"""


def readme_module(heading: str = "## Writing a behavior") -> tuple[str, str]:
    """(module name, code) of the README's example under ``heading``."""
    section = (REPO / "README.md").read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    name = re.match(r"# (\w+)\.py\n", code).group(1)
    assert f"--behavior {name}" in section, "the README runs the module it shows"
    return name, code


def command(name: str, tmp_path: Path) -> str:
    """synthesis-node / synthesis-ctl as installed beside this Python, else a wrapper
    with the same sys.path shape."""
    installed = Path(sys.executable).parent / name
    if installed.exists():
        return str(installed)
    if shutil.which(name):
        return shutil.which(name)
    entry = "node_main" if name == "synthesis-node" else "ctl_main"
    path = tmp_path / name
    path.write_text(WRAPPER.format(python=sys.executable, repo=str(REPO), entry=entry))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def wait_serving(proc: subprocess.Popen, address: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with Client(address, timeout_s=0.5) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"node exited {proc.returncode}:\n{log.read_text()}"
            try:
                c.ping(timeout_s=0.3)
                return
            except CallTimeout:
                pass
    raise TimeoutError(f"node did not serve:\n{log.read_text()}")


@contextlib.contextmanager
def example_node(tmp_path: Path, heading: str):
    """The README module under ``heading`` written to a fresh directory, and a node
    started there the way the README says; yields (ctl(args) -> stdout, address)."""
    name, code = readme_module(heading)
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{name}.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "node.log"
    with open(log, "wb") as log_file:
        node = subprocess.Popen(
            [command("synthesis-node", tmp_path), "--behavior", name, "--listen", address,
             "--pub", f"127.0.0.1:{free_port()}", "--metrics", "off"],
            cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT)

    def ctl(*args: str) -> str:
        done = subprocess.run([command("synthesis-ctl", tmp_path), "--node", address, *args],
                              cwd=work, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout
    try:
        wait_serving(node, address, log)
        yield ctl, address
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(5)


def test_readme_behavior_example_runs_as_written(tmp_path):
    with example_node(tmp_path, "## Writing a behavior") as (ctl, address):
        out = ctl("call", "greeter/ann", "greet", '{"name": "Ann"}')
        assert json.loads(out) == {"text": "hello Ann", "count": 1}
        with Client(address, timeout_s=10) as c:
            assert c.call("greeter/ann", "greet", {"name": "Bo"})["count"] == 2
            with pytest.raises(RemoteError) as err:
                c.call("greeter/ann", "greet", {})
            assert err.value.code == "bad_request"
            reply = c.call("greeter/ann", "fingerprint", {"name": "Ann"})
            assert len(reply["fingerprint"]) == 16 and reply["request"]


def test_readme_replicated_state_example_runs_as_written(tmp_path):
    """The "Replicated state" example: its module, and its synthesis-ctl line with
    --consistency and --delivery, against a node started the way the README says."""
    section = (REPO / "README.md").read_text().split("### Replicated state", 1)[1]
    ctl_line = re.search(r"synthesis-ctl (call .*)\n", section).group(1)
    with example_node(tmp_path, "### Replicated state") as (ctl, address):
        assert json.loads(ctl(*shlex.split(ctl_line))) == {"members": ["ann"]}
        with Client(address, timeout_s=10) as c:
            assert c.call("room/lobby", "join", {"user": "bo"}) == {"members": ["ann", "bo"]}
