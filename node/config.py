"""Node configuration: TOML file + ``SYNTHESIS_*`` environment + command-line flags.

Precedence is flags > environment > file > defaults, and a node runs with no file at
all.  Every value is validated once, at start, so a typo fails loudly with the key and
where the value came from instead of surfacing later as a half-working node::

    mailbox_len_max: must be an integer >= 1, got 'abc' (from SYNTHESIS_MAILBOX_LEN_MAX)

The fields of :class:`NodeConfig` are the single source of truth: flags, environment
variable names, validation rules and ``docs/CONFIG.md`` (``python -m node.config``) are
all generated from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "SYNTHESIS_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
CONFIG_FILE_BYTES_MAX = 1 << 20  # a node config is a few hundred bytes; refuse surprises
SEEDS_MAX = 256
BEHAVIORS_MAX = 256

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", "[::]"})
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = r"[A-Za-z0-9_.-]{1,64}"
# Items of the list kinds beyond addresses and modules, each checked whole.
_LIST_ITEM_RE = {
    "transports": re.compile(rf"^{_NAME}$"),
    "labels": re.compile(rf"^{_NAME}={_NAME}$"),
    "policy": re.compile(rf"^{_NAME}={_NAME}:{_NAME}(/{_NAME})*$"),
    "binds": re.compile(rf"^{_NAME}=\S+:[0-9]{{1,5}}$"),
}
_PORT_MAX = 65535


class ConfigError(ValueError):
    """A configuration value is invalid; ``key`` names the offending setting."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.problem = message


# --- field declarations -----------------------------------------------------------------

