"""node.systemd: sd_notify over real unix datagram sockets (path and abstract)."""

import os
import socket
import uuid

import pytest

from node import systemd


@pytest.fixture
def path_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_unset_socket_returns_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False


def test_helpers_send_their_messages(path_socket):
    assert systemd.ready() is True
    assert path_socket.recv(4096) == b"READY=1"
    assert systemd.watchdog() is True
    assert path_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.stopping() is True
    assert path_socket.recv(4096) == b"STOPPING=1"
    assert systemd.status("serving\n3 peers") is True
    assert path_socket.recv(4096) == b"STATUS=serving 3 peers"


def test_abstract_socket(monkeypatch):
    name = f"synthesis-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_missing_socket_or_unsupported_form_returns_false(tmp_path):
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1"}) is False
    assert systemd.notify("x" * 5000, {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "10000000"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "ten"}, None),
])
def test_watchdog_interval(env, expected):
    assert systemd.watchdog_interval_s(env) == expected


def test_watchdog_interval_reads_process_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval_s() == 1.5


def test_a_real_node_speaks_sd_notify(tmp_path):
    """READY once it serves, watchdog pings at half WATCHDOG_USEC, STOPPING on SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    from support import REPO, child_env, free_port
    from node.client import Client

    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    address = f"127.0.0.1:{free_port()}"
    env = child_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--listen", address,
                             "--pub", f"127.0.0.1:{free_port()}", "--metrics", "off"],
                            env=env, cwd=str(REPO), stderr=subprocess.DEVNULL)
    try:
        assert listener.recv(4096) == b"READY=1"
        with Client(address, timeout_s=2) as c:  # READY means serving
            assert c.ping()["node"] == address
        pings = 0
        deadline = time.monotonic() + 5
        while pings < 3 and time.monotonic() < deadline:
            if listener.recv(4096) == b"WATCHDOG=1":
                pings += 1
        assert pings == 3
        proc.send_signal(signal.SIGTERM)
        seen = set()
        while b"STOPPING=1" not in seen:
            seen.add(listener.recv(4096))
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        listener.close()
