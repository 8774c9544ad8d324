"""CURVE for the ZeroMQ transport: keys, who may connect, and as whom.

Every ZeroMQ socket of a secured node runs CURVE (libzmq's CurveZMQ: the handshake
authenticates both ends and encrypts every frame after it).  The node's ROUTER and
PUB are CURVE servers with the node's own key pair; its peer DEALERs and its SUB are
CURVE clients with the same pair, so the peers they reach authenticate this node.

Who may connect is decided by ZAP (libzmq's authentication protocol), answered by
pyzmq's ``zmq.auth`` handler on a thread of its own, from two directories of public
certificates: ``curve_peers`` (nodes) and ``curve_clients`` (clients).  The answer
names the connection with a *user id* that libzmq then stamps on every message it
delivers from it:

- ``peer/<key>/<node id>`` for a peer key; the node id is the certificate's
  ``node-id`` metadata, or its file name without ``.key``.  This is what binds a
  node id to a key: a peer frame naming another sender is refused.
- ``client/<key>`` for a client key.

The transport checks each message's user id against the current ``KeyRing`` (so a
key removed from a directory stops being served at the next reload, even on a
connection made before), lets only peer keys send peer frames, and passes the
client user id on as the request's principal (limits per client).

A node reaches a peer's ROUTER and PUB with the server key that peer advertises in
membership (the ``zmq-key`` endpoint), used only when a peer certificate binds that
key to that node id.  A seed, not a member yet, is reached with the peer key whose
certificate names the seed's address in its ``endpoint`` metadata, or whose node
id is the seed's ``HOST:PORT`` (the default node id).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from protocols.membership import ZMQ_KEY

KEY_ENDPOINT = ZMQ_KEY           # the membership endpoint that carries a node's public key
PEER_PREFIX = "peer/"
CLIENT_PREFIX = "client/"
ROUTER_DOMAIN = b"synthesis"      # ZAP domains: the ROUTER takes peers and clients,
PUB_DOMAIN = b"synthesis-pub"     # the PUB only peers
CERTS_MAX = 4096                  # certificates read from one directory
CERT_BYTES_MAX = 64 << 10         # a certificate is a few hundred bytes


class CurveError(ValueError):
    """A key file or directory that cannot be used (named in the message)."""


@dataclass(frozen=True)
class PeerCert:
    key: bytes          # the public key, Z85 (40 bytes)
    node_id: str        # the node id this key may speak for
    endpoint: str       # metadata "endpoint" (a seed address), or ""


@dataclass(frozen=True)
class KeyRing:
    """The allowed keys at one moment; replaced whole on reload (never mutated)."""

    peers: Mapping[bytes, PeerCert] = field(default_factory=dict)
    clients: frozenset[bytes] = frozenset()
    # user id -> the node id it may send peer frames as (None: a client): what the
    # transport checks every message against.
    allowed: Mapping[str, bytes | None] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        allowed: dict[str, bytes | None] = {}
        for cert in self.peers.values():
            allowed[peer_user_id(cert)] = cert.node_id.encode()
        for key in self.clients:
            allowed.setdefault(CLIENT_PREFIX + key.decode(), None)
        object.__setattr__(self, "allowed", allowed)

    def admits(self, key: bytes, domain: bytes) -> bool:
        """ZAP: may ``key`` (Z85) connect to a socket of ``domain``?"""
        return key in self.peers or (domain != PUB_DOMAIN and key in self.clients)

    def user_id(self, key: bytes) -> str:
        """The user id of a connection made with ``key`` (Z85), or "" if not allowed."""
        cert = self.peers.get(key)
        if cert is not None:
            return peer_user_id(cert)
        return CLIENT_PREFIX + key.decode() if key in self.clients else ""

    def member_key(self, node_id: str, advertised: str | None) -> bytes | None:
        """The key to dial member ``node_id`` with: the one it advertises, when a peer
        certificate binds that key to that id."""
        if advertised is None:
            return None
        cert = self.peers.get(advertised.encode())
        return cert.key if cert is not None and cert.node_id == node_id else None

    def member_keys(self) -> dict[str, frozenset[str]]:
        """node id -> the keys (Z85 text) that may speak for it, for membership."""
        keys: dict[str, set[str]] = {}
        for cert in self.peers.values():
            keys.setdefault(cert.node_id, set()).add(cert.key.decode())
        return {node_id: frozenset(k) for node_id, k in keys.items()}

    def seed_key(self, address: str) -> bytes | None:
        """The key to dial a seed at ``address`` (``tcp://HOST:PORT``) with."""
        host_port = address.removeprefix("tcp://")
        by_id = None
        for cert in self.peers.values():
            if cert.endpoint == address:
                return cert.key
            if cert.node_id == host_port:
                by_id = cert.key
        return by_id


def peer_user_id(cert: PeerCert) -> str:
    return f"{PEER_PREFIX}{cert.key.decode()}/{cert.node_id}"


# --- certificate files --------------------------------------------------------------

def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata`` section of a ZPL certificate as ``zmq.auth`` writes it."""
    text = _read_text(path)
    meta: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        name, sep, value = line.strip().partition("=")
        if section == "metadata" and sep:
            meta[name.strip()] = value.strip().strip('"')
    return meta


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > CERT_BYTES_MAX:
            raise CurveError(f"{path}: larger than {CERT_BYTES_MAX} bytes, not a certificate")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveError(f"{path}: {exc}") from None


def load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: not a CURVE certificate ({exc})") from None
    if public is None or len(public) != 40:
        raise CurveError(f"{path}: no public-key in it")
    return public


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret certificate (``NAME.key_secret``)."""
    path = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: not a CURVE certificate ({exc})") from None
    if not secret or len(secret) != 40 or not public:
        raise CurveError(f"{path}: holds no secret-key; give the NAME.key_secret file")
    return public, secret


def _public_certs(directory: str) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise CurveError(f"{directory}: not a directory")
    certs = sorted(p for p in root.iterdir() if p.name.endswith(".key") and p.is_file())
    if len(certs) > CERTS_MAX:
        raise CurveError(f"{directory}: more than {CERTS_MAX} certificates")
    return certs


def load_keyring(peers_dir: str, clients_dir: str) -> KeyRing:
    """Read both directories; a file that is not a certificate fails the whole load
    (the caller keeps the keys it had), so a typo never silently locks peers out."""
    peers: dict[bytes, PeerCert] = {}
    for path in _public_certs(peers_dir) if peers_dir else []:
        meta = read_metadata(path)
        key = load_public(path)
        node_id = meta.get("node-id") or path.name[:-len(".key")]
        peers[key] = PeerCert(key, node_id, meta.get("endpoint", ""))
    clients = frozenset(load_public(p) for p in (_public_certs(clients_dir) if clients_dir else []))
    return KeyRing(peers, clients)


def new_certificates(directory: str, name: str, node_id: str = "",
                     endpoint: str = "") -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) into
    ``directory``, as ``zmq.auth.create_certificates`` does, with our metadata."""
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"{name!r}: a certificate name is a plain file name")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (root / (name + suffix)).exists():
            raise CurveError(f"{root / (name + suffix)} exists; refusing to overwrite a key")
    _check_metadata(node_id, endpoint)
    old_umask = os.umask(0o077)  # the secret is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(root, name)
    finally:
        os.umask(old_umask)
    key, _ = zmq.auth.load_certificate(secret)
    # pyzmq puts metadata into the secret file only: the public one is ours to write.
    write_public_cert(Path(public), key, node_id, endpoint)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _check_metadata(*values: str) -> None:
    for value in values:
        if any(c in value for c in '"\n\r'):
            raise CurveError(f"{value!r}: quotes and line breaks cannot go into a certificate")


def write_public_cert(path: Path, key: bytes, node_id: str = "", endpoint: str = "") -> None:
    """A public certificate in the ZPL format ``zmq.auth`` reads, with our metadata:
    ``node-id`` (the id the key may speak for) and ``endpoint`` (where it listens)."""
    _check_metadata(node_id, endpoint)
    meta = "".join(f'    {name} = "{value}"\n' for name, value in
                   (("node-id", node_id), ("endpoint", endpoint)) if value)
    path.write_text("#   ZeroMQ CURVE Public Certificate, written by synthesis-ctl keys\n"
                    "#   Give it to the nodes that should let this key in.\n\n"
                    f"metadata\n{meta}curve\n    public-key = \"{key.decode()}\"\n",
                    encoding="utf-8")
    os.chmod(path, 0o644)


# --- a client's side ------------------------------------------------------------------

@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes   # the node's public key: only a server holding its secret answers

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def client_keys(secret_file: str | None, server_file: str | None) -> ClientKeys | None:
    """A client's CURVE keys from its secret certificate and the node's public one;
    None when neither is given (a plain connection)."""
    if not secret_file and not server_file:
        return None
    if not (secret_file and server_file):
        raise CurveError("CURVE needs both the client's secret certificate "
                         "(curve_secret) and the node's public one (curve_server)")
    public, secret = load_secret(secret_file)
    return ClientKeys(public, secret, load_public(Path(server_file)))


# --- the node's side ------------------------------------------------------------------

class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, answering from the node's current KeyRing."""

    def __init__(self, context: zmq.Context, curve: "NodeCurve"):
        super().__init__(context)
        self._curve = curve
        self._address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:  # the credentials provider
        if self._curve.keyring.admits(key, domain.encode()):
            return True
        self._curve.refused_handshake(key, self._address, domain)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._curve.keyring.user_id(z85.encode(client_public_key))


