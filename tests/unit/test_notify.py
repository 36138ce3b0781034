"""Notifier: addresses and watchdog settings from the environment, datagrams on a real socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gateway.notify import Notifier

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("env", "address", "watchdog"),
    [
        ({}, None, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify", None),
        ({"NOTIFY_SOCKET": "@abstract"}, "\0abstract", None),
        ({"NOTIFY_SOCKET": "relative"}, None, None),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "30000000"}, "/s", 30.0),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "0"}, "/s", None),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "x"}, "/s", None),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, "/s", None),
    ],
)
def test_environment(env: dict[str, str], address: str | None, watchdog: float | None) -> None:
    n = Notifier(env)
    assert (n.address, n.watchdog_s) == (address, watchdog)


def test_watchdog_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_s == 2.0


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.ready("up")
        assert server.recv(1024).decode().splitlines() == [
            "READY=1",
            "STATUS=up",
            f"MAINPID={os.getpid()}",
        ]
        assert n.stopping()
        assert server.recv(1024) == b"STOPPING=1\nSTATUS=shutting down"


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")}).status("x")
    assert not Notifier({}).ready("x")
