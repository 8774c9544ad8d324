"""scripts/cluster.sh: every verb with stand-in binaries, run from another directory,
and a real 3-node cluster when synthesis-node is installed.

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
print("fake node up", args, "cwd", os.getcwd(), flush=True)
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
    run_dir = os.environ.get("SYNTHESIS_RUN_DIR") or os.environ["FAKE_RUN_DIR"]
    nodes = len(glob.glob(os.path.join(run_dir, "*.pid")))
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
def elsewhere(tmp_path):
    """A working directory that is not the repository: every verb runs from here."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


@pytest.fixture
def env(tmp_path, elsewhere):
    run_dir = tmp_path / "run"
    environ = dict(os.environ, SYNTHESIS_RUN_DIR=str(run_dir),
                   SYNTHESIS_NODE_BIN=write_exe(tmp_path / "fake-node", FAKE_NODE),
                   SYNTHESIS_CTL_BIN=write_exe(tmp_path / "fake-ctl", FAKE_CTL),
                   SYNTHESIS_UP_TIMEOUT_S="10", SYNTHESIS_DOWN_TIMEOUT_S="1",
                   CWD=str(elsewhere))
    yield environ
    kill_recorded(run_dir)


def kill_recorded(run_dir: Path) -> None:
    """Last-resort cleanup: SIGKILL whatever pids the script left recorded."""
    for pid_file in run_dir.glob("n*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def cluster(environ: dict, *args: str, timeout_s: float = 30,
            script: Path = SCRIPT) -> subprocess.CompletedProcess:
    """Run the script from environ["CWD"] (not the repository)."""
    return subprocess.run(["bash", str(script), *args], env=environ, capture_output=True,
                          text=True, timeout=timeout_s, cwd=environ["CWD"])


def recorded_pids(environ: dict) -> list[int]:
    run_dir = Path(environ["SYNTHESIS_RUN_DIR"])
    return [int(p.read_text()) for p in sorted(run_dir.glob("n*.pid"))]


def recorded_pid(environ: dict, i: int) -> int | None:
    path = Path(environ["SYNTHESIS_RUN_DIR"]) / f"n{i}.pid"
    return int(path.read_text()) if path.exists() else None


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
    assert [line.split()[:2] for line in lines] == [["n0", "running"], ["n1", "running"]]
    assert f"127.0.0.1:{base + 10}" in lines[1] and f"127.0.0.1:{base + 2010}" in lines[1]
    pids = recorded_pids(env)
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    log1 = (Path(env["SYNTHESIS_RUN_DIR"]) / "n1.log").read_text()
    assert "--seed" in log1 and f"127.0.0.1:{base}" in log1 and "'n1'" in log1
    assert f"cwd {env['CWD']}" in log1   # nodes run where `up` was run

    status = cluster(env, "status")
    assert status.returncode == 0 and f"status ok 127.0.0.1 {base}" in status.stdout
    assert "n1   running" in status.stdout

    again = cluster(env, "up", "2", "--base-port", str(base + 500))
    assert again.returncode == 1 and "still running" in again.stderr
    assert recorded_pids(env) == pids

    down = cluster(env, "down")
    assert down.returncode == 0 and "stopped 2" in down.stdout
    assert wait_gone(pids)
    assert recorded_pids(env) == []


