"""The design rule: protocols are pure.

Every module under ``protocols/`` (subpackages included) must import with
``zmq``, ``asyncio`` and ``socket`` unimportable, and its syntax tree must not
read a clock, sleep, or use the module-level ``random`` functions.  Constructing
``random.Random(seed)`` is allowed.  (``time`` itself cannot be blocked:
msgpack imports it.)
"""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "protocols"
BLOCKED = ("zmq", "asyncio", "socket")

# module -> attribute names that must not be used
FORBIDDEN = {
    "time": {"time", "time_ns", "monotonic", "monotonic_ns", "perf_counter",
             "perf_counter_ns", "process_time", "process_time_ns", "sleep",
             "localtime", "gmtime", "ctime", "asctime"},
    "asyncio": {"sleep", "get_event_loop", "get_running_loop", "run"},
    "random": {name for name in dir(random)
               if not name.startswith("_") and callable(getattr(random, name))
               and name != "Random"},
    "datetime": {"now", "utcnow", "today"},  # datetime.now(), date.today(), ...
    "os": {"urandom", "getrandom"},
    "secrets": {"token_bytes", "token_hex", "randbits", "choice", "randbelow"},
    "uuid": {"uuid1", "uuid4"},
}
# Classes whose methods read the clock: datetime.datetime.now(), datetime.date.today().
CLOCK_CLASSES = {("datetime", "datetime"), ("datetime", "date")}


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file for every .py file of the package, subpackages included."""
    base = root / package
    modules = {}
    for path in sorted(base.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def find_violations(source: str, filename: str = "<string>") -> list[str]:
    """Clock, sleep and global-random uses in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    # local name -> what it stands for, as a dotted path ("time", "datetime.datetime")
    aliases: dict[str, str] = {}

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    def forbidden(path: list[str]) -> bool:  # path starts at the module
        if tuple(path[:2]) in CLOCK_CLASSES:
            return len(path) >= 3 and path[2] in FORBIDDEN["datetime"]
        return len(path) >= 2 and path[1] in FORBIDDEN.get(path[0], ())

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = \
                    a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            for a in node.names:
                if a.name == "*" and top in FORBIDDEN:
                    flag(node, f"from {node.module} import *")
                elif a.name in FORBIDDEN.get(top, ()) and top != "datetime":
                    flag(node, f"from {node.module} import {a.name}")
                else:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            path = _dotted(node)
            if not path:
                continue
            resolved = aliases.get(path[0], path[0]).split(".") + path[1:]
            if resolved[0] in FORBIDDEN and forbidden(resolved):
                flag(node, ".".join(resolved))
    return found


_IMPORT_ALL = r"""
import importlib, json, sys

BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not allowed in protocols/")
        return None

for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, {root!r})
failures = {{}}
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except BaseException as exc:
        failures[module] = f"{{type(exc).__name__}}: {{exc}}"
leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
print(json.dumps({{"failures": failures, "leaked": leaked}}))
"""


def import_blocked(root: Path, modules: list[str]) -> dict:
    script = _IMPORT_ALL.format(blocked=BLOCKED, root=str(root), modules=modules)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=str(root))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the rule

def test_package_has_modules():
    modules = module_files()
    assert {"protocols", "protocols.wire", "protocols.membership"} <= set(modules)


def test_protocols_import_without_zmq_asyncio_socket():
    result = import_blocked(ROOT, sorted(module_files()))
    assert result["failures"] == {}, result["failures"]
    assert result["leaked"] == []


@pytest.mark.parametrize("module", sorted(module_files()))
def test_protocols_do_not_read_clocks_or_global_random(module):
    path = module_files()[module]
    violations = find_violations(path.read_text(encoding="utf-8"), str(path))
    assert violations == [], "\n".join(violations)


# ------------------------------------------------------------------ the checker

BAD_SNIPPETS = [
    "import time\nt = time.time()",
    "import time\ntime.sleep(1)",
    "import time\nx = time.monotonic()",
    "import time\nx = time.perf_counter()",
    "import time as t\nx = t.monotonic()",
    "import time\nclock = time.monotonic  # a reference is as bad as a call",
    "from time import time",
    "from time import monotonic as mono",
    "from time import *",
    "import asyncio\nasync def f():\n    await asyncio.sleep(0)",
    "import random\nx = random.random()",
    "import random\nx = random.choice([1, 2])",
    "import random\nx = random.randint(1, 2)",
    "import random\nrandom.shuffle([])",
    "import random\nrandom.uniform(0, 1)",
    "import random\nrandom.sample([1], 1)",
    "import random\nrandom.seed(1)",
    "import random\nrandom.SystemRandom()",
    "import random as r\nr.getrandbits(8)",
    "from random import choice",
    "from random import random as rnd",
    "import datetime\nx = datetime.datetime.now()",
    "from datetime import datetime\nx = datetime.now()",
    "from datetime import datetime as dt\nx = dt.utcnow()",
    "from datetime import date\nx = date.today()",
    "import os\nos.urandom(8)",
    "import uuid\nuuid.uuid4()",
    "def f():\n    import time\n    return time.time()",
]

GOOD_SNIPPETS = [
    "import random\nrng = random.Random(42)\nx = rng.random()\nrng.shuffle([])",
    "from random import Random\nrng = Random(1)",
    "def tick(now):\n    return now + 1.0",
    "import datetime\nd = datetime.timedelta(seconds=1)",
    "from datetime import datetime\nx = datetime.fromtimestamp(0)",
    "time = 3\nx = time + 1",
    "class M:\n    def time(self):\n        return self.now\n    def sleep(self): pass\nM().time()",
    "import uuid\nu = uuid.UUID(int=5)",
]


@pytest.mark.parametrize("source", BAD_SNIPPETS)
def test_checker_catches_violations(source):
    assert find_violations(source), f"checker missed:\n{source}"


@pytest.mark.parametrize("source", GOOD_SNIPPETS)
def test_checker_allows_pure_code(source):
    assert find_violations(source) == []


def test_import_blocker_catches_socket_use(tmp_path):
    pkg = tmp_path / "badpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "good.py").write_text("import json\n")
    (pkg / "sub" / "net.py").write_text("import socket\n")
    (pkg / "loop.py").write_text("from asyncio import sleep\n")
    (pkg / "mq.py").write_text("import zmq.asyncio\n")
    modules = sorted(module_files(tmp_path, "badpkg"))
    assert modules == ["badpkg", "badpkg.good", "badpkg.loop", "badpkg.mq", "badpkg.sub",
                       "badpkg.sub.net"]
    result = import_blocked(tmp_path, modules)
    assert set(result["failures"]) == {"badpkg.sub.net", "badpkg.loop", "badpkg.mq"}
    assert result["leaked"] == []


def test_checker_reports_file_and_line():
    source = textwrap.dedent("""\
        import random
        rng = random.Random(3)
        value = random.random()
    """)
    assert find_violations(source, "m.py") == ["m.py:3: random.random"]
