"""synthesis-ctl pipeline, broadcast and publish --strategy: how arguments are read
(which one is the data, stages split at the last ':'), bad ones refused in one line
with exit 2 before anything is sent, and the output and error lines.

Parsing runs in process; the exit codes run synthesis-ctl as a real process against
an address nothing listens on.  Runs against live nodes are in test_node_routing.py.
"""

from __future__ import annotations

import pytest

from node.cli import (_broadcast_failures, _check_routed, _ctl_parser, _error_line,
                      broadcast_entries, format_broadcast)
from node.client import RemoteError
from test_cli import assert_one_line_error, ctl, dead_address

pytestmark = pytest.mark.timeout(60)


def parse(*argv: str):
    parser = _ctl_parser()
    args = parser.parse_args(argv)
    _check_routed(parser, args)
    return args


def refused(capsys, *argv: str) -> str:
    """The one-line message of arguments refused with exit 2."""
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


# --- pipeline: stages and data ----------------------------------------------------------------

@pytest.mark.parametrize("argv, stages, data", [
    (["echo/a:x", "counter/b:incr"], [("echo/a", "x"), ("counter/b", "incr")], None),
    (["echo/a:x", "counter/b:incr", '{"n": 5}'], [("echo/a", "x"), ("counter/b", "incr")],
     {"n": 5}),
    (["echo/a:x", "echo/b:y", "5"], [("echo/a", "x"), ("echo/b", "y")], 5),
    (["echo/a:x", "echo/b:y", "null"], [("echo/a", "x"), ("echo/b", "y")], None),
    (["echo/a:x", "echo/b:y", '"k:v"'], [("echo/a", "x"), ("echo/b", "y")], "k:v"),
    (["echo/a:x", "echo/b:y", "[1, 2]"], [("echo/a", "x"), ("echo/b", "y")], [1, 2]),
    (["kv/user:42:get", "echo/b:y"], [("kv/user:42", "get"), ("echo/b", "y")], None),
    (["--data", '{"n": 2}', "echo/a:x", "echo/b:y"], [("echo/a", "x"), ("echo/b", "y")],
     {"n": 2}),
    (["echo/a:x", "echo/b:y", "--data", "null"], [("echo/a", "x"), ("echo/b", "y")], None),
    ([f"echo/{i}:x" for i in range(16)], [(f"echo/{i}", "x") for i in range(16)], None),
])
def test_pipeline_arguments(argv, stages, data):
    args = parse("pipeline", *argv)
    assert (args.stages, args.data) == (stages, data)


@pytest.mark.parametrize("argv, words", [
    (["echo/a:x"], ["AGENT:TYPE", "2..16 stages", "got 1"]),
    (["echo/a:x", '{"n": 1}'], ["2..16 stages", "got 1"]),
    ([f"echo/{i}:x" for i in range(17)], ["2..16 stages", "got 17"]),
    (["echo/a:x", "echo/b:y", "{n: 1}"], ["argument data", "not JSON"]),
    (["echo/a:x", "counter/b"], ["argument data", "not JSON", "a stage is AGENT:TYPE"]),
    (["echo/a:x", ":y"], ["AGENT:TYPE", "':y' is not AGENT:TYPE"]),
    (["echo/a:x", "echo/b:"], ["'echo/b:' is not AGENT:TYPE"]),
    (["echo/a:x", "echo/b:syn.stop"], ["stage's type", "'syn.'"]),
    (["--data", "1", "echo/a:x", "echo/b:y", "2"], ["data is given twice"]),
])
def test_bad_pipeline_arguments(capsys, argv, words):
    err = refused(capsys, "pipeline", *argv)
    for word in words:
        assert word in err, (word, err)


# --- broadcast and publish --------------------------------------------------------------------

def test_broadcast_arguments():
    args = parse("broadcast", "counter/a", "counter/b", "--type", "incr", "--data", '{"n": 2}')
    assert (args.agents, args.type, args.data) == (["counter/a", "counter/b"], "incr", {"n": 2})
    assert parse("broadcast", "counter/a", "--type", "get").data is None


