"""synthesis-ctl call|send --consistency ... --delivery ...: parsed, checked, on the wire."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.cli import ctl_main
from support import REPO, child_env
from test_client_delivery import Router, reply

pytestmark = pytest.mark.timeout(90)

CTL = "import sys; from node.cli import ctl_main; sys.exit(ctl_main())"


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CTL, *args], capture_output=True, text=True,
                          timeout=30, env=child_env(), cwd=str(REPO))


@pytest.mark.parametrize("args, words", [
    (["call", "--consistency", "strong", "echo/a", "t"], ["--consistency", "'strong'", "quorum"]),
    (["send", "--delivery", "twice", "echo/a", "t"], ["--delivery", "'twice'", "exactly_once"]),
    (["call", "echo/a", "t", "--delivery", "CAUSAL"], ["--delivery", "'CAUSAL'"]),
    (["publish", "g", "t", "--delivery", "at_least_once"],  # publish is best effort only
     ["unrecognized", "--delivery"]),
])
def test_a_bad_choice_is_one_line_and_exit_2(args, words):
    proc = ctl(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert all(word in lines[0] for word in words), lines[0]


def test_help_lists_the_choices_and_what_they_mean(capsys):
    for command in ("call", "send"):
        with pytest.raises(SystemExit) as info:
            ctl_main([command, "--help"])
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "{local,quorum,all}" in text
        assert "{at_most_once,at_least_once,exactly_once,causal}" in text
        assert "majority of the agent's replicas" in text


@pytest.fixture
def router():
    r = Router(lambda e: reply(e, e.get("data")) if e.get("mode") == "call" else None)
    yield r
    r.close()


def test_flags_reach_the_wire(router, capsys):
    node = ["--node", router.address]
    assert ctl_main([*node, "call", "--consistency", "quorum", "--delivery", "exactly_once",
                     "a/1", "t", '{"x": 1}']) == 0
    assert json.loads(capsys.readouterr().out) == {"x": 1}
    assert ctl_main([*node, "send", "--delivery", "at_least_once", "a/1", "t", "2"]) == 0
    assert ctl_main([*node, "send", "--consistency", "all", "--delivery", "causal",
                     "a/1", "t", "3"]) == 0
    assert ctl_main([*node, "call", "a/1", "t", "4"]) == 0
    requests = [e for e in router.seen if e["type"] == "t"]
    fields = [(e["mode"], e.get("consistency"), e.get("delivery"), e.get("data"))
              for e in requests]
    assert fields == [("call", "quorum", "exactly_once", {"x": 1}),
                      ("call", None, "at_least_once", 2),   # acknowledged: a call
                      ("send", "all", "causal", 3),
                      ("call", None, None, 4)]
    assert "." in requests[0]["id"]  # exactly_once ids are unique among clients
    causal = requests[2]
    assert causal["vc"] == {causal["session"]: 1}


def test_a_real_node_answers_calls_and_sends_with_guarantees(node_factory):
    node = node_factory()
    proc = ctl("--node", node.address, "call", "--consistency", "local", "--delivery",
               "causal", "echo/a", "t", '{"k": [1, 2]}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"k": [1, 2]}
    for delivery in ("at_least_once", "exactly_once"):
        proc = ctl("--node", node.address, "send", "--delivery", delivery, "counter/c",
                   "incr", '{"n": 5}')
        assert (proc.returncode, proc.stdout.strip()) == (0, "sent to counter/c"), proc.stderr
    proc = ctl("--node", node.address, "--json", "call", "--consistency", "all", "counter/c",
               "get")
    assert json.loads(proc.stdout) == {"value": 10}
