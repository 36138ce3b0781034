"""This node's VRRP role, as keepalived's notify hook records it.

keepalived runs ``mcp-vrrp-notify`` (roles/keepalived) on every transition; the
hook writes ``<state> <unix time>`` to ``ha.vrrp_state_file``.  The gateway
reads that file every ``ha.poll_interval_s``: it logs each change, exports it
as ``mcp_vrrp_role`` and reports it in ``/ready`` under ``checks.vrrp``.  The
role is information only: a backup node stays ready (it must be, to take
over), and readiness never depends on the role.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog

from gateway.errors import FailedPrecondition
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.ha")

# keepalived's state names (notify's third argument) to the metric's roles.
_ROLES = {"master": "master", "backup": "backup", "fault": "fault"}


def parse_state(text: str) -> str:
    """The role in a state file's text; ``unknown`` for anything else (STOP, garbage)."""
    words = text.split()
    return _ROLES.get(words[0].lower(), "unknown") if words else "unknown"


class VrrpRole:
    """The last role read from the state file (``unknown`` until the hook wrote one)."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        self.path = path
        self.metrics = metrics
        self.role = "unknown"

    def refresh(self) -> str:
        """Read the file again; log and export a change.  Never raises."""
        try:
            role = parse_state(self.path.read_text(encoding="utf-8", errors="replace")[:200])
        except OSError:
            role = "unknown"
        if role != self.role:
            log.info("vrrp role changed", previous=self.role, role=role, file=str(self.path))
            self.metrics.set_vrrp_role(role)
            self.role = role
        return role

    async def _poll(self, interval: float) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def watching(self, interval: float) -> AsyncIterator[VrrpRole]:
        task = asyncio.create_task(self._poll(interval), name="vrrp-role")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- task ids across a failover --------------------------------------------------------


def node_tag(node: str) -> str:
    """The 8 hex digits that open the ids of tasks started on ``node``."""
    return hashlib.sha256(node.encode()).hexdigest()[:8]


class TaskIds:
    """Task ids that say which node started the task (still 32 lowercase hex digits).

    Tasks live on the node that runs them.  After a failover, the node now
    holding the VIP answers a poll for its peer's task with a clear LOST
    (naming the peer) instead of a bare 404.
    """

    def __init__(self, node: str, peers: Sequence[str] = ()) -> None:
        self.node = node
        self.tag = node_tag(node)
        self._peers = {node_tag(peer): peer for peer in peers if peer != node}

    def new(self) -> str:
        return self.tag + secrets.token_hex(12)

    def elsewhere(self, task_id: str) -> str | None:
        """The peer that started ``task_id``; None for this node's ids and unknown tags."""
        return self._peers.get(task_id[:8])

    def lost(self, task_id: str, node: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"task {task_id} was started on {node}, not on this node ({self.node}); "
            "the address moved here (a failover), and the task's state and output stayed "
            f"there: its state here is LOST. Ask {node} directly, or run it again.",
            field="task_id",
            reasons=["task_state=LOST", f"node={node}"],
        )