def test_default_state_dir_is_the_repo_of_the_script_not_the_cwd(env, tmp_path):
    """Without SYNTHESIS_RUN_DIR, `up` from one directory and `down` from another find
    the same cluster, in <repo>/.synthesis/cluster."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    script = repo / "scripts" / "cluster.sh"
    shutil.copy(SCRIPT, script)
    run_dir = repo / ".synthesis" / "cluster"
    environ = {k: v for k, v in env.items() if k != "SYNTHESIS_RUN_DIR"}
    environ["FAKE_RUN_DIR"] = str(run_dir)
    other = tmp_path / "other"
    other.mkdir()
    try:
        up = cluster(environ, "up", "1", "--base-port", str(free_base_port(1)), script=script)
        assert up.returncode == 0, up.stderr
        pids = [int(p.read_text()) for p in run_dir.glob("n*.pid")]
        assert len(pids) == 1 and pid_alive(pids[0])
        assert not (Path(env["CWD"]) / ".synthesis").exists()
        down = cluster(dict(environ, CWD=str(other)), "down", script=script)
        assert down.returncode == 0 and "stopped 1" in down.stdout, down.stderr
        assert wait_gone(pids)
    finally:
        kill_recorded(run_dir)


def test_node_options_after_double_dash_reach_every_node(env):
    base = free_base_port(2)
    up = cluster(env, "up", "2", "--base-port", str(base), "--",
                 "--behavior", "mybehaviors", "--log-level", "debug")
    assert up.returncode == 0, up.stderr
    run_dir = Path(env["SYNTHESIS_RUN_DIR"])
    for i in range(2):
        log = (run_dir / f"n{i}.log").read_text()
        assert "'--behavior', 'mybehaviors', '--log-level', 'debug'" in log, log
    # restart keeps them
    assert cluster(env, "restart", "1").returncode == 0
    assert (run_dir / "n1.log").read_text().count("'--behavior', 'mybehaviors'") == 2
    assert cluster(env, "down").returncode == 0


def test_stop_kill_restart_logs_one_node(env):
    base = free_base_port(3)
    assert cluster(env, "up", "3", "--base-port", str(base)).returncode == 0
    n1 = recorded_pid(env, 1)

    stop = cluster(env, "stop", "1")
    assert stop.returncode == 0 and stop.stdout.strip() == f"stopped n1 (pid {n1})"
    assert wait_gone([n1]) and recorded_pid(env, 1) is None
    status = cluster(env, "status")
    assert "n1   stopped" in status.stdout and "n0   running" in status.stdout
    again = cluster(env, "stop", "n1")          # already stopped: says so, succeeds
    assert again.returncode == 0 and "n1 was not running" in again.stdout

    restart = cluster(env, "restart", "n1")
    assert restart.returncode == 0, restart.stderr
    new_n1 = recorded_pid(env, 1)
    assert new_n1 != n1 and pid_alive(new_n1)
    assert f"127.0.0.1:{base + 10}" in restart.stdout

    logs = cluster(env, "logs", "1")
    assert logs.returncode == 0 and logs.stdout.count("fake node up") == 2
    assert "starting n1" in logs.stdout           # restart appends to the log

    n2 = recorded_pid(env, 2)
    kill = cluster(env, "kill", "2")
    assert kill.returncode == 0 and f"killed n2 (pid {n2})" in kill.stdout
    assert wait_gone([n2])

    restart0 = cluster(env, "restart", "0")      # a running node: stopped, then started
    assert restart0.returncode == 0, restart0.stderr
    log0 = (Path(env["SYNTHESIS_RUN_DIR"]) / "n0.log").read_text().split("starting n0")[-1]
    assert f"'--seed', '127.0.0.1:{base + 10}'" in log0   # node 0 rejoins through n1

    pids = recorded_pids(env)
    down = cluster(env, "down")
    assert down.returncode == 0 and "stopped 2" in down.stdout
    assert wait_gone(pids)


def test_kill_is_sigkill_and_stop_escalates(env):
    env = dict(env, FAKE_IGNORE_TERM="1")
    assert cluster(env, "up", "2", "--base-port", str(free_base_port(2))).returncode == 0
    n0, n1 = recorded_pids(env)
    kill = cluster(env, "kill", "0", timeout_s=10)
    assert kill.returncode == 0 and "SIGKILL" not in kill.stderr
    assert wait_gone([n0])
    stop = cluster(env, "stop", "1")
    assert stop.returncode == 0 and "SIGKILL" in stop.stderr
    assert wait_gone([n1])


def test_down_escalates_to_sigkill(env):
    env = dict(env, FAKE_IGNORE_TERM="1")
    base = free_base_port(1)
    assert cluster(env, "up", "1", "--base-port", str(base)).returncode == 0
    pids = recorded_pids(env)
    down = cluster(env, "down")
    assert "SIGKILL" in down.stderr
    assert wait_gone(pids)


def test_down_stops_a_node_restarted_by_hand(env, tmp_path):
    """n1 killed and started again by hand on its address: its pid file is stale, yet
    `down` stops all nodes and the next `up` finds its ports free."""
    base = free_base_port(2)
    assert cluster(env, "up", "2", "--base-port", str(base)).returncode == 0
    os.kill(recorded_pid(env, 1), signal.SIGKILL)
    assert wait_gone(recorded_pids(env)[1:])
    hand = subprocess.Popen([env["SYNTHESIS_NODE_BIN"], "--listen", f"127.0.0.1:{base + 10}"],
                            stdout=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 10
        while port_free(base + 10):
            assert time.monotonic() < deadline and hand.poll() is None
            time.sleep(0.05)
        n0 = recorded_pid(env, 0)
        down = cluster(env, "down")
        assert down.returncode == 0 and "stopped 2" in down.stdout, down.stdout + down.stderr
        assert hand.wait(timeout=10) is not None
        assert wait_gone([n0])
        up = cluster(env, "up", "2", "--base-port", str(base))
        assert up.returncode == 0, up.stderr
    finally:
        hand.kill()
        hand.wait(timeout=5)
        cluster(env, "down")


def test_up_refuses_a_busy_port_naming_it(env):
    base = free_base_port(2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 10))
        holder.listen()
        up = cluster(env, "up", "2", "--base-port", str(base))
    assert up.returncode == 1
    assert f"port {base + 10} (n1 listen) is already in use by pid {os.getpid()}" in up.stderr
    assert recorded_pids(env) == []                # nothing was started


def test_down_touches_only_recorded_pids(env, tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = Path(env["SYNTHESIS_RUN_DIR"])
        run_dir.mkdir()
        (run_dir / "n0.pid").write_text("not-a-pid\n")
        down = cluster(env, "down")
        assert down.returncode == 0 and "stopped 0" in down.stdout
        # A recorded pid that now belongs to another process (pid reuse) is left alone.
        (run_dir / "count").write_text("1\n")
        (run_dir / "base").write_text(f"{free_base_port(1)}\n")
        (run_dir / "n0.pid").write_text(f"{bystander.pid}\n")
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
    base = free_base_port(1)
    (run_dir / "count").write_text("1\n")
    (run_dir / "base").write_text(f"{base}\n")
    (run_dir / "n0.pid").write_text(f"{dead.pid}\n")
    try:
        up = cluster(env, "up", "1", "--base-port", str(base))
        assert up.returncode == 0, up.stderr
    finally:
        cluster(env, "down")


def test_node_that_dies_fails_up_and_is_cleaned(env):
    env = dict(env, FAKE_EXIT="1")
    up = cluster(env, "up", "2", "--base-port", str(free_base_port(2)))
    assert up.returncode == 1 and "exited" in up.stderr
    assert recorded_pids(env) == []


@pytest.mark.parametrize("args, message", [
    (["up"], "up needs N"),
    (["up", "0"], "N must be 1..64, got '0'"),
    (["up", "x"], "got 'x'"),
    (["up", "2", "--bogus"], "unknown option '--bogus' for up; node options go after '--'"),
    (["up", "2", "--behavior", "m"], "node options go after '--'"),
    (["up", "2", "--", "--listen", "127.0.0.1:1"], "'--listen' is set by cluster.sh"),
    (["up", "2", "--", "--seed=127.0.0.1:1"], "'--seed' is set by cluster.sh"),
    (["up", "2", "--base-port", "65000"], "past 65535"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["status", "--bogus"], "unknown option '--bogus' for status"),
    (["down", "now"], "down takes no arguments"),
])
def test_bad_arguments_exit_2_and_say_what_was_wrong(env, args, message):
    proc = cluster(env, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert recorded_pids(env) == []


def test_node_index_is_checked(env):
    assert "no cluster" in cluster(env, "stop", "1").stderr
    assert cluster(env, "up", "2", "--base-port", str(free_base_port(2))).returncode == 0
    try:
        for verb in ("stop", "kill", "restart", "logs"):
            proc = cluster(env, verb, "2")
            assert proc.returncode == 2, (verb, proc.stderr)
            assert "no node '2' in this cluster: nodes are 0..1" in proc.stderr
        assert cluster(env, "stop").returncode == 2
        assert cluster(env, "logs", "0", "-x").returncode == 2
    finally:
        cluster(env, "down")


def test_usage_text(env):
    helped = cluster(env, "--help")
    assert helped.returncode == 0 and helped.stderr == ""
    for verb in ("up N [--base-port P] [-- NODE OPTIONS...]", "status", "stop I", "kill I",
                 "restart I", "logs I", "down"):
        assert verb in helped.stdout
    assert "set -e" not in helped.stdout and "#" not in helped.stdout
    bare = cluster(env)
    assert bare.returncode == 2 and bare.stderr == helped.stdout


def test_status_without_cluster_fails(env):
    status = cluster(env, "status")
    assert status.returncode == 1 and "no cluster" in status.stderr


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


BEHAVIOR_MODULE = """\
from node import Agent, behavior, handler


