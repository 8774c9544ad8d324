"""node.logs: JSON lines on stderr with the standard keys, level filtering, console mode."""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROGRAM = """
import sys
from node import logs
logs.configure(sys.argv[1], sys.argv[2], "n1")
log = logs.get_logger(agent_id="a1")
log.debug("dbg", x=1)
log.info("hello", trace_id="t1", count=3)
log.warning("careful")
log.bind(agent_id="a2").error("boom")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
print("stdout stays clean")
"""


def run(level: str, fmt: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    return subprocess.run([sys.executable, "-c", PROGRAM, level, fmt], capture_output=True,
                          text=True, timeout=30, env=env, check=True)


def json_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_json_lines_carry_standard_and_bound_keys():
    proc = run("info", "json")
    assert proc.stdout == "stdout stays clean\n"
    records = json_lines(proc.stderr)
    assert [r["event"] for r in records] == ["hello", "careful", "boom", "failed"]
    first = records[0]
    assert list(first)[:4] == ["timestamp", "level", "event", "node_id"]
    assert first["level"] == "info" and first["node_id"] == "n1"
    assert first["agent_id"] == "a1" and first["trace_id"] == "t1" and first["count"] == 3
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset().total_seconds() == 0
    assert records[2]["agent_id"] == "a2"
    assert "ZeroDivisionError" in records[3]["exception"]


@pytest.mark.parametrize("level, events", [
    ("debug", ["dbg", "hello", "careful", "boom", "failed"]),
    ("warning", ["careful", "boom", "failed"]),
    ("error", ["boom", "failed"]),
])
def test_level_filtering(level, events):
    assert [r["event"] for r in json_lines(run(level, "json").stderr)] == events


def test_console_format_is_human_readable():
    stderr = run("info", "console").stderr
    assert "hello" in stderr and "agent_id" in stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(stderr.splitlines()[0])


def test_bad_level_or_format_is_rejected():
    from node import logs
    with pytest.raises(ValueError):
        logs.configure("loud", "json", "n")
    with pytest.raises(ValueError):
        logs.configure("info", "xml", "n")
