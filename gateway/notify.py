"""systemd's readiness and watchdog protocol (sd_notify(3)), without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``); the service sends newline-separated
``KEY=VALUE`` datagrams to it: ``READY=1`` once it serves, ``STOPPING=1``
when shutdown starts, ``RELOADING=1``/``READY=1`` around a reload,
``STATUS=...`` for ``systemctl status``, and ``WATCHDOG=1`` at least once per
``$WATCHDOG_USEC`` when ``WatchdogSec=`` is set (``$WATCHDOG_PID``, when
present, must be this process).  Outside systemd every call is a no-op.

The watchdog ping comes from the event loop itself, so a loop that is stuck
(a blocking call, a deadlock, SIGSTOP) stops pinging and systemd restarts
the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping

import structlog

from gateway.aio import running

log = structlog.get_logger("gateway.notify")


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (if set)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``fields``; False when not under systemd or on error."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd order this against the READY=1 that follows.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "shutting down") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    async def watchdog(self) -> None:
        """Ping every half watchdog interval until cancelled (returns at once without one)."""
        if self.watchdog_s is None or self.address is None:
            return
        interval = self.watchdog_s / 2
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def pinging(self) -> AsyncIterator[None]:
        """Run :meth:`watchdog` for the duration of the block."""
        async with running(self.watchdog(), "sd-watchdog"):
            yield
