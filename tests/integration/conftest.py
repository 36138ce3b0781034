"""A running gateway on a loopback port, driven over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from tests.conftest import USERS, make_config


class Api:
    """A thin HTTP helper bound to one running gateway."""

    def __init__(self, server: TestServer, session: aiohttp.ClientSession, state: Path) -> None:
        self.server = server
        self.session = session
        self.state = state

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @staticmethod
    def auth(user: str | None) -> dict[str, str]:
        return {} if user is None else {"Authorization": f"Bearer {USERS[user][0]}"}

    async def call(
        self, method: str, path: str, user: str | None = "alice", **kw: Any
    ) -> tuple[int, Any]:
        headers = {**self.auth(user), **kw.pop("headers", {})}
        async with self.session.request(method, self.url(path), headers=headers, **kw) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, raw

    async def run(self, command: str, *args: str, user: str = "alice", **extra: Any) -> Any:
        """POST /v1/commands with wait=true; return the JSON task (asserting 200)."""
        status, body = await self.call(
            "POST",
            "/v1/commands",
            user,
            json={"command": command, "args": list(args), "wait": True, **extra},
        )
        assert status == 200, body
        return body


@pytest.fixture
async def api(state_dir: Path) -> AsyncIterator[Api]:
    app = build_app(make_config(state_dir))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield Api(server, session, state_dir)
    await server.close()