@pytest.mark.parametrize("argv, words", [
    (["counter/a"], ["--type"]),
    (["--type", "get"], ["AGENT"]),
    (["counter/a", "counter/b", "counter/a", "--type", "get"], ["'counter/a' is named twice"]),
    ([*(f"counter/{i}" for i in range(1001)), "--type", "get"], ["1..1000 agents", "1001"]),
    (["counter/a", "--type", "syn.ping"], ["--type", "'syn.'"]),
    (["counter/a", "--type", "get", "--data", "{"], ["--data", "not JSON"]),
])
def test_bad_broadcast_arguments(capsys, argv, words):
    err = refused(capsys, "broadcast", *argv)
    for word in words:
        assert word in err, (word, err)


def test_publish_strategy_argument(capsys):
    assert parse("publish", "room", "note").strategy is None
    assert parse("publish", "--strategy", "gossip", "room", "note", "1").strategy == "gossip"
    assert parse("publish", "room", "note", "--strategy", "multicast").strategy == "multicast"
    err = refused(capsys, "publish", "--strategy", "flood", "room", "note")
    assert "--strategy" in err and "'flood'" in err


# --- as a process: exit 2 before dialling, exit 3 when nothing answers --------------------------

@pytest.mark.parametrize("args, words", [
    (["pipeline", "echo/a:x"], ["AGENT:TYPE", "2..16"]),
    (["broadcast", "echo/a", "echo/a", "--type", "x"], ["named twice"]),
    (["publish", "--strategy", "flood", "room", "note"], ["--strategy"]),
])
def test_bad_arguments_exit_2_in_one_line(args, words):
    assert_one_line_error(ctl(*args), *words)


@pytest.mark.parametrize("command", [["pipeline", "echo/a:x", "echo/b:y"],
                                     ["broadcast", "echo/a", "--type", "x"],
                                     ["publish", "--strategy", "gossip", "room", "note"]])
def test_nothing_running_at_the_address_exits_3(command):
    address = dead_address()
    proc = ctl("--node", address, "--timeout", "0.3", *command)
    assert proc.returncode == 3, proc.stderr
    assert f"nothing answered at {address}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --- output and error lines ---------------------------------------------------------------------

GATHERED = {"counter/a": {"value": 1}, "kv/bee": RemoteError("unknown_type", "no 'incr'"),
            "echo/c": None, "slow/d": RemoteError("timeout", "no answer before the deadline")}


def test_broadcast_output():
    entries = broadcast_entries(GATHERED)
    assert entries == {"counter/a": {"data": {"value": 1}},
                       "kv/bee": {"error": {"code": "unknown_type", "message": "no 'incr'"}},
                       "echo/c": {"data": None},
                       "slow/d": {"error": {"code": "timeout",
                                            "message": "no answer before the deadline"}}}
    assert format_broadcast(entries).splitlines() == [
        'counter/a  {"value": 1}',
        "kv/bee     error unknown_type: no 'incr'",
        "echo/c     null",
        "slow/d     error timeout: no answer before the deadline"]
    assert _broadcast_failures(entries) == ("error unknown_type: 2 of 4 agents answered "
                                            "errors; first kv/bee: no 'incr'")
    assert _broadcast_failures(broadcast_entries({"counter/a": 1})) is None


def test_error_line_names_a_pipeline_stage_once():
    from_node = RemoteError("unknown_type", "stage 1 (counter/b fly): no handler", stage=1,
                            agent="counter/b")
    assert _error_line(from_node) == "error unknown_type: stage 1 (counter/b fly): no handler"
    terse = RemoteError("internal", "boom", stage=2, agent="kv/c")
    assert _error_line(terse) == "error internal: stage 2 (kv/c): boom"
    assert _error_line(RemoteError("timeout", "too slow")) == "error timeout: too slow"
