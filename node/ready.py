"""Telling whoever started the node where it serves: a ready file and a stdout line.

A node started with port 0 binds free ports, so only the node knows its address.
Once it serves it writes, if ``ready_file`` is set, a JSON object::

    {"node_id": "n1", "address": "tcp://127.0.0.1:41234", "pub": "tcp://127.0.0.1:41235",
     "metrics": "127.0.0.1:41236", "pid": 12345}

(``metrics`` is null when metrics are off), atomically: written to a temporary file
in the same directory, then renamed over the target, so a reader that sees the file
sees all of it.  It also prints one line on stdout (logs go to stderr)::

    synthesis-node serving n1 at tcp://127.0.0.1:41234

The node does not remove the file when it stops (a killed node could not anyway);
``synthesis-node`` removes a stale one before it starts, and ``pid`` tells a reader
which process wrote it.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def serving_info(node_id: str, address: str, pub: str, metrics: tuple[str, int] | None,
                 pid: int) -> dict[str, Any]:
    """The ready file's content."""
    return {"node_id": node_id, "address": address, "pub": pub,
            "metrics": f"{metrics[0]}:{metrics[1]}" if metrics else None, "pid": pid}


def write_ready_file(path: str, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` atomically; OSError if the directory is not
    writable."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=".ready-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the ready file {path!r}: "
                                 f"{exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the file names no secret
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info, fh, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def print_serving(node_id: str, address: str) -> None:
    """The one stdout line of a serving node; a closed stdout is not an error."""
    try:
        print(f"synthesis-node serving {node_id} at {address}", flush=True)
    except (BrokenPipeError, ValueError, OSError):
        pass


def announce(path: str, info: dict[str, Any]) -> None:
    """Both: the ready file (if ``path``) and the stdout line."""
    if path:
        write_ready_file(path, info)
    print_serving(info["node_id"], info["address"])


def remove_stale(path: str) -> None:
    """Remove a ready file left by an earlier run, so nobody takes it for this one's;
    OSError now, before the node binds anything, if its directory does not exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(2, f"cannot write the ready file {path!r}: no directory "
                                   f"{directory!r}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
