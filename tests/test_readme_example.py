"""The behavior example in README.md works as written, in a real node."""

from __future__ import annotations

import re

import pytest

from node.client import RemoteError
from support import REPO

pytestmark = pytest.mark.timeout(60)


def test_readme_behavior_example_runs_in_a_node(node_factory, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text.split("## Writing a behavior", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "readme_behaviors.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # child_env() keeps it
    node = node_factory("--behavior", "readme_behaviors")
    with node.client() as c:
        assert c.call("greeter/ann", "greet", {"name": "Ann"}) == {"text": "hello Ann", "count": 1}
        assert c.call("greeter/ann", "greet", {"name": "Bo"})["count"] == 2
        with pytest.raises(RemoteError) as err:
            c.call("greeter/ann", "greet", {})
        assert err.value.code == "bad_request"
        reply = c.call("greeter/ann", "fingerprint", {"name": "Ann"})
        assert len(reply["fingerprint"]) == 16 and reply["request"]
