"""Shared by the MCP tests: the official SDK client against /mcp, and waits on running tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from gateway.tasks import TaskManager
from tests.conftest import USERS


class Served(Protocol):
    def url(self, path: str) -> str: ...


@contextlib.asynccontextmanager
async def connect(
    gateway: Served, user: str = "alice", *, token: str | None = None
) -> AsyncIterator[ClientSession]:
    """An initialized SDK session as ``user`` (or with ``token``).

    A context manager, not a fixture: anyio task groups must be entered and
    exited in the same task.
    """
    headers = {"Authorization": f"Bearer {token or USERS[user][0]}"}
    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(gateway.url("/mcp"), http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text(result: Any) -> str:
    """The text parts of a tool result, joined."""
    return "".join(c.text for c in result.content if c.type == "text")


async def live_task(tasks: TaskManager, polls: int = 100, every: float = 0.05) -> str:
    """The id of the one task running in ``tasks``, once it runs (a bounded wait)."""
    for _ in range(polls):
        if tasks._live:
            break
        await asyncio.sleep(every)
    (task_id,) = tasks._live
    return task_id


async def until_ended(
    tasks: TaskManager, task_id: str, polls: int = 100, every: float = 0.1
) -> None:
    """Wait (bounded) until ``task_id`` is no longer running."""
    for _ in range(polls):
        if task_id not in tasks._live:
            return
        await asyncio.sleep(every)
