"""Entry points: ``synthesis-node`` (the daemon) and ``synthesis-ctl`` (client/admin)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import json
import math
import os
import sys
import threading
from typing import Any

import msgpack
import zmq

from protocols import wire

from . import config as config_mod
from . import curve, logs, ready
from .agents import BehaviorError
from .client import (RESENT, CallTimeout, Client, RemoteError, check_agent, check_stages,
                     check_targets, check_type)

EXIT_REMOTE_ERROR = 1   # ctl: the node answered with an error; node: cannot start
EXIT_USAGE = 2          # a bad argument, config value or behavior module
EXIT_TIMEOUT = 3        # ctl: no reply within --timeout

PROBE_TIMEOUT_S = 1.0   # after a timeout, how long a ping may take to tell "node down" apart
INT_MIN = -(1 << 63)    # msgpack carries integers in INT_MIN..UINT_MAX
UINT_MAX = (1 << 64) - 1

NODE_EPILOG = """\
Behavior modules (--behavior) are imported with the working directory first on the
import path, as `python -m` does: `synthesis-node --behavior mybehaviors` finds
./mybehaviors.py.

Once serving, the node prints one line on stdout (logs go to stderr):
  synthesis-node serving NODE_ID at tcp://HOST:PORT
and, with --ready-file, writes NODE_ID, the bound addresses and its pid there as JSON;
with --listen HOST:0 that is how a caller learns the port it got.

exit codes:
  0  stopped cleanly (SIGTERM or SIGINT)
  1  cannot start: an address or the metrics port is taken, the ready file cannot be
     written, ...
  2  bad argument, config value or behavior module
