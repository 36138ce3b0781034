"""Policy reload without a restart: file changes and SIGHUP; a broken policy keeps the old one."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.client import Client
from gateway.errors import PermissionDenied
from tests.conftest import POLICIES, USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

HEADERS = {"Authorization": f"Bearer {USERS['alice'][0]}"}


def copy_policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def forbid_for_developers(policy_dir: Path, command: str) -> None:
    data_path = policy_dir / "data.json"
    data = json.loads(data_path.read_text())
    commands = data["gateway"]["roles"]["developer"]["commands"]
    commands.remove(command)
    data_path.write_text(json.dumps(data))


async def status_of(http: aiohttp.ClientSession, server: TestServer, command: str) -> int:
    async with http.post(
        server.make_url("/v1/commands"), json={"command": command, "wait": True}
    ) as resp:
        await resp.read()
        return resp.status


async def reload_metric(http: aiohttp.ClientSession, server: TestServer, result: str) -> float:
    async with http.get(server.make_url("/metrics")) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f'mcp_policy_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
async def watched(
    tmp_path: Path, state_dir: Path
) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession, Path]]:
    policy_dir = copy_policies(tmp_path)
    config = make_config(state_dir, policy={"dir": str(policy_dir), "watch_interval_s": 0.1})
    server = TestServer(build_app(config), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        yield server, http, policy_dir
    await server.close()


async def test_changed_files_are_picked_up(
    watched: tuple[TestServer, aiohttp.ClientSession, Path],
) -> None:
    """Editing data.json changes decisions within a few watch intervals, no restart."""
    server, http, policy_dir = watched
    assert await status_of(http, server, "true") == 200
    forbid_for_developers(policy_dir, "true")
    for _ in range(100):
        if await status_of(http, server, "true") == 403:
            break
        await asyncio.sleep(0.1)
    assert await status_of(http, server, "true") == 403
    assert await reload_metric(http, server, "ok") >= 1


async def test_broken_policy_keeps_the_old_one(
    watched: tuple[TestServer, aiohttp.ClientSession, Path],
) -> None:
    """A policy that does not compile is rejected; the loaded one keeps serving."""
    server, http, policy_dir = watched
    (policy_dir / "mcp" / "broken.rego").write_text("package mcp.broken\n\nthis is not rego {\n")
    for _ in range(100):
        if await reload_metric(http, server, "error") >= 1:
            break
        await asyncio.sleep(0.1)
    assert await reload_metric(http, server, "error") >= 1
    assert await status_of(http, server, "true") == 200
    async with http.get(server.make_url("/ready")) as resp:
        assert resp.status == 200


def test_sighup_reloads(tmp_path: Path, state_dir: Path) -> None:
    """SIGHUP to a running gateway reloads the policy directory."""
    policy_dir = copy_policies(tmp_path)
    config = make_config(state_dir, policy={"dir": str(policy_dir), "watch_interval_s": 0})
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    try:
        with Client(gw.url, USERS["alice"][0]) as client:
            assert client.execute("true", wait=True)["state"] == "COMPLETED"
            forbid_for_developers(policy_dir, "true")
            time.sleep(0.3)
            # no watch: still allowed until the signal
            assert client.execute("true", wait=True)["state"] == "COMPLETED"
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            denied = False
            for _ in range(100):
                try:
                    client.execute("true", wait=True)
                except PermissionDenied:
                    denied = True
                    break
                time.sleep(0.1)
            assert denied
    finally:
        assert gw.stop() == 0
