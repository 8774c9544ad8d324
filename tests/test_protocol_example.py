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
