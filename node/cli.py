"""Entry points: ``synthesis-node`` (the daemon) and ``synthesis-ctl`` (client/admin)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import threading
from typing import Any

import zmq

from . import config as config_mod
from . import logs
from .agents import BehaviorError
from .client import CallTimeout, Client, RemoteError

EXIT_USAGE = 2
EXIT_REMOTE_ERROR = 1
EXIT_TIMEOUT = 3


# ---------------------------------------------------------------------------- node


def node_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="synthesis-node",
        description="Run a Synthesis node: hosts agents and routes messages across the cluster.")
    config_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args)
    except config_mod.ConfigError as exc:
        print(f"synthesis-node: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(cfg.log_level, cfg.log_format, cfg.resolved_node_id)
    from .runtime import Node  # after logging is set up

    try:
        asyncio.run(Node(cfg).serve())
    except BehaviorError as exc:
        print(f"synthesis-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, zmq.ZMQError) as exc:  # address in use, metrics port taken, ...
        print(f"synthesis-node: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    _exit_past_blocked_threads()
    return 0


def _exit_past_blocked_threads() -> None:
    """Blocking work still running in executor threads would hold the interpreter's
    exit (their pool joins them at exit); the node has shut down, so leave now."""
    if any(t.name.startswith("synthesis-blocking") and t.is_alive()
           for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---------------------------------------------------------------------------- ctl


def _json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"synthesis-ctl: data is not JSON: {exc}") from None


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--node/--timeout/--json, accepted before or after the command.

    After the command they default to SUPPRESS so they never overwrite a value
    given before it.  (A fresh parser each time: parents share action objects.)
    """
    common = argparse.ArgumentParser(add_help=False)
    unset = argparse.SUPPRESS
    common.add_argument("--node", default="127.0.0.1:7400" if defaults else unset,
                        help="address of any node, HOST:PORT (default 127.0.0.1:7400)")
    common.add_argument("--timeout", type=float, default=5.0 if defaults else unset,
                        help="seconds to wait for a reply (default 5)")
    common.add_argument("--json", action="store_true", default=False if defaults else unset,
                        help="machine-readable output")
    return common


def _ctl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthesis-ctl", parents=[_common_options(True)],
                                     description="Talk to a Synthesis cluster through any node.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub_add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub_add(name, parents=[_common_options(False)], **kwargs)
    sub.add_parser = add_parser

    p = sub.add_parser("call", help="call an agent and print its reply as JSON")
    p.add_argument("agent")
    p.add_argument("type")
    p.add_argument("data", nargs="?", help="JSON data")
    p = sub.add_parser("send", help="one-way message to an agent")
    p.add_argument("agent")
    p.add_argument("type")
    p.add_argument("data", nargs="?")
    p = sub.add_parser("spawn", help="start an agent with a behavior")
    p.add_argument("behavior")
    p.add_argument("agent")
    p.add_argument("init", nargs="?", help="JSON init data")
    p = sub.add_parser("stop", help="stop an agent")
    p.add_argument("agent")
    p = sub.add_parser("publish", help="one-way message to every member of a group")
    p.add_argument("group")
    p.add_argument("type")
    p.add_argument("data", nargs="?")
    p = sub.add_parser("join", help="make an agent join a group")
    p.add_argument("agent")
    p.add_argument("group")
    p = sub.add_parser("leave", help="make an agent leave a group")
    p.add_argument("agent")
    p.add_argument("group")
    sub.add_parser("status", help="cluster status: nodes, agents per node, messages")
    sub.add_parser("ping", help="check that the node answers")
    return parser


def _run_command(client: Client, args: argparse.Namespace) -> Any:
    cmd = args.command
    if cmd == "call":
        return client.call(args.agent, args.type, _json_arg(args.data))
    if cmd == "send":
        client.send(args.agent, args.type, _json_arg(args.data))
        client.ping()  # same connection, in order: the node has the message when this returns
        return None
    if cmd == "spawn":
        return client.spawn(args.behavior, args.agent, _json_arg(args.init))
    if cmd == "stop":
        return client.stop(args.agent)
    if cmd == "publish":
        client.publish(args.group, args.type, _json_arg(args.data))
        client.ping()
        return None
    if cmd == "join":
        return client.join(args.agent, args.group)
    if cmd == "leave":
        return client.leave(args.agent, args.group)
    if cmd == "ping":
        return client.ping()
    return client.status()


def format_status(status: dict) -> str:
    """The cluster status as a table, one row per node."""
    header = ("NODE", "ADDRESS", "STATE", "AGENTS", "RECEIVED", "HANDLED", "FORWARDED",
              "ERRORS", "AGENT STATES")
    rows = [header]
    for m in status.get("members", []):
        state = "up" if m.get("reachable") else "unreachable"
        by_state = ",".join(f"{k}:{v}" for k, v in sorted((m.get("agents_by_state") or {}).items()))
        rows.append((str(m.get("node", "")), str(m.get("address", "")), state,
                     *(str(m.get(k, "-")) for k in ("agents", "received", "handled",
                                                     "forwarded", "errors")),
                     by_state or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"{len(rows) - 1} node(s); answered by {status.get('node', '?')}")
    return "\n".join(lines)


def ctl_main(argv: list[str] | None = None) -> int:
    args = _ctl_parser().parse_args(argv)
    client = Client(args.node, timeout_s=args.timeout)
    try:
        result = _run_command(client, args)
    except RemoteError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_REMOTE_ERROR
    except CallTimeout as exc:
        print(f"error timeout: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        client.close()
    if args.command == "status" and not args.json:
        print(format_status(result))
    elif result is not None or args.command in ("call",):
        print(json.dumps(result, sort_keys=True, default=_json_default))
    return 0


def _json_default(value: Any) -> Any:
    """msgpack bin has no JSON form: print it as {"$base64": "..."}."""
    if isinstance(value, (bytes, bytearray)):
        return {"$base64": base64.b64encode(value).decode()}
    return repr(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(node_main())
