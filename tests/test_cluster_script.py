"""scripts/cluster.sh: run-dir handling with stand-in binaries, and a real 3-node cluster
when synthesis-node is installed.

Every test bounds its time and tears its processes down in a finally, by the pids the
script recorded.
"""

import importlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cluster.sh"
VENV_BIN = REPO / ".venv" / "bin"

FAKE_NODE = """\
#!{python}
# Stand-in for synthesis-node: listens on --listen, optionally ignores SIGTERM.
import os, signal, socket, sys, time
args = sys.argv[1:]
host, port = args[args.index("--listen") + 1].rsplit(":", 1)
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("FAKE_EXIT"):
    sys.exit(3)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, int(port)))
sock.listen()
print("fake node up", args, flush=True)
time.sleep(120)
"""

FAKE_CTL = """\
#!{python}
# Stand-in for synthesis-ctl: status succeeds when the node's port accepts; with
# --json it reports every node of the run dir as a reachable member.
import glob, os, socket, sys
host, port = sys.argv[sys.argv.index("--node") + 1].rsplit(":", 1)
socket.create_connection((host, int(port)), timeout=1).close()
if "--json" in sys.argv:
    nodes = len(glob.glob(os.path.join(os.environ["SYNTHESIS_RUN_DIR"], "*.pid")))
    print('{{"members": [' + ", ".join(['{{"reachable": true}}'] * nodes) + ']}}')
else:
    print("status ok", host, port)
"""