"""

CTL_EPILOG = """\
exit codes:
  0  success
  1  the node answered with an error, printed as 'error CODE: message'
  2  bad argument (one line on stderr names it)
  3  no reply within --timeout: nothing answered at --node, or the agent did not
     reply in time
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports a bad argument in one line and exits 2,
    instead of printing the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (the exit-code table)."""


def _version() -> str:
    try:
        return importlib.metadata.version("synthesis")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (package metadata not installed)"


# ---------------------------------------------------------------------------- node


def node_main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="synthesis-node", epilog=NODE_EPILOG, formatter_class=_HelpFormatter,
        description="Run a Synthesis node: hosts agents and routes messages across the cluster.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    config_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args)
    except config_mod.ConfigError as exc:
        print(f"synthesis-node: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(cfg.log_level, cfg.log_format, cfg.resolved_node_id)
    from .runtime import Node  # after logging is set up

    _working_dir_on_path()
    try:
        if cfg.ready_file:
            ready.remove_stale(cfg.ready_file)
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


def _working_dir_on_path() -> None:
    """Put the working directory first on the import path, as ``python -m`` does, so
    ``--behavior mybehaviors`` finds ./mybehaviors.py.  The console script's own
    sys.path[0] is its bin directory, where no behavior lives.  Done after the node's
    own imports, so a local file cannot shadow one of its dependencies."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _exit_past_blocked_threads() -> None:
    """Blocking work still running in executor threads would hold the interpreter's
    exit (their pool joins them at exit); the node has shut down, so leave now."""
    if any(t.name.startswith("synthesis-blocking") and t.is_alive()
           for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---------------------------------------------------------------------------- ctl


def _address_arg(text: str) -> str:
    """--node: HOST:PORT (or tcp://HOST:PORT) with a port in 1..65535."""
    try:
        host, port = config_mod.split_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT with port 1..65535, got {text!r}") from None
    return f"{host}:{port}"


def _timeout_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return seconds


def _json_arg(text: str) -> Any:
    """A JSON argument that msgpack can carry, or a one-line reason why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("not JSON this program can read: nested too "
                                         "deeply") from None
    too_big = _int_out_of_range(value)
    if too_big is not None:
        shown = str(too_big) if len(str(too_big)) <= 40 else str(too_big)[:37] + "..."
        raise argparse.ArgumentTypeError(
            f"integer {shown} does not fit in 64 bits (the wire carries -2**63..2**64-1)")
    try:
        msgpack.packb(value)
    except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot be sent: {exc}") from None
    return value


def _int_out_of_range(value: Any) -> int | None:
    """The first integer in a decoded JSON value that msgpack cannot encode, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) \
                and not INT_MIN <= item <= UINT_MAX:
            return item
    return None


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--node/--timeout/--json, accepted before or after the command.

    After the command they default to SUPPRESS so they never overwrite a value
    given before it.  (A fresh parser each time: parents share action objects.)
    """
    common = _Parser(add_help=False)
    unset = argparse.SUPPRESS
    common.add_argument("--node", type=_address_arg, metavar="HOST:PORT",
                        default="127.0.0.1:7400" if defaults else unset,
                        help="address of any node of the cluster (default: 127.0.0.1:7400)")
    common.add_argument("--timeout", type=_timeout_arg, metavar="SECONDS",
                        default=5.0 if defaults else unset,
                        help="seconds to wait for a reply (default: 5)")
    common.add_argument("--json", action="store_true", default=False if defaults else unset,
                        help="machine-readable output")
    common.add_argument("--curve-secret", metavar="FILE",
                        default=os.environ.get("SYNTHESIS_CURVE_SECRET") if defaults else unset,
                        help="this client's secret certificate (NAME.key_secret), for a node "
                             "with CURVE on (env SYNTHESIS_CURVE_SECRET)")
    common.add_argument("--curve-server", metavar="FILE",
                        default=os.environ.get("SYNTHESIS_CURVE_SERVER") if defaults else unset,
                        help="the node's public certificate (NAME.key) (env "
                             "SYNTHESIS_CURVE_SERVER)")
    return common


AGENT_HELP = ("agent id: BEHAVIOR/NAME, e.g. counter/alice; the first message activates "
              "that behavior under that id on its owner node. An agent started with "
              "'spawn' may have any id.")
TYPE_HELP = ("message type: the name a @handler of the agent's behavior handles, e.g. "
             "'incr' for counter (built-ins: echo takes any type; counter: incr, decr, "
             "get; kv: put, get, delete, keys)")
DATA_HELP = "message data as JSON (default: null)"
CONSISTENCY_HELP = ("when a write is acknowledged: local (the owner applied it), quorum (a "
                    "majority of the agent's replicas hold it), all (every replica does); "
                    "default: the node's configured default")
DELIVERY_HELP = ("at_most_once (sent once; the default), at_least_once (resent with the same "
                 "id until a reply or --timeout), exactly_once (resent, and the agent runs it "
                 "once per id), causal (the agent sees it after the messages it depends on); "
                 "with at_least_once or exactly_once a send waits for the node's "
                 "acknowledgment")
# Kept in wire's order of strength, for the help text (wire has them as frozensets).
CONSISTENCY_CHOICES = (wire.CONSISTENCY_LOCAL, wire.CONSISTENCY_QUORUM, wire.CONSISTENCY_ALL)
DELIVERY_CHOICES = (wire.DELIVERY_AT_MOST_ONCE, wire.DELIVERY_AT_LEAST_ONCE,
                    wire.DELIVERY_EXACTLY_ONCE, wire.DELIVERY_CAUSAL)


STAGE_HELP = ("a stage: AGENT:TYPE (split at the last ':'), e.g. counter/a:incr; 2..16 "
              "stages. The last argument is the data instead when it starts with {, [ or \" "
              "or has no ':' (e.g. 5, null); or give the data with --data")
TARGETS_HELP = "agent ids, 1..1000, each once"
STRATEGY_HELP = ("multicast: PUB/SUB, best effort (the default); gossip: an epidemic "
                 "broadcast that repairs what PUB/SUB dropped, each member handles it once")
BROADCAST_EPILOG = """\
output: one line per agent, in the order given: AGENT and its reply as JSON, or
AGENT error CODE: message; with --json a map AGENT -> {"data": ...} or
{"error": {"code": ..., "message": ...}}. An agent that did not answer before the
deadline (a little under --timeout) has error timeout. When any agent answered an
error, all are printed and the exit code is 1.

