"""The example client in docs/PROTOCOL.md works against a real node, as written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from support import REPO, child_env

pytestmark = pytest.mark.timeout(60)


def _example_client() -> str:
    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    section = text.split("### Example client", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_doc_example_client_talks_to_a_live_node(node_factory, tmp_path):
    node = node_factory()
    script = tmp_path / "example_client.py"
    script.write_text(_example_client())
    proc = subprocess.run([sys.executable, str(script), f"tcp://{node.address}"],
                          capture_output=True, text=True, timeout=30,
                          env=child_env(PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    lines = [ast.literal_eval(line) for line in proc.stdout.splitlines()]
    assert lines[0] == {"node": "n0"}
    assert lines[1] == {"value": 2}
    assert lines[2] == {"value": 2}
    assert lines[3] == {"ok": True}
    assert lines[4] == {"found": True, "value": "fast"}
    assert [m["node"] for m in lines[5]["members"]] == ["n0"]


def test_numbers_the_spec_states_are_the_code_s():
    """Defaults and bounds written in docs/PROTOCOL.md, checked against the code."""
    import dataclasses

    import inspect

    from node import agents
    from protocols import routing, status
    from node.config import NodeConfig
    from protocols import wire

    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig)}
    assert f"default **{defaults['max_message_bytes']}** bytes" in text
    assert "4 * max_message_bytes + 65536" in text  # the hard guard (node/runtime.py)
    assert f"`status_timeout_s` (default **{defaults['status_timeout_s']} s**" in text
    assert f"at most **{wire.NESTING_MAX}** levels" in text
    assert f"nesting deeper than {wire.NESTING_MAX} levels" in text
    assert f"at byte {wire.PEEK_BYTES_MAX}" in text
    assert f"after {wire.PEEK_KEYS_MAX} keys" in text
    assert f"at most {agents.GROUPS_PER_AGENT_MAX} groups" in text
    assert f"at most {agents.GROUPS_MAX:,} groups".replace(",", " ") in text
    assert f"at most {status.WAITS_MAX} status collections" in text
    vnodes = inspect.signature(routing.Router).parameters["vnodes"].default
    assert f"every node uses `V = {vnodes}`" in text