class NodeCurve:
    """A node's CURVE settings: its key pair, the allowed keys, the ZAP thread."""

    def __init__(self, secret_file: str, peers_dir: str, clients_dir: str, log: Any = None):
        self.public, self.secret = load_secret(secret_file)
        self._dirs = (peers_dir, clients_dir)
        self.keyring = load_keyring(peers_dir, clients_dir)
        self._log = log
        self._auth: _Authenticator | None = None
        self._lock = threading.Lock()
        self.handshakes_refused = 0   # written by the ZAP thread only
        self._refused_seen: set[bytes] = set()

    def reload(self) -> KeyRing:
        """Read the directories again (SIGHUP); on error the old keys stay, raised."""
        self.keyring = load_keyring(*self._dirs)
        with self._lock:
            self._refused_seen.clear()
        return self.keyring

    def start(self, context: zmq.Context) -> None:
        auth = self._auth = _Authenticator(context, self)
        auth.start()
        for domain in (ROUTER_DOMAIN, PUB_DOMAIN):
            auth.configure_curve_callback(domain.decode(), credentials_provider=auth)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def serve(self, sock: zmq.Socket, domain: bytes) -> None:
        """Make ``sock`` a CURVE server with the node's keys, authenticated by ZAP."""
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def dial(self, sock: zmq.Socket, server_key: bytes) -> None:
        """The next ``connect`` of ``sock`` reaches a server holding ``server_key``."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def refused_handshake(self, key: bytes, address: str, domain: str) -> None:
        self.handshakes_refused += 1
        with self._lock:
            first = key not in self._refused_seen and len(self._refused_seen) < 1024
            self._refused_seen.add(key)
        if first and self._log is not None:  # once per key and reload: a flood stays quiet
            self._log.warning("curve_key_refused", key=key.decode(), address=address,
                              domain=domain, hint="add its certificate to curve_peers or "
                              "curve_clients (then SIGHUP) if it should be let in")