def _opt(default: Any, help: str, *, kind: str = "", lo: float | None = None,
         hi: float | None = None, lo_open: bool = False,
         choices: tuple[str, ...] = ()) -> Any:
    """Declare a config field; the metadata drives flags, validation and docs.

    ``kind`` overrides the check derived from the annotation (addresses, module names);
    ``lo``/``hi`` bound numbers (``lo_open`` makes the lower bound exclusive).
    """
    meta = {"help": help, "kind": kind, "lo": lo, "hi": hi, "lo_open": lo_open,
            "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeConfig:
    """Validated, immutable settings of one node.

    Address fields hold normalised ``HOST:PORT`` strings (``seeds`` hold
    ``tcp://HOST:PORT``); empty strings mean "derive from listen", see the properties.
    Port 0 in listen, pub or metrics binds a free port; :meth:`bound` gives the config
    with the ports the sockets got.
    """

    node_id: str = _opt("", "Node identity; empty derives HOST:PORT of advertise (the "
                        "bound port when that is 0).", kind="node_id")
    listen: str = _opt("127.0.0.1:7400", "ROUTER bind address HOST:PORT; port 0 binds a "
                       "free port (see ready_file).", kind="address0")
    advertise: str = _opt("", "Address peers and clients dial; empty uses listen; port 0 "
                          "uses the port listen bound.", kind="address0?")
    pub: str = _opt("", "PUB bind address; empty uses listen host, listen port + 1 (port "
                    "0 when listen's port is 0).", kind="address0?")
    metrics: str = _opt("", "HTTP /metrics and /health address; empty uses listen host, "
                        "listen port + 2000 (port 0 when listen's port is 0); 'off' "
                        "disables.", kind="metrics")
    ready_file: str = _opt("", "Once serving, write this JSON file (atomically): node_id, "
                           "address, pub, metrics, pid; the bound ports of a port-0 node. "
                           "Empty writes none.", kind="path")
    seeds: tuple[str, ...] = _opt((), "Addresses of nodes to join through (comma-separated "
                                  "in env).", kind="addresses")
    behaviors: tuple[str, ...] = _opt((), "Python modules to import for agent behaviors; "
                                      "synthesis-node looks in its working directory first.",
                                      kind="modules")
    max_message_bytes: int = _opt(1048576, "Largest accepted envelope, bytes.", lo=64,
                                  hi=1 << 30)
    mailbox_len_max: int = _opt(1024, "Messages queued per agent before 'overloaded'.", lo=1)
    agents_max: int = _opt(1000000, "Agents this node may hold active.", lo=1)
    max_hops: int = _opt(2, "Forwarding hops before a message is refused.", lo=1, hi=16)
    handler_timeout_s: float = _opt(30.0, "Time an async handler may run before it is cancelled (plain def handlers run to completion).",
                                    lo=0, lo_open=True)
    supervision: str = _opt("restart", "What a failed agent does.",
                            choices=("restart", "stop", "escalate"))
    restart_limit: int = _opt(3, "Restarts allowed within restart_window_s.", lo=0, hi=1000)
    restart_window_s: float = _opt(60.0, "Window over which restarts are counted.",
                                   lo=0, lo_open=True)
    restart_backoff_s: float = _opt(0.05, "First restart delay; doubles per restart.", lo=0)
    restart_backoff_max_s: float = _opt(5.0, "Upper bound of the restart delay.", lo=0)
    probe_interval_s: float = _opt(
        0.5, "Membership (SWIM) protocol period: each member probes one other per "
        "period.", lo=0, lo_open=True)
    probe_timeout_s: float = _opt(
        0.2, "Wait for a direct probe's ack before asking others to probe "
        "(indirect_probes); at most probe_interval_s.", lo=0, lo_open=True)
    indirect_probes: int = _opt(3, "Members asked to probe a member that missed a "
                                "direct probe.", lo=0, hi=16)
    suspicion_mult: float = _opt(
        2.0, "A suspected member is declared dead after suspicion_mult * max(1, "
        "log10(members)) * probe_interval_s once enough others confirm it (up to "
        "suspicion_max_mult times that with no confirmation).", lo=0, lo_open=True)
    suspicion_max_mult: float = _opt(2.0, "See suspicion_mult.", lo=1)
    gossip_retransmit_mult: int = _opt(
        3, "Each membership update is piggybacked gossip_retransmit_mult * "
        "ceil(log10(members + 1)) times.", lo=1, hi=64)
    gossip_interval_s: float = _opt(
        1.0, "Period of the digest exchange with one random member (then only the parts "
        "of the member list that differ); joins exchange the whole list.", lo=0,
        lo_open=True)
    dead_reap_s: float = _opt(
        60.0, "Dead and left members are forgotten this long after; until then they are "
        "still contacted now and then so that a healed partition merges.", lo=0,
        lo_open=True)
    health_max: int = _opt(
        8, "Local health score ceiling: a node that misses its own deadlines or probes "
        "stretches its probe timeouts up to (1 + health_max) times.", lo=0, hi=64)
    downing: str = _opt(
        "keep-majority", "Split-brain strategy: which side may own agents once members "
        "are unreachable. keep-majority: the side with more than half of the last "
        "members (a tie keeps the side with the lowest node id); static-quorum: a side "
        "of at least quorum_size alive members.", choices=("keep-majority",
                                                         "static-quorum"))
    quorum_size: int = _opt(0, "Alive members a side needs to own agents under "
                            "downing = static-quorum (set it to a majority of the "
                            "cluster size).", lo=0, hi=1 << 20)
    stable_after_s: float = _opt(
        1.0, "Dead members leave the ring once no member has been suspect and the "
        "view has not changed for this long, and at least one probe round (alive "
        "members x probe_interval_s, at most 20 periods), and this side may own "
        "agents.", lo=0)
    handoff_timeout_s: float = _opt(
        2.0, "An agent's state sent to its new owner is resent until acknowledged; a "
        "new owner waits this long for the state of an agent that moved to it before "
        "activating it fresh.", lo=0, lo_open=True)
    handoff_window_s: float = _opt(
        10.0, "After the ring changes, an agent missing here is first asked of its "
        "previous owner for this long.", lo=0)
    replicas: int = _opt(
        3, "Copies of each agent's replicated state: its owner and the next replicas-1 "
        "distinct nodes on the ring.", lo=1, hi=7)
    consistency: str = _opt(
        "local", "Default write consistency of a message that names none: local (reply "
        "once the owner applied it), quorum (once a majority of the replicas hold it), "
        "all (once every replica does).", choices=("local", "quorum", "all"))
    write_timeout_s: float = _opt(
        2.0, "A write waiting for quorum or all acknowledgements is answered 'timeout' "
        "after this long (it may or may not have lasted).", lo=0, lo_open=True)
    failover_rate: float = _opt(
        1000.0, "Agents per second a node wakes after it became their owner through a "
        "node loss (the rest wake on their first message).", lo=0, lo_open=True)
    fold_ttl_s: float = _opt(
        604800.0, "How long a counter remembers the rows it folded in from retired "
        "replicas (docs/STATE.md, 'Pruning'); keep it above the longest any node may be "
        "away and come back with copies (a partition, a restart from storage_path).",
        lo=0, lo_open=True)
    storage_path: str = _opt(
        "", "SQLite file that keeps this node's agent state across restarts (empty: "
        "memory only; see docs/DURABILITY.md).", kind="path")
    storage_sync: str = _opt(
        "full", "When a write with storage on counts as durable: full (fsynced: survives "
        "power loss), normal (survives a process crash), off.",
        choices=("full", "normal", "off"))
    curve: str = _opt(
        "auto", "CURVE authentication and encryption on every ZeroMQ socket "
        "(docs/OPERATIONS.md, 'Securing a cluster'). on: needs curve_secret and "
        "curve_peers; off: open to anyone who can reach the ports (said loudly in the "
        "log and /health when they are not loopback); auto: on when curve_secret is "
        "set, else off on loopback and a config error on any other address.",
        choices=("auto", "on", "off"))
    curve_secret: str = _opt(
        "", "This node's secret certificate (NAME.key_secret from 'synthesis-ctl keys "
        "new'): its CURVE key pair.", kind="path")
    curve_peers: str = _opt(
        "", "Directory of public certificates (*.key) of the nodes allowed as peers; "
        "each binds a node id (its node-id metadata, else its file name) to a key. "
        "Re-read on SIGHUP.", kind="path")
    curve_clients: str = _opt(
        "", "Directory of public certificates of the clients allowed to send requests. "
        "Re-read on SIGHUP.", kind="path")
    http2: str = _opt(
        "", "HTTP/2 bridge address HOST:PORT (clients: POST /v1/agents/ID/messages/TYPE; "
        "peers configured for it forward over it); h2c unless tls_cert and tls_key are "
        "set; empty: off. See docs/PROTOCOL.md 12.", kind="address0?")
    quic: str = _opt(
        "", "QUIC bridge address HOST:PORT (UDP; needs tls_cert, tls_key and tls_ca); "
        "empty: off.", kind="address0?")
    http2_advertise: str = _opt("", "Address peers dial for the HTTP/2 bridge; empty "
                                "uses http2 (its bound port).", kind="address0?")
    quic_advertise: str = _opt("", "Address peers dial for the QUIC bridge; empty uses "
                               "quic (its bound port).", kind="address0?")
    tls_cert: str = _opt("", "PEM certificate of this node for the bridges "
                         "('synthesis-ctl certs DIR NAME' writes one).", kind="path")
    tls_key: str = _opt("", "PEM private key of tls_cert.", kind="path")
    tls_ca: str = _opt("", "PEM CA certificate the bridges verify peers against (QUIC: "
                       "required; HTTP/2: peers must present a certificate it signed).",
                       kind="path")
    labels: tuple[str, ...] = _opt(
        (), "This node's labels, KEY=VALUE (zone=eu, dc=fra1, transport=quic: a "
        "preferred transport), advertised to peers for transport_policy.", kind="labels")
    transport_order: tuple[str, ...] = _opt(
        ("zmq",), "Transports tried, in order, for a peer no transport_policy rule "
        "matches (only those the peer serves); the next is tried when one fails.",
        kind="transports")
    transport_policy: tuple[str, ...] = _opt(
        (), "Rules LABEL=VALUE:T1/T2/...: a peer with that label is tried over T1, then "
        "T2, ...; the first matching rule wins. A peer labelled transport=T without a "
        "rule gets T first.", kind="policy")
    transport_modules: tuple[str, ...] = _opt(
        (), "Python modules to import that register transports of their own "
        "(node.transports.register); enable one with transport_binds.", kind="modules")
    transport_binds: tuple[str, ...] = _opt(
        (), "NAME=HOST:PORT: start the registered transport NAME on that address "
        "(http2 and quic have keys of their own).", kind="binds")
    breaker_failures: int = _opt(5, "Failures in a row that open a peer's circuit "
                                 "breaker for one transport.", lo=1, hi=1000)
    breaker_open_s: float = _opt(5.0, "How long an open breaker turns sends away before "
                                 "it lets one trial through.", lo=0, lo_open=True)
    faults_file: str = _opt(
        "", "Testing only: a JSON file of faults to inject into peer traffic (drop, "
        "delay, duplicate, corrupt, cut, per named peer), re-read when it changes. "
        "Never set it in production.", kind="path")
    forward_margin_s: float = _opt(
        2.0, "Added to handler_timeout_s for a forwarded call: past the sum the entry node "
        "answers 'timeout' itself (the owner went silent).", lo=0, lo_open=True)
    status_timeout_s: float = _opt(1.0, "Wait for peers' answers to a status query.",
                                   lo=0, lo_open=True)
    pub_hwm: int = _opt(100000, "PUB socket high-water mark, messages.", lo=1)
    peer_hwm: int = _opt(100000, "Per-peer send high-water mark, messages.", lo=1)
    shutdown_timeout_s: float = _opt(5.0, "Drain time on SIGTERM before closing.",
                                     lo=0, lo_open=True)
    executor_workers: int = _opt(4, "Threads of the bounded executor for blocking work.",
                                 lo=1, hi=256)
    generation_ahead_max_s: float = _opt(
        60.0, "How far a member's generation may lead this node's clock before gossip "
        "carrying it is refused.", lo=0, lo_open=True)
    connections_max: int = _opt(1024, "TCP connections the ROUTER accepts at once; more "
                                "are closed on arrival.", lo=1, hi=1 << 20)
    conn_inbound_bytes_max: int = _opt(
        64 << 20, "Bytes one connection may have sent that the node has not read yet "
        "(an unfinished multipart message counts); past it the connection is closed.",
        lo=1 << 16)
    inbound_bytes_max: int = _opt(
        256 << 20, "The same, summed over all connections; past it the largest are closed.",
        lo=1 << 16)
    client_reply_bytes_max: int = _opt(
        16 << 20, "Reply bytes queued for one client that it has not read; past it the "
        "client's connection is closed.", lo=1 << 16)
    client_rate: float = _opt(
        0.0, "Requests per second one client may send on average (a token bucket; a "
        "client is its CURVE key, else its connection); past it 'overloaded' with a "
        "retry hint (data.retry_after_ms). 0: unlimited, the default, because a normal "
        "rate depends on the deployment: one benchmark client sends about 60,000 "
        "one-way messages/s.", lo=0)
    client_burst: int = _opt(
        0, "Requests one client may send at once above client_rate (the bucket's size); "
        "0 uses one second of client_rate.", lo=0)
    client_inflight_max: int = _opt(
        10000, "Requests from one client taken in and not yet answered (one-way ones "
        "count only while they are taken in); past it 'overloaded'. 0: unlimited. The "
        "default is the Python AsyncClient's own window, so it never meets it, and a "
        "tenth of mailbox_total_max, so one client cannot fill the mailboxes.", lo=0)
    clients_tracked_max: int = _opt(
        16384, "Clients whose limits the node remembers at once (about 300 bytes each); "
        "a new one past it takes the place of one with nothing in flight, else gets "
        "'overloaded'.", lo=1, hi=1 << 24)
    mailbox_total_max: int = _opt(100000, "Messages queued in all mailboxes of the node "
                                  "before 'overloaded'.", lo=1)
    mailbox_bytes_max: int = _opt(256 << 20, "Bytes of messages queued in all mailboxes "
                                  "before 'overloaded'.", lo=1 << 16)
    memory_bytes_max: int = _opt(
        2 << 30, "Resident memory budget; while over it new activations and requests "
        "above 64 KiB answer 'overloaded' (stopping agents or deleting kv entries frees "
        "memory; the node hands freed memory back to the system). 0 disables.", lo=0)
    agent_idle_s: float = _opt(
        0.0, "Passivate agents idle this long (their in-memory state is dropped); "
        "0 keeps them until stopped or evicted under pressure.", lo=0)
    log_level: str = _opt("info", "Lowest level logged.",
                          choices=("debug", "info", "warning", "error"))
    log_format: str = _opt("json", "json: one object per line; console: human readable.",
                           choices=("json", "console"))

    def __post_init__(self) -> None:
        """Validate and normalise every field, so a NodeConfig built in code is as safe
        as one from :func:`load`."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check(f, getattr(self, f.name)))
        _check_cross_fields(self)

    # --- derived addresses --------------------------------------------------------------

    @property
    def router_bind(self) -> str:
        """ZeroMQ endpoint the ROUTER socket binds."""
        return "tcp://" + self.listen

    @property
    def router_endpoint(self) -> str:
        """ZeroMQ endpoint others dial to reach the ROUTER socket."""
        return "tcp://" + (self.advertise or self.listen)

    @property
    def pub_bind(self) -> str:
        """ZeroMQ endpoint the PUB socket binds."""
        host, port = self._pub_host_port()
        return f"tcp://{host}:{port}"

    @property
    def pub_endpoint(self) -> str:
        """ZeroMQ endpoint subscribers dial: advertised host, PUB port."""
        host, _ = split_address(self.advertise or self.listen, port_min=0)
        return f"tcp://{host}:{self._pub_host_port()[1]}"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP metrics server, or None when metrics are off."""
        if self.metrics == "off":
            return None
        if self.metrics:
            return split_address(self.metrics, port_min=0)
        host, port = split_address(self.listen, port_min=0)
        return host, _derived_port(port, 2000)

    @property
    def curve_enabled(self) -> bool:
        """CURVE on every ZeroMQ socket (``curve`` on, or auto with a secret)."""
        return self.curve == "on" or (self.curve == "auto" and bool(self.curve_secret))

    @property
    def exposed_without_curve(self) -> bool:
        """Open on purpose (curve = off) on an address other machines can reach."""
        if self.curve_enabled:
            return False
        hosts = (split_address(self.listen, port_min=0)[0], self._pub_host_port()[0])
        return not all(is_loopback(h) for h in hosts)

    @property
    def resolved_node_id(self) -> str:
        """The node id in use: node_id, else the advertised HOST:PORT."""
        return self.node_id or (self.advertise or self.listen)

    def _pub_host_port(self) -> tuple[str, int]:
        if self.pub:
            return split_address(self.pub, port_min=0)
        host, port = split_address(self.listen, port_min=0)
        return host, _derived_port(port, 1)

    def bound(self, router_endpoint: str, pub_endpoint: str) -> NodeConfig:
        """This config once the sockets are bound: ``router_endpoint`` and
        ``pub_endpoint`` are what the transport advertises, with the ports it got.

        Advertise and pub become explicit, so the advertised endpoints and a node id
        derived from advertise carry the bound ports instead of 0.  Listen keeps its
        port (0 stays 0), so a derived metrics address still binds a free port.
        """
        host, port = split_address(router_endpoint)
        pub_host, _ = split_address(self.pub_bind, port_min=0)
        _, pub_port = split_address(pub_endpoint)
        return dataclasses.replace(self, advertise=f"{host}:{port}",
                                   pub=f"{pub_host}:{pub_port}")


def _derived_port(base: int, offset: int) -> int:
    """A port derived from listen's: 0 stays 0 (a free port of its own)."""
    return base + offset if base else 0


# --- validation ---------------------------------------------------------------------------

def split_address(text: str, port_min: int = 1) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``tcp://HOST:PORT`` into (host, port); ValueError if bad.

    IPv6 hosts keep their brackets (``[::1]:7400``) so they can be put back into a
    ZeroMQ endpoint unchanged.  ``port_min=0`` accepts port 0 (bind a free port).
    """
    rest = text.strip()
    if rest.startswith("tcp://"):
        rest = rest[len("tcp://"):]
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(text)
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(text)
    port = int(port_text)
    if not port_min <= port <= _PORT_MAX:
        raise ValueError(text)
    return host, port


def _normal_address(value: Any, port_min: int = 1) -> str:
    host, port = split_address(value, port_min)
    return f"{host}:{port}"


def _bad(name: str, requirement: str, value: Any) -> ConfigError:
    return ConfigError(name, f"must be {requirement}, got {value!r}")


def _requirement(f: dataclasses.Field) -> str:
    """Human wording of what a field accepts, reused in errors and docs."""
    m = f.metadata
    kind = m["kind"]
    if kind == "address0":
        return "HOST:PORT with port 0..65535"
    if kind == "address0?":
        return "empty or HOST:PORT with port 0..65535"
    if kind == "metrics":
        return "empty, 'off' or HOST:PORT with port 0..65535"
    if kind == "path":
        return "empty or a file path"
    if kind == "addresses":
        return f"a list of at most {SEEDS_MAX} HOST:PORT addresses"
    if kind == "modules":
        return f"a list of at most {BEHAVIORS_MAX} dotted Python module names"
    if kind == "node_id":
        return "a printable string without whitespace, at most 255 bytes of UTF-8"
    if kind == "transports":
        return "a list of transport names (letters, digits, _ . -)"
    if kind == "labels":
        return "a list of KEY=VALUE labels"
    if kind == "policy":
        return "a list of rules LABEL=VALUE:TRANSPORT/TRANSPORT/..."
    if kind == "binds":
        return "a list of NAME=HOST:PORT"
    if m["choices"]:
        return "one of " + "|".join(m["choices"])
    noun = "an integer" if f.type in (int, "int") else "a number"
    lo, hi = m["lo"], m["hi"]
    if lo is not None and hi is not None:
        return f"{noun} in {_num(lo)}..{_num(hi)}"
    if lo is not None:
        return f"{noun} {'>' if m['lo_open'] else '>='} {_num(lo)}"
    return noun


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check(f: dataclasses.Field, value: Any) -> Any:
    """Return ``value`` coerced and normalised for field ``f``, or raise ConfigError."""
    kind = f.metadata["kind"]
    if kind in ("addresses", "modules") or kind in _LIST_ITEM_RE:
        return _check_list(f, value)
    if f.type in (int, "int"):
        return _check_int(f, value)
    if f.type in (float, "float"):
        return _check_float(f, value)
    return _check_str(f, value)


def _check_int(f: dataclasses.Field, value: Any) -> int:
    number: Any = value
    if isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise _bad(f.name, _requirement(f), value) from None
    if isinstance(number, bool) or not isinstance(number, int) or not _in_range(f, number):
        raise _bad(f.name, _requirement(f), value)
    return number


def _check_float(f: dataclasses.Field, value: Any) -> float:
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _bad(f.name, _requirement(f), value) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _bad(f.name, _requirement(f), value)
    if not math.isfinite(number) or not _in_range(f, number):
        raise _bad(f.name, _requirement(f), value)
    return float(number)


def _in_range(f: dataclasses.Field, number: float) -> bool:
    lo, hi, lo_open = f.metadata["lo"], f.metadata["hi"], f.metadata["lo_open"]
    if lo is not None and (number <= lo if lo_open else number < lo):
        return False
    return hi is None or number <= hi


def _check_str(f: dataclasses.Field, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(f.name, _requirement(f), value)
    text = value.strip()
    kind, choices = f.metadata["kind"], f.metadata["choices"]
    try:
        if kind == "address0" or (kind == "address0?" and text):
            return _normal_address(text, port_min=0)
        if kind == "metrics" and text and text != "off":
            return _normal_address(text, port_min=0)
    except ValueError:
        raise _bad(f.name, _requirement(f), value) from None
    if kind == "path" and "\0" in text:
        raise _bad(f.name, _requirement(f), value)
    if choices and text.lower() not in choices:
        raise _bad(f.name, _requirement(f), value)
    if kind == "node_id" and not _node_id_ok(text):
        raise _bad(f.name, _requirement(f), value)
    return text.lower() if choices else text


def _check_list(f: dataclasses.Field, value: Any) -> tuple[str, ...]:
    """Accept a list/tuple of strings or one comma-separated string."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [part.strip() for v in value for part in v.split(",")]
    else:
        raise _bad(f.name, _requirement(f), value)
    items = [item for item in items if item]
    limit = SEEDS_MAX if f.metadata["kind"] == "addresses" else BEHAVIORS_MAX
    if len(items) > limit:
        raise _bad(f.name, _requirement(f), value)
    pattern = _LIST_ITEM_RE.get(f.metadata["kind"])
    if pattern is not None:
        bad = [item for item in items if not pattern.match(item)]
        if bad:
            raise _bad(f.name, _requirement(f), bad[0])
        return tuple(dict.fromkeys(items))
    if f.metadata["kind"] == "modules":
        bad = [item for item in items if not _MODULE_RE.match(item)]
        if bad:
            raise _bad(f.name, _requirement(f), bad[0])
        return tuple(dict.fromkeys(items))
    try:
        return tuple(dict.fromkeys("tcp://" + _normal_address(item) for item in items))
    except ValueError:
        raise _bad(f.name, _requirement(f), value) from None


def _node_id_ok(text: str) -> bool:
    """Peer frames carry a node id as 1..255 bytes of UTF-8 (protocols/peer.py)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return size <= 255 and text.isprintable() and not any(c.isspace() for c in text)


def _check_cross_fields(cfg: NodeConfig) -> None:
    """Rules that involve more than one field: derived ports exist, sockets don't
    collide, a wildcard listen has a dialable advertise address."""
    host, port = split_address(cfg.listen, port_min=0)
    if not cfg.pub and port + 1 > _PORT_MAX:
        raise ConfigError("pub", f"listen port {port} leaves no room for the derived "
                          "PUB port (listen port + 1); set pub explicitly")
    if not cfg.metrics and port + 2000 > _PORT_MAX:
        raise ConfigError("metrics", f"listen port {port} leaves no room for the derived "
                          "metrics port (listen port + 2000); set metrics or 'off'")
    pub_port = cfg._pub_host_port()[1]
    if pub_port and pub_port == port:  # port 0 binds a free port each: never the same
        raise ConfigError("pub", f"PUB port {pub_port} is the listen port")
    metrics = cfg.metrics_address
    if metrics and metrics[1] and metrics[1] in (port, pub_port):
        raise ConfigError("metrics", f"metrics port {metrics[1]} collides with the "
                          "listen or PUB port")
    if cfg.probe_timeout_s > cfg.probe_interval_s:
        raise ConfigError("probe_timeout_s", f"{cfg.probe_timeout_s} exceeds "
                          f"probe_interval_s ({cfg.probe_interval_s})")
    if cfg.downing == "static-quorum" and cfg.quorum_size < 1:
        raise ConfigError("quorum_size", "downing = static-quorum needs quorum_size >= 1 "
                          "(a majority of the cluster size)")
    if not cfg.advertise and host in _WILDCARD_HOSTS:
        raise ConfigError("advertise", f"must be set when listen binds the wildcard "
                          f"host {host!r}: peers cannot dial it")
    _check_curve(cfg, host)
    _check_bridges(cfg)
    if cfg.restart_backoff_max_s < cfg.restart_backoff_s:
        raise ConfigError("restart_backoff_max_s", "must be >= restart_backoff_s "
                          f"({cfg.restart_backoff_s}), got {cfg.restart_backoff_max_s!r}")


def is_loopback(host: str) -> bool:
    """True for a host only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    return host.startswith("127.") or host in ("localhost", "[::1]", "::1")


def _check_bridges(cfg: NodeConfig) -> None:
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_key" if cfg.tls_cert else "tls_cert",
                          "tls_cert and tls_key go together")
    if cfg.quic and not (cfg.tls_cert and cfg.tls_ca):
        raise ConfigError("quic", "QUIC needs TLS: set tls_cert, tls_key and tls_ca "
                          "('synthesis-ctl certs DIR NAME' makes them)")
    if cfg.http2 and not cfg.tls_cert and cfg.curve != "off" \
            and not is_loopback(split_address(cfg.http2, port_min=0)[0]):
        raise ConfigError("http2", "h2c (no TLS) is for loopback: set tls_cert and "
                          "tls_key, or curve = \"off\" to run open on purpose")
    if cfg.http2 and cfg.curve_enabled and not (cfg.tls_cert and cfg.tls_ca):
        raise ConfigError("http2", "with CURVE on, the HTTP/2 bridge needs tls_cert, tls_key "
                          "and tls_ca: its peers must authenticate as CURVE peers do")
    ports = [split_address(a, port_min=0)[1] for a in (cfg.listen, cfg.http2) if a]
    if cfg.http2 and ports[0] and ports[0] == ports[1]:
        raise ConfigError("http2", "the HTTP/2 port is the listen port")