@behavior("hello")
class Hello(Agent):
    @handler("hi")
    def hi(self, data):
        return {"hello": data}
"""


def wait_all_up(environ: dict, count: int, timeout_s: float = 20) -> subprocess.CompletedProcess:
    """`status` until every node shows as up (membership converges over gossip rounds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = cluster(environ, "status", timeout_s=20)
        rows = [line.split() for line in status.stdout.splitlines()]
        up = {row[0] for row in rows if len(row) > 2 and row[2] == "up"}
        if up == {f"n{i}" for i in range(count)} or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


@pytest.mark.skipif(not node_cli_imports(), reason="node.cli does not import yet")
@pytest.mark.timeout(120)
def test_real_three_node_cluster(tmp_path, elsewhere):
    """From a directory that is not the repo: up with a behavior module that lives in
    that directory, kill and restart a node, down."""
    (elsewhere / "clusterbehaviors.py").write_text(BEHAVIOR_MODULE)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("SYNTHESIS_NODE_BIN", "SYNTHESIS_CTL_BIN", "PYTHONPATH")}
    environ.update(SYNTHESIS_RUN_DIR=str(tmp_path / "run"), SYNTHESIS_UP_TIMEOUT_S="30",
                   CWD=str(elsewhere))
    bin_dir = real_bin_dir(tmp_path)
    environ["PATH"] = os.pathsep.join([str(bin_dir), environ.get("PATH", "")])
    base = free_base_port(3)
    try:
        up = cluster(environ, "up", "3", "--base-port", str(base), "--",
                     "--behavior", "clusterbehaviors", "--gossip-interval-s", "0.2",
                     timeout_s=60)
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(up.stdout.strip().splitlines()) == 3
        status = wait_all_up(environ, 3)
        assert status.returncode == 0, status.stderr
        call = subprocess.run([str(bin_dir / "synthesis-ctl"), "--node", f"127.0.0.1:{base + 20}",
                               "call", "hello/x", "hi", '"there"'], env=environ,
                              capture_output=True, text=True, timeout=30, cwd=elsewhere)
        assert call.returncode == 0 and '"hello": "there"' in call.stdout, call.stderr

        killed = recorded_pids(environ)[1]
        assert cluster(environ, "kill", "1").returncode == 0
        assert wait_gone([killed])
        restart = cluster(environ, "restart", "1", timeout_s=60)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        status = wait_all_up(environ, 3)
        assert "n1   running" in status.stdout, status.stdout
        assert sum(" up " in line for line in status.stdout.splitlines()) == 3, status.stdout
    finally:
        pids = recorded_pids(environ)
        cluster(environ, "down", timeout_s=30)
        kill_recorded(tmp_path / "run")
        assert wait_gone(pids, timeout_s=5)
