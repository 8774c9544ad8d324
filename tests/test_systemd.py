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
