"""synthesis-ctl and synthesis-node on the command line: one-line errors with exit 2,
exit codes 1 and 3, --version, help texts, output of one-way commands.

Every command runs as a real process with a bounded time; nodes come from
node_factory, which kills them at teardown.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from support import REPO, child_env, free_port, wait_until

pytestmark = pytest.mark.timeout(90)

CTL = "import sys; from node.cli import ctl_main; sys.exit(ctl_main())"
NODE = "import sys; from node.cli import node_main; sys.exit(node_main())"


def run(entry: str, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", entry, *args], capture_output=True,
                          text=True, timeout=timeout_s, env=child_env(), cwd=str(REPO))


def ctl(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return run(CTL, *args, timeout_s=timeout_s)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert proc.stdout == ""


def dead_address() -> str:
    """A loopback port nothing listens on (free a moment ago)."""
    return f"127.0.0.1:{free_port()}"


# --- bad arguments: one line naming the argument, exit 2, no traceback -------------------

@pytest.mark.parametrize("args, words", [
    (["--node", "7400", "ping"], ["--node", "'7400'", "HOST:PORT"]),
    (["--node", "127.0.0.1:99999", "ping"], ["--node", "99999", "1..65535"]),
    (["ping", "--node", "localhost"], ["--node", "'localhost'"]),
    (["--timeout", "0", "ping"], ["--timeout", "'0'"]),
    (["--timeout", "soon", "ping"], ["--timeout", "'soon'"]),
    (["call", "counter/a", "incr", str(1 << 64)], ["data", str(1 << 64), "64 bits"]),
    (["call", "counter/a", "incr", json.dumps({"n": [-(1 << 63) - 1]})],
     ["data", str(-(1 << 63) - 1), "64 bits"]),
    (["call", "counter/a", "incr", "{n: 5}"], ["data", "not JSON"]),
    (["send", "counter/a", "incr", "{"], ["data", "not JSON"]),
    (["publish", "room", "incr", "[1,"], ["data", "not JSON"]),
    (["spawn", "counter", "jobs", "{'value': 1}"], ["init", "not JSON"]),
    (["call", "counter/a", "incr", "[" * 50_000 + "]" * 50_000], ["data", "deeply"]),
    (["call", "counter/a", "incr", '"\\ud800"'], ["data", "cannot be sent"]),
    (["frobnicate"], ["'frobnicate'"]),
    (["call", "counter/a"], ["type"]),
    (["status", "--bogus"], ["--bogus"]),
])
def test_bad_argument_is_one_line_and_exit_2(args, words):
    # The node address is never dialled: these fail before anything is sent.
    assert_one_line_error(ctl(*args), *words)


def test_node_bad_argument_is_one_line_and_exit_2():
    assert_one_line_error(run(NODE, "--bogus-flag"), "--bogus-flag")
    bad = run(NODE, "--supervision", "sometimes", "--metrics", "off")
    assert_one_line_error(bad, "supervision", "sometimes")


# --- a node that is not running ---------------------------------------------------------

@pytest.mark.parametrize("command", [["ping"], ["status"], ["call", "counter/a", "get"],
                                     ["send", "counter/a", "incr"],
                                     ["publish", "room", "incr"]])
def test_nothing_running_at_the_address_exits_3(command):
    address = dead_address()
    proc = ctl("--node", address, "--timeout", "0.3", *command)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"nothing answered at {address} within 0.3 s" in lines[0]
    assert "None" not in lines[0] and "Traceback" not in proc.stderr


# --- against a live node ----------------------------------------------------------------

def test_exit_codes_and_output_against_a_live_node(node_factory):
    node = node_factory()
    at = ("--node", node.address)

    ok = ctl(*at, "call", "counter/cli", "incr", '{"n": 5}')
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"value": 5}

    remote = ctl(*at, "call", "counter/cli", "fly")          # the node answers an error
    assert remote.returncode == 1
    assert remote.stderr.strip().splitlines() == [remote.stderr.strip()]
    assert remote.stderr.startswith("error unknown_type:")

    unknown = ctl(*at, "call", "nosuch/x", "get")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error unknown_agent:")

    sent = ctl(*at, "send", "counter/cli", "incr", '{"n": 2}')
    assert sent.returncode == 0 and sent.stdout.strip() == "sent to counter/cli"
    published = ctl(*at, "publish", "room", "incr")
    assert published.returncode == 0 and published.stdout.strip() == "published to group room"
    published_json = ctl(*at, "--json", "publish", "room", "incr")
    assert json.loads(published_json.stdout) == {"ok": True}
    assert json.loads(ctl(*at, "call", "counter/cli", "get").stdout) == {"value": 7}


def test_slow_reply_is_a_timeout_at_a_node_that_answers(node_factory):
    """The node answers ping, the agent does not reply in time: exit 3, and the
    message says the node is there."""
    node = node_factory()
    proc = ctl("--node", node.address, "--timeout", "0.5",
               "call", "slow/cli", "sleep", '{"s": 3}')
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "nothing answered" not in line
    assert f"the node at {node.address} answers" in line and "None" not in line


def test_members_table_and_json_against_two_live_nodes(node_factory):
    """`members` lists every member with its state and incarnation; --json prints
    exactly {"members": [rows]} with the five columns."""
    first = node_factory()
    second = node_factory(seeds=(first.address,))
    at = ("--node", first.address)

    def both_alive() -> dict | None:
        proc = ctl(*at, "--json", "members")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        states = {row["node_id"]: row["state"] for row in doc["members"]}
        return doc if states == {"n0": "alive", "n1": "alive"} else None

    doc = wait_until(both_alive, timeout_s=15, what="both nodes alive in `members --json`")
    assert list(doc) == ["members"]
    rows = {row["node_id"]: row for row in doc["members"]}
    for name, node in (("n0", first), ("n1", second)):
        assert set(rows[name]) == {"node_id", "address", "state", "incarnation", "agents"}
        assert rows[name]["address"] == f"tcp://{node.address}"
        assert type(rows[name]["incarnation"]) is int and rows[name]["incarnation"] > 0

    table = ctl(*at, "members")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NODE_ID", "ADDRESS", "STATE", "INCARNATION", "AGENTS"]
    cells = {line.split()[0]: line.split() for line in lines[1:3]}
    assert cells["n0"][1:4] == [f"tcp://{first.address}", "alive", str(rows["n0"]["incarnation"])]
    assert cells["n1"][1:4] == [f"tcp://{second.address}", "alive", str(rows["n1"]["incarnation"])]
    assert lines[3] == "2 member(s); answered by n0, quorate"

    nothing = ctl("--node", dead_address(), "--timeout", "0.3", "members")
    assert nothing.returncode == 3 and "nothing answered" in nothing.stderr


# --- --version and --help ---------------------------------------------------------------

def installed_version() -> str:
    try:
        return importlib.metadata.version("synthesis")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("package metadata not installed")


@pytest.mark.parametrize("entry, prog", [(CTL, "synthesis-ctl"), (NODE, "synthesis-node")])
def test_version(entry, prog):
    proc = run(entry, "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"{prog} {installed_version()}"


def test_node_help_shows_defaults_choices_and_exit_codes():
    text = " ".join(run(NODE, "--help").stdout.split())   # independent of line wrapping
    assert "--supervision {restart,stop,escalate}" in text
    assert "--log-level {debug,info,warning,error}" in text
    assert "Default: restart" in text and "Default: 127.0.0.1:7400" in text
    assert "working directory" in text
    assert "exit codes:" in text and "2 bad argument" in text


def test_ctl_help_texts():
    top = " ".join(ctl("--help").stdout.split())
    assert "default: 127.0.0.1:7400" in top and "default: 5" in top
    for code in ("0 success", "1 the node answered with an error", "2 bad argument",
                 "3 no reply within --timeout"):
        assert code in top
    call = ctl("call", "--help").stdout
    squashed = " ".join(call.split())
    assert "BEHAVIOR/NAME" in squashed and "counter/alice" in squashed
    assert "message type: the name a @handler of the agent's behavior handles" in squashed
    assert "exit codes:" in call


def test_closed_stdout_is_not_a_traceback(node_factory):
    """`synthesis-ctl status | head -1`: the reader leaves early; no traceback."""
    node = node_factory()
    proc = subprocess.Popen([sys.executable, "-c", CTL, "--node", node.address, "status"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
                            cwd=str(REPO))
    proc.stdout.close()          # before the child has printed anything
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and b"Traceback" not in err, err


def test_status_lists_breakers_that_are_not_closed():
    from node.cli import format_status
    status = {"node": "n0", "members": [
        {"node": "n0", "address": "tcp://h:1", "reachable": True,
         "transports": {"running": ["http2", "zmq"], "breakers": [
             {"peer": "n1", "transport": "http2", "state": "open", "opened": 2,
              "rejected": 7}]}},
        {"node": "n1", "address": "tcp://h:2", "reachable": True}]}
    text = format_status(status)
    assert "breaker n0 -> n1 over http2: open (opened 2 times, 7 sends turned away)" in text
    assert "2 node(s); answered by n0" in text
