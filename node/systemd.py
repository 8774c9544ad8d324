"""sd_notify(3) without libsystemd: readiness, stopping and watchdog pings.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a unix datagram socket (a
filesystem path, or an abstract name written ``@name``).  A node sends ``READY=1`` once
its sockets are bound, ``STOPPING=1`` when it starts draining, and ``WATCHDOG=1``
periodically when ``WatchdogSec=`` is set.  Outside systemd every call is a cheap no-op
returning False, so the node never needs to know how it was started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

MESSAGE_BYTES_MAX = 4096  # notifications are a few short lines
_SEND_TIMEOUT_S = 1.0     # systemd's socket never blocks for long; never hang the loop


def _socket_address(path: str) -> str | None:
    """Map $NOTIFY_SOCKET to an AF_UNIX address; None for forms we don't speak (vsock)."""
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; True if it was sent.

    False when $NOTIFY_SOCKET is unset or unusable: notification is best-effort, a node
    must not fail because its supervisor went away.
    """
    environ = os.environ if environ is None else environ
    address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
    data = message.encode("utf-8")
    if address is None or not data or len(data) > MESSAGE_BYTES_MAX:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(data)
    except OSError:
        return False
    return True


def ready() -> bool:
    """Tell systemd the node is serving (sockets bound, first gossip to seeds sent or queued)."""
    return notify("READY=1")


def stopping() -> bool:
    """Tell systemd the node is shutting down on purpose, so it isn't seen as a crash."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Ping the watchdog; call every :func:`watchdog_interval_s` seconds from the loop."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed for us.

    Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late tick of
    the loop does not get the node killed.  WATCHDOG_PID, when set, must be our pid:
    the variables may have been inherited from a parent that is the real target.
    """
    environ = os.environ if environ is None else environ
    pid = environ.get("WATCHDOG_PID")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 1e6 / 2