def free_base_port(count: int) -> int:
    """A base port P whose node, PUB and metrics ports for `count` nodes are all free."""
    for base in range(20000, 40000, 97):
        ports = [p for i in range(count) for p in (base + 10 * i, base + 10 * i + 1,
                                                    base + 2000 + 10 * i)]
        if all(port_free(p) for p in ports):
            return base
    pytest.skip("no free port range found")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_exe(path: Path, text: str) -> str:
    path.write_text(text.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def env(tmp_path):
    run_dir = tmp_path / "run"
    environ = dict(os.environ, SYNTHESIS_RUN_DIR=str(run_dir),
                   SYNTHESIS_NODE_BIN=write_exe(tmp_path / "fake-node", FAKE_NODE),
                   SYNTHESIS_CTL_BIN=write_exe(tmp_path / "fake-ctl", FAKE_CTL),
                   SYNTHESIS_UP_TIMEOUT_S="10", SYNTHESIS_DOWN_TIMEOUT_S="1")
    yield environ
    kill_recorded(run_dir)


def kill_recorded(run_dir: Path) -> None:
    """Last-resort cleanup: SIGKILL whatever pids the script left recorded."""
    for pid_file in run_dir.glob("n*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def cluster(environ: dict, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True,
                          text=True, timeout=timeout_s, cwd=REPO)


def recorded_pids(environ: dict) -> list[int]:
    run_dir = Path(environ["SYNTHESIS_RUN_DIR"])
    return [int(p.read_text()) for p in sorted(run_dir.glob("n*.pid"))]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_up_status_down_with_stand_ins(env):
    base = free_base_port(2)
    up = cluster(env, "up", "2", "--base-port", str(base))
    assert up.returncode == 0, up.stderr
    lines = up.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["n0", "n1"]
    assert f"127.0.0.1:{base + 10}" in lines[1] and f"127.0.0.1:{base + 2010}" in lines[1]
    pids = recorded_pids(env)
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    log1 = (Path(env["SYNTHESIS_RUN_DIR"]) / "n1.log").read_text()
    assert "--seed" in log1 and f"127.0.0.1:{base}" in log1 and "'n1'" in log1

    status = cluster(env, "status")
    assert status.returncode == 0 and f"status ok 127.0.0.1 {base}" in status.stdout

    again = cluster(env, "up", "2", "--base-port", str(base + 500))
    assert again.returncode != 0 and "still running" in again.stderr
    assert recorded_pids(env) == pids

    down = cluster(env, "down")
    assert down.returncode == 0 and "stopped 2" in down.stdout
    assert wait_gone(pids)
    assert recorded_pids(env) == []


def test_down_escalates_to_sigkill(env):
    env = dict(env, FAKE_IGNORE_TERM="1")
    base = free_base_port(1)
    assert cluster(env, "up", "1", "--base-port", str(base)).returncode == 0
    pids = recorded_pids(env)
    down = cluster(env, "down")
    assert "SIGKILL" in down.stderr
    assert wait_gone(pids)


def test_down_touches_only_recorded_pids(env, tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = Path(env["SYNTHESIS_RUN_DIR"])
        run_dir.mkdir()
        (run_dir / "n0.pid").write_text("not-a-pid\n")
        down = cluster(env, "down")
        assert down.returncode == 0 and "stopped 0" in down.stdout
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=5)


def test_stale_pid_files_do_not_block_up(env):
    run_dir = Path(env["SYNTHESIS_RUN_DIR"])
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    (run_dir / "n0.pid").write_text(f"{dead.pid}\n")
    base = free_base_port(1)
    try:
        up = cluster(env, "up", "1", "--base-port", str(base))
        assert up.returncode == 0, up.stderr
    finally:
        cluster(env, "down")


def test_node_that_dies_fails_up_and_is_cleaned(env):
    env = dict(env, FAKE_EXIT="1")
    up = cluster(env, "up", "2", "--base-port", str(free_base_port(2)))
    assert up.returncode != 0 and "exited" in up.stderr
    assert recorded_pids(env) == []


@pytest.mark.parametrize("args", [["up"], ["up", "0"], ["up", "x"], ["up", "2", "--bogus"],
                                  ["up", "2", "--base-port", "65000"], ["frobnicate"]])
def test_bad_arguments_are_refused(env, args):
    assert cluster(env, *args).returncode != 0
    assert recorded_pids(env) == []


def test_status_without_cluster_fails(env):
    status = cluster(env, "status")
    assert status.returncode != 0 and "no cluster" in status.stderr


# --- the real thing ----------------------------------------------------------------------

def node_cli_imports() -> bool:
    try:
        importlib.import_module("node.cli")
    except Exception:  # noqa: BLE001 - any import failure means "not ready yet"
        return False
    return True


def real_bin_dir(tmp_path: Path) -> Path:
    """Directory holding synthesis-node/-ctl: the installed ones, else thin wrappers
    around node.cli so the test also runs from an uninstalled checkout."""
    if shutil.which("synthesis-node") and shutil.which("synthesis-ctl"):
        return Path(shutil.which("synthesis-node")).parent
    if (VENV_BIN / "synthesis-node").exists() and (VENV_BIN / "synthesis-ctl").exists():
        return VENV_BIN
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, entry in (("synthesis-node", "node_main"), ("synthesis-ctl", "ctl_main")):
        write_exe(bin_dir / name, WRAPPER.replace("ENTRY", entry))
    return bin_dir


WRAPPER = f"""\
#!{{python}}
import sys
sys.path.insert(0, {str(REPO)!r})
from node.cli import ENTRY
sys.exit(ENTRY(sys.argv[1:]))
"""


@pytest.mark.skipif(not node_cli_imports(), reason="node.cli does not import yet")
@pytest.mark.timeout(90)
def test_real_three_node_cluster(tmp_path):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("SYNTHESIS_NODE_BIN", "SYNTHESIS_CTL_BIN")}
    environ.update(SYNTHESIS_RUN_DIR=str(tmp_path / "run"), SYNTHESIS_UP_TIMEOUT_S="30")
    environ["PATH"] = os.pathsep.join([str(real_bin_dir(tmp_path)), environ.get("PATH", "")])
    base = free_base_port(3)
    try:
        up = cluster(environ, "up", "3", "--base-port", str(base), timeout_s=60)
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(up.stdout.strip().splitlines()) == 3
        deadline = time.monotonic() + 20
        while True:   # membership converges over a few gossip rounds
            status = cluster(environ, "status", timeout_s=20)
            if all(f"n{i} " in status.stdout for i in range(3)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status.returncode == 0, status.stderr
        assert all(f"n{i} " in status.stdout for i in range(3)), status.stdout
    finally:
        pids = recorded_pids(environ)
        cluster(environ, "down", timeout_s=30)
        kill_recorded(tmp_path / "run")
        assert wait_gone(pids, timeout_s=5)