""" + CTL_EPILOG
_NO_DATA = object()  # pipeline --data not given (null is data)


def _guarantee_options(parser: argparse.ArgumentParser) -> None:
    """--consistency and --delivery of call and send (docs/PROTOCOL.md section 2.4)."""
    parser.add_argument("--consistency", choices=CONSISTENCY_CHOICES, help=CONSISTENCY_HELP)
    parser.add_argument("--delivery", choices=DELIVERY_CHOICES, help=DELIVERY_HELP)


def _ctl_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="synthesis-ctl", parents=[_common_options(True)],
                     epilog=CTL_EPILOG, formatter_class=_HelpFormatter,
                     description="Talk to a Synthesis cluster through any node.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub_add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("epilog", CTL_EPILOG)
        return sub_add(name, parents=[_common_options(False)],
                       formatter_class=_HelpFormatter, description=kwargs.get("help"),
                       **kwargs)
    sub.add_parser = add_parser

    for name, what in (("call", "call an agent and print its reply as JSON"),
                       ("send", "one-way message to an agent (no reply; prints 'sent')")):
        p = sub.add_parser(name, help=what)
        p.add_argument("agent", help=AGENT_HELP)
        p.add_argument("type", help=TYPE_HELP)
        p.add_argument("data", nargs="?", type=_json_arg, help=DATA_HELP)
        _guarantee_options(p)
    p = sub.add_parser("spawn", help="start an agent with a behavior")
    p.add_argument("behavior", help="behavior name, e.g. counter")
    p.add_argument("agent", help="agent id, any string")
    p.add_argument("init", nargs="?", type=_json_arg,
                   help="JSON init data given to the agent's on_start (default: null)")
    p = sub.add_parser("stop", help="stop an agent")
    p.add_argument("agent", help="agent id")
    p = sub.add_parser("publish", help="one-way message to every member of a group, on "
                                       "every node (no reply; prints 'published')")
    p.add_argument("group", help="group name, as agents joined it")
    p.add_argument("type", help="message type the members' behaviors handle")
    p.add_argument("data", nargs="?", type=_json_arg, help=DATA_HELP)
    p.add_argument("--strategy", choices=("multicast", "gossip"), help=STRATEGY_HELP)
    p = sub.add_parser("pipeline", help="run data through a chain of agents, each stage's "
                                        "reply the next one's data; prints the last reply "
                                        "as JSON")
    p.add_argument("stages", nargs="+", metavar="AGENT:TYPE", help=STAGE_HELP)
    p.add_argument("--data", type=_json_arg, default=_NO_DATA, help=DATA_HELP)
    p = sub.add_parser("broadcast", help="one message to many agents; prints each one's "
                                         "reply or error", epilog=BROADCAST_EPILOG)
    p.add_argument("agents", nargs="+", metavar="AGENT", help=TARGETS_HELP)
    p.add_argument("--type", required=True, help=TYPE_HELP)
    p.add_argument("--data", type=_json_arg, help=DATA_HELP)
    p = sub.add_parser("join", help="make an agent join a group")
    p.add_argument("agent", help="agent id")
    p.add_argument("group", help="group name")
    p = sub.add_parser("leave", help="make an agent leave a group")
    p.add_argument("agent", help="agent id")
    p.add_argument("group", help="group name")
    sub.add_parser("status", help="cluster status: nodes, agents per node, messages")
    sub.add_parser("ping", help="check that the node answers")
    sub.add_parser("members", help="the member list as the node sees it: id, address, "
                                   "state (alive, suspect, dead, left), incarnation, agents")
    certs = sub.add_parser("certs", help="TLS certificates for the QUIC and HTTP/2 bridges: "
                                         "DIR [NAMES...] [--host H]... [--client NAME]...",
                           add_help=False)
    certs.add_argument("certs_args", nargs=argparse.REMAINDER)
    keys = sub.add_parser("keys", help="CURVE certificates (docs/OPERATIONS.md, 'Securing "
                                       "a cluster')")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser("new", parents=[_common_options(False)],
                            help="write DIR/NAME.key (public) and DIR/NAME.key_secret "
                                 "(mode 0600)")
    p.add_argument("dir", help="directory to write into (made if missing)")
    p.add_argument("name", help="certificate name; for a node, its node id unless --node-id")
    p.add_argument("--node-id", default="", help="node id this key may speak for, when it "
                                                 "is not NAME (written as metadata)")
    p.add_argument("--endpoint", default="", metavar="tcp://HOST:PORT",
                   help="the node's address, so nodes that have it as a seed know its key")
    return parser


def _looks_like_data(text: str) -> bool:
    """The rule for pipeline's last argument: data, not a stage (STAGE_HELP)."""
    return text[:1] in ("{", "[", '"') or ":" not in text


def _stage_arg(text: str) -> tuple[str, str]:
    agent, _, mtype = text.rpartition(":")
    if not agent or not mtype:
        raise ValueError(f"{text!r} is not AGENT:TYPE")
    return check_agent(agent, "a stage's agent"), check_type(mtype, "a stage's type")