def _check_curve(cfg: NodeConfig, listen_host: str) -> None:
    if cfg.curve_enabled and not (cfg.curve_secret and cfg.curve_peers):
        raise ConfigError("curve_secret" if not cfg.curve_secret else "curve_peers",
                          "curve = on needs curve_secret (this node's key_secret file) "
                          "and curve_peers (a directory of the peers' public keys)")
    if cfg.curve_peers and not cfg.curve_secret:
        raise ConfigError("curve_secret", "curve_peers is set but curve_secret is not")
    exposed = [h for h in (listen_host, cfg._pub_host_port()[0]) if not is_loopback(h)]
    if cfg.curve == "auto" and not cfg.curve_secret and exposed:
        raise ConfigError("curve", f"listen or pub binds {exposed[0]!r}, reachable from "
                          "other machines, without CURVE keys: set curve_secret and "
                          "curve_peers, or curve = \"off\" to run open on purpose")


# --- sources ------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
_LIST_FLAGS = {"seeds": ("--seed", "--seeds"), "behaviors": ("--behavior", "--behaviors")}


def flag_name(key: str) -> str:
    """Command-line flag of a config key: ``mailbox_len_max`` -> ``--mailbox-len-max``."""
    return _LIST_FLAGS[key][0] if key in _LIST_FLAGS else "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    """Environment variable of a config key: ``mailbox_len_max`` -> ``SYNTHESIS_MAILBOX_LEN_MAX``."""
    return ENV_PREFIX + key.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per config field; every default is None so that
    :func:`load` can tell "not given" from "given the default"."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML config file (also ${CONFIG_ENV}).")
    for name, f in _FIELDS.items():
        help_text = _flag_help(name, f)
        if name in _LIST_FLAGS:
            one, many = _LIST_FLAGS[name]
            parser.add_argument(one, dest=name, action="append", default=None,
                                metavar="VALUE", help=help_text + " Repeatable.")
            parser.add_argument(many, dest=name, action="append", default=None,
                                metavar="A,B", help=f"Comma-separated form of {one}.")
        else:
            choices = f.metadata["choices"]
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(flag_name(name), dest=name, default=None,
                                metavar=metavar, help=help_text)


def _flag_help(name: str, f: dataclasses.Field) -> str:
    """A flag's --help line: what it does, its allowed values and default, its env var.
    (The argparse default stays None, so the default is spelled out here.)"""
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += " One of: " + ", ".join(f.metadata["choices"]) + "."
    if f.default not in ("", ()):
        text += f" Default: {f.default}."
    return f"{text} [{env_name(name)}]"


def _read_file(path: str) -> dict[str, Any]:
    """Load a TOML file; unknown keys are errors so a typo cannot silently do nothing."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(CONFIG_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path!r}: {exc.strerror}") from None
    if len(raw) > CONFIG_FILE_BYTES_MAX:
        raise ConfigError("config", f"{path!r} is larger than {CONFIG_FILE_BYTES_MAX} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path!r} is not valid TOML: {exc}") from None
    for key in data:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown key in {path!r}{hint}")
    return data


