"""README's five-minute tour, command by command, against a three-node cluster:
each synthesis-ctl line runs as written (its --node pointed at the test cluster's
free ports instead of 7400/7410/7420) and answers what its comment says."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from support import REPO, Cluster, child_env

pytestmark = pytest.mark.timeout(180)


def tour_lines() -> list[tuple[str, str]]:
    """(command, comment) of every synthesis-ctl line of the tour, in order."""
    readme = (REPO / "README.md").read_text()
    tour = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", tour, re.S):
        for line in block.splitlines():
            if line.startswith("synthesis-ctl"):
                commands, _, comment = line.partition("  #")
                for command in commands.split("&&"):  # a && b: both, in order
                    lines.append((command.strip(), comment.strip()))
    return lines


def test_every_tour_command_answers_as_its_comment_says(tmp_path):
    lines = tour_lines()
    assert len(lines) >= 15, "the tour lost its commands?"
    cluster = Cluster(3, tmp_path)
    try:
        ports = {f"127.0.0.1:74{i}0": node.address for i, node in enumerate(cluster.nodes)}
        for command, comment in lines:
            args = shlex.split(command)[1:]
            if "--node" in args:
                args[args.index("--node") + 1] = ports[args[args.index("--node") + 1]]
            else:  # the default node, 127.0.0.1:7400
                args = ["--node", cluster.nodes[0].address, *args]
            done = subprocess.run([sys.executable, "-c", "import sys; from node.cli import "
                                   "ctl_main; sys.exit(ctl_main())", *args],
                                  capture_output=True, text=True, timeout=30,
                                  env=child_env(), cwd=str(tmp_path))
            expected_exit = 1 if "exit 1" in comment else 0
            assert done.returncode == expected_exit, (command, done.stdout, done.stderr)
            shown = re.match(r"(\{.*\})", comment)
            if shown and done.stdout.lstrip().startswith("{"):
                assert json.loads(done.stdout) == json.loads(shown.group(1)), command
            elif shown:  # a line per agent: each ends with what the comment shows
                for row in done.stdout.strip().splitlines():
                    assert json.loads(row.split(None, 1)[1]) == json.loads(shown.group(1))
    finally:
        cluster.close()
