"""sd_notify with a real gateway process: READY, loop-driven watchdog, RELOADING, STOPPING."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class NotifySocket:
    """The datagram socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Messages received during the next ``seconds``."""
        got: list[dict[str, str]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            got.append(fields)
        self.messages += got
        return got

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.collect(0.2):
                if key in message:
                    return message
        raise AssertionError(f"no {key} in {self.messages}")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


def test_ready_watchdog_reload_and_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    """The gateway speaks the Type=notify protocol and its watchdog stops when the loop stops."""
    state = tmp_path / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), tmp_path)
    gw.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "300000"})
    assert gw.proc is not None
    try:
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(gw.proc.pid)
        assert "serving REST" in ready["STATUS"]
        pings = [m for m in notify.collect(1.0) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 4  # every 150 ms

        gw.proc.send_signal(signal.SIGSTOP)  # a hung gateway
        try:
            time.sleep(0.05)
            notify.collect(0.05)  # drop a ping that was in flight
            assert notify.collect(0.8) == []
        finally:
            gw.proc.send_signal(signal.SIGCONT)
        assert notify.wait_for("WATCHDOG")["WATCHDOG"] == "1"

        gw.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.wait_for("READY")["READY"] == "1"
    finally:
        assert gw.stop() == 0
    assert any(m.get("STOPPING") == "1" for m in notify.messages + notify.collect(0.2))


def test_no_notify_socket_means_no_messages(tmp_path: Path, notify: NotifySocket) -> None:
    """Outside systemd the gateway sends nothing (and still serves)."""
    state = tmp_path / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), tmp_path)
    gw.start()
    try:
        assert notify.collect(0.5) == []
    finally:
        assert gw.stop() == 0