def _collect(args: argparse.Namespace | None, environ: Mapping[str, str]
             ) -> dict[str, tuple[Any, str]]:
    """Merge sources into {key: (raw value, where it came from)}, highest precedence last."""
    chosen: dict[str, tuple[Any, str]] = {}
    path = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    if path:
        for key, value in _read_file(path).items():
            chosen[key] = (value, path)
    for key in _FIELDS:
        value = environ.get(env_name(key))
        if value:  # an empty variable counts as unset (common in EnvironmentFile=)
            chosen[key] = (value, env_name(key))
    for key in _FIELDS:
        value = getattr(args, key, None) if args is not None else None
        if value is not None:
            chosen[key] = (value, flag_name(key))
    return chosen


def load(args: argparse.Namespace | None = None,
         environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Build the node's config from flags > environment > file > defaults.

    Raises ConfigError naming the key and the source of the bad value.
    """
    environ = os.environ if environ is None else environ
    chosen = _collect(args, environ)
    values = {}
    for key, (raw, source) in chosen.items():
        try:
            values[key] = _check(_FIELDS[key], raw)
        except ConfigError as exc:
            raise ConfigError(key, f"{exc.problem} (from {source})") from None
    try:
        return NodeConfig(**values)
    except ConfigError as exc:
        if exc.key not in chosen:
            raise
        raise ConfigError(exc.key, f"{exc.problem} (from {chosen[exc.key][1]})") from None


# --- documentation ------------------------------------------------------------------------

def _type_name(f: dataclasses.Field) -> str:
    kind = f.metadata["kind"]
    if kind in ("addresses", "modules"):
        return "list[str]"
    return {int: "int", float: "float", str: "str"}.get(f.type, str(f.type))


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every setting, in declaration order."""
    return [(f.name, _type_name(f), f.default, f"{f.metadata['help']} Must be "
             f"{_requirement(f)}.") for f in _FIELDS.values()]


def _md_cell(text: str) -> str:
    """Escape pipes, which would otherwise split a markdown table cell."""
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/CONFIG.md: the config reference table, generated from the dataclass."""
    lines = [
        "# Node configuration",
        "",
        "Generated by `python -m node.config > docs/CONFIG.md`; edit `node/config.py`, "
        "not this file.",
        "",
        "Sources, highest precedence first: command-line flag, environment variable, "
        f"TOML file (`--config PATH` or `${CONFIG_ENV}`), default. A node runs with no "
        "file. Unknown keys in the file and invalid values stop the node at start with "
        "an error naming the key. List values are comma-separated in the environment, "
        "repeatable or comma-separated as flags. An empty environment variable counts "
        "as unset.",
        "",
        "| key | type | default | flag | environment | description |",
        "|---|---|---|---|---|---|",
    ]
    for key, type_name, default, help_text in describe():
        shown = list(default) if isinstance(default, tuple) else default
        lines.append(f"| `{key}` | {type_name} | `{shown!r}` | `{flag_name(key)}` | "
                     f"`{env_name(key)}` | {_md_cell(help_text)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
