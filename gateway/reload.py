"""Reloading the embedded policy: on SIGHUP and when the policy files change.

A reload compiles the new policy beside the running one and swaps only if it
compiles and passes the engine's canary; a broken policy keeps the old one
serving, logs an error and counts ``mcp_policy_reloads_total{result="error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import structlog

from gateway.aio import running
from gateway.errors import McpError
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.reload")


@runtime_checkable
class Reloadable(Protocol):
    async def reload(self) -> str: ...


def fingerprint(policy_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every policy file: changes when any file does."""
    entries = []
    for root, _dirs, files in os.walk(policy_dir):
        for name in files:
            if name.endswith((".rego", ".json")):
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(path)
                    entries.append((path, st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


class PolicyReloader:
    """Serializes reloads of one engine; counts and logs their outcome."""

    def __init__(self, engine: Reloadable, policy_dir: Path, metrics: Metrics) -> None:
        self._engine = engine
        self._dir = policy_dir
        self._metrics = metrics
        self._lock = asyncio.Lock()

    async def reload(self, reason: str) -> bool:
        """Reload now; True if the new policy is in place."""
        async with self._lock:
            try:
                revision = await self._engine.reload()
            except McpError as exc:
                self._metrics.policy_reloads.labels(result="error").inc()
                log.error(
                    "policy reload rejected; the old policy keeps serving",
                    reason=reason,
                    error=exc.message,
                )
                return False
            self._metrics.policy_reloads.labels(result="ok").inc()
            log.info("policy reloaded", reason=reason, revision=revision)
            return True

    @contextlib.asynccontextmanager
    async def watching(self, interval_s: float) -> AsyncIterator[None]:
        """Poll the policy files every ``interval_s`` while the context is open."""
        if interval_s <= 0:
            yield
            return
        # Taken before serving starts, so a change right after start-up is seen.
        seen = await asyncio.to_thread(fingerprint, self._dir)
        async with running(self._watch(interval_s, seen), "policy-watch"):
            yield

    async def _watch(self, interval_s: float, seen: tuple[tuple[str, int, int], ...]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            now = await asyncio.to_thread(fingerprint, self._dir)
            if now != seen:
                seen = now
                await self.reload("policy files changed")