def _check_routed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """pipeline and broadcast arguments, checked as the client checks them, so a bad
    one is exit 2 before anything is sent; pipeline's stages become (agent, type)."""
    try:
        if args.command == "pipeline":
            stages = list(args.stages)
            if _looks_like_data(stages[-1]):
                if args.data is not _NO_DATA:
                    raise ValueError("the data is given twice: as the last argument and "
                                     "with --data")
                try:
                    args.data = _json_arg(stages.pop())
                except argparse.ArgumentTypeError as exc:
                    parser.error(f"argument data: {exc} (a stage is AGENT:TYPE)")
            elif args.data is _NO_DATA:
                args.data = None
            args.stages = check_stages([_stage_arg(stage) for stage in stages])
        elif args.command == "broadcast":
            check_targets(args.agents)
            check_type(args.type, "--type")
    except ValueError as exc:
        what = "AGENT:TYPE" if args.command == "pipeline" else "AGENT"
        parser.error(f"argument {what}: {exc}")


def _keys_command(args: argparse.Namespace) -> int:
    try:
        public, secret = curve.new_certificates(args.dir, args.name, args.node_id,
                                                args.endpoint)
    except (curve.CurveError, OSError) as exc:
        print(f"synthesis-ctl: keys new: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"public": str(public), "secret": str(secret)}))
    else:
        print(f"wrote {public} (public: give it to the nodes)\n"
              f"wrote {secret} (secret, mode 0600: keep it here)")
    return 0


def _run_command(client: Client, args: argparse.Namespace) -> Any:
    cmd = args.command
    if cmd == "call":
        return client.call(args.agent, args.type, args.data, consistency=args.consistency,
                           delivery=args.delivery)
    if cmd == "send":
        client.send(args.agent, args.type, args.data, consistency=args.consistency,
                    delivery=args.delivery)
        client.ping()  # same connection, in order: the node has the message when this returns
        return None
    if cmd == "spawn":
        return client.spawn(args.behavior, args.agent, args.init)
    if cmd == "stop":
        return client.stop(args.agent)
    if cmd == "publish":
        client.publish(args.group, args.type, args.data, strategy=args.strategy)
        client.ping()
        return None
    if cmd == "pipeline":
        return client.pipeline(args.stages, args.data)
    if cmd == "broadcast":
        return broadcast_entries(client.broadcast(args.agents, args.type, args.data))
    if cmd == "join":
        return client.join(args.agent, args.group)
    if cmd == "leave":
        return client.leave(args.agent, args.group)
    if cmd == "ping":
        return client.ping()
    if cmd == "members":
        return client.members()
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
    for m in status.get("members", []):  # circuit breakers that are not closed
        for b in (m.get("transports") or {}).get("breakers", []):
            lines.append(f"breaker {m.get('node')} -> {b.get('peer')} over "
                         f"{b.get('transport')}: {b.get('state')} (opened {b.get('opened')} "
                         f"times, {b.get('rejected')} sends turned away)")
    return "\n".join(lines)


MEMBER_COLUMNS = ("node_id", "address", "state", "incarnation", "agents")


def format_members(view: dict) -> str:
    """The node's member view as a table, one row per member.  ``agents`` is what the
    member last reported (``-`` before it has); the last line says who answered and
    whether its side of the cluster may serve agents."""
    rows = [tuple(column.upper() for column in MEMBER_COLUMNS)]
    for member in view.get("members", []):
        rows.append(tuple("-" if member.get(column) is None else str(member[column])
                          for column in MEMBER_COLUMNS))
    widths = [max(len(r[i]) for r in rows) for i in range(len(MEMBER_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    quorate = "quorate" if view.get("quorate") else "NOT quorate (serves no agents)"
    lines.append(f"{len(rows) - 1} member(s); answered by {view.get('node', '?')}, {quorate}")
    return "\n".join(lines)


def members_json(view: dict) -> dict:
    """``--json``: exactly ``{"members": [...]}``, each row with the table's columns."""
    return {"members": [{column: member.get(column) for column in MEMBER_COLUMNS}
                        for member in view.get("members", [])]}


def _timeout_message(client: Client, args: argparse.Namespace) -> str:
    """Say whether nothing answered at the address or only this request went unanswered.

    send, publish and ping time out on a ping, so nothing answered; for the other
    commands a short ping tells a stopped node from a slow agent."""
    nothing = (f"error timeout: nothing answered at {args.node} within {args.timeout:g} s "
               "(is a node running there?)")
    acknowledged = args.command == "send" and getattr(args, "delivery", None) in RESENT
    if args.command in ("send", "publish", "ping", "members") and not acknowledged:
        return nothing
    try:
        client.ping(timeout_s=min(args.timeout, PROBE_TIMEOUT_S))
    except (CallTimeout, RemoteError):
        return nothing
    what = " ".join(str(part) for part in (args.command, getattr(args, "agent", None),
                                           getattr(args, "type", None)) if part)
    return (f"error timeout: {what}: no reply within {args.timeout:g} s "
            f"(the node at {args.node} answers; the request did not finish in time)")


def broadcast_entries(gathered: dict[str, Any]) -> dict[str, dict]:
    """Client.broadcast's map -> the wire's: AGENT -> {"data": ...} or {"error": {...}}."""
    return {agent: {"error": {"code": value.code, "message": value.message}}
            if isinstance(value, RemoteError) else {"data": value}
            for agent, value in gathered.items()}


def format_broadcast(entries: dict[str, dict]) -> str:
    """One line per agent, in the order given: its reply as JSON, or its error."""
    width = max(len(agent) for agent in entries)
    return "\n".join(
        f"{agent.ljust(width)}  error {entry['error']['code']}: {entry['error']['message']}"
        if "error" in entry else
        f"{agent.ljust(width)}  {json.dumps(entry['data'], sort_keys=True, default=_json_default)}"
        for agent, entry in entries.items())


def _broadcast_failures(entries: dict[str, dict]) -> str | None:
    """The 'error CODE: ...' line for a broadcast some agents answered with errors."""
    failed = [(agent, entry["error"]) for agent, entry in entries.items() if "error" in entry]
    if not failed:
        return None
    agent, first = failed[0]
    return (f"error {first['code']}: {len(failed)} of {len(entries)} agents answered "
            f"errors; first {agent}: {first['message']}")


def _error_line(exc: RemoteError) -> str:
    """'error CODE: message', naming a pipeline's failing stage if the message does not."""
    message = exc.message
    if exc.stage is not None and not message.startswith(f"stage {exc.stage} "):
        message = f"stage {exc.stage} ({exc.agent}): {message}"
    return f"error {exc.code}: {message}"


def _print_result(args: argparse.Namespace, result: Any) -> None:
    if args.command == "status" and not args.json:
        print(format_status(result))
    elif args.command == "broadcast" and not args.json:
        print(format_broadcast(result))
    elif args.command == "members":
        print(json.dumps(members_json(result), sort_keys=True) if args.json
              else format_members(result))
    elif args.command in ("send", "publish"):
        target = args.agent if args.command == "send" else f"group {args.group}"
        verb = "sent" if args.command == "send" else "published"
        print(json.dumps({"ok": True}) if args.json else f"{verb} to {target}")
    else:
        print(json.dumps(result, sort_keys=True, default=_json_default))


def ctl_main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["certs"]:  # its own parser, --help included (node/transports/certs.py)
        from .transports.certs import certs_main
        return certs_main(raw[1:])
    parser = _ctl_parser()
    args = parser.parse_args(argv)
    _check_routed(parser, args)
    if args.command == "keys":
        return _keys_command(args)
    if args.command == "certs":  # a CA and node certificates (node/transports/certs.py)
        from .transports.certs import certs_main
        return certs_main(args.certs_args)
    try:
        client = Client(args.node, timeout_s=args.timeout, curve_secret=args.curve_secret,
                        curve_server=args.curve_server)
    except zmq.ZMQError as exc:
        print(f"synthesis-ctl: argument --node: cannot connect to {args.node!r}: {exc}",
              file=sys.stderr)
        return EXIT_USAGE
    except curve.CurveError as exc:
        print(f"synthesis-ctl: argument --curve-secret/--curve-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = _run_command(client, args)
    except RemoteError as exc:
        print(_error_line(exc), file=sys.stderr)
        return EXIT_REMOTE_ERROR
    except CallTimeout:
        print(_timeout_message(client, args), file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        client.close()
    try:
        _print_result(args, result)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` closed the pipe: the command itself succeeded
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    failures = _broadcast_failures(result) if args.command == "broadcast" else None
    if failures is not None:
        print(failures, file=sys.stderr)
        return EXIT_REMOTE_ERROR
    return 0


def _json_default(value: Any) -> Any:
    """msgpack bin has no JSON form: print it as {"$base64": "..."}."""
    if isinstance(value, (bytes, bytearray)):
        return {"$base64": base64.b64encode(value).decode()}
    return repr(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(node_main())
