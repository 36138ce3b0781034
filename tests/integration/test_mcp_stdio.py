"""``mcp-gateway mcp-stdio``: the SDK's stdio client drives the bridge, which forwards to a
real gateway (in-process over HTTP, or a ``serve`` process over mTLS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client

from gateway.models import TaskState
from gateway.rest import GATEWAY
from tests.conftest import ROOT
from tests.integration.conftest import Api
from tests.integration.gateway_proc import GatewayProcess, free_port
from tests.integration.mcp_sdk import live_task, text, until_ended
from tests.integration.test_tls import Pki, _start

pytestmark = pytest.mark.integration


def bridge_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_GATEWAY")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def bridge(args: list[str], env: dict[str, str]) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "gateway.cli", "mcp-stdio", *args], env=env
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def test_bridge_forwards_tools_with_a_token_file(api: Api, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("alice-token\n")
    async with bridge(["--url", api.url("/"), "--token-file", str(token)], bridge_env()) as client:
        init_tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"shell_execute", "edit_file", "job_start"} <= set(init_tools)
        assert init_tools["read_text_file"].outputSchema is not None
        wrote = await client.call_tool("write_file", {"path": "b.txt", "content": "bridged"})
        assert wrote.isError is False, text(wrote)
        read = await client.call_tool("read_text_file", {"path": "b.txt"})
        assert read.structuredContent == {"content": "bridged"}
        ran = await client.call_tool("shell_execute", {"command": ["cat", "b.txt"]})
        assert ran.structuredContent is not None
        assert ran.structuredContent["stdout"] == "bridged"
        denied = await client.call_tool("shell_execute", {"command": ["sh", "-c", "id"]})
        assert denied.isError is True
        assert "PERMISSION_DENIED" in text(denied)
    home = api.server.app[GATEWAY].workspaces.path_for("alice")
    assert (home / "b.txt").read_text() == "bridged"
    events = [json.loads(line) for line in (api.state / "audit.log").read_text().splitlines()]
    transports = {e["transport"] for e in events if e["event"] == "policy.decision"}
    assert transports == {"mcp"}


async def test_bridge_token_from_environment_and_mcp_url(api: Api) -> None:
    """The token may come from MCP_GATEWAY_TOKEN and the URL may name /mcp itself."""
    env = bridge_env(MCP_GATEWAY_TOKEN="reader-token")
    async with bridge(["--url", api.url("/mcp")], env) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "write_file" not in names  # the readonly role's list
        result = await client.call_tool("list_allowed_directories", {})
        assert text(result).endswith("/workspace")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_gateway(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = _start(pki, tmp_path_factory.mktemp("gw"), "required")
    yield gw
    assert gw.stop() == 0


async def test_bridge_over_mtls_without_a_token(mtls_gateway: GatewayProcess, pki: Pki) -> None:
    """With --ca/--cert/--key the client certificate alone authenticates (CN alice)."""
    args = [
        "--url",
        mtls_gateway.url,
        "--ca",
        str(pki.ca),
        "--cert",
        str(pki.alice[0]),
        "--key",
        str(pki.alice[1]),
    ]
    async with bridge(args, bridge_env()) as client:
        result = await client.call_tool("shell_execute", {"command": ["echo", "over mtls"]})
        assert result.structuredContent is not None
        assert result.structuredContent["stdout"] == "over mtls\n"
    state = mtls_gateway.config_path.parent / "state"
    events = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    decisions = [e for e in events if e["event"] == "policy.decision" and e["transport"] == "mcp"]
    assert decisions
    assert {(e["subject"], e["auth"]) for e in decisions} == {("alice", "mtls")}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "mcp-stdio", *args],
        env=env or bridge_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: INVALID_ARGUMENT: no credentials"),
        (["--url", "ftp://x"], "url must be an http(s) URL"),
        (["--token-file", "/nonexistent/token"], "cannot read the token file"),
        (["--token-file", __file__], "the token file must hold one token"),
        (["--cert", "/nonexistent.pem"], "cannot load TLS files"),
        (["--key", "k.pem"], "--key needs --cert"),
    ],
)
def test_bad_options_are_one_clear_line(args: list[str], message: str) -> None:
    env = bridge_env() if not args else bridge_env(MCP_GATEWAY_TOKEN="t")
    done = run_cli(*args, env=env)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_unreachable_gateway_is_one_clear_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run_cli("--url", url, env=bridge_env(MCP_GATEWAY_TOKEN="t"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: UNAVAILABLE: {url}/mcp: ")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


async def test_rejected_token_is_one_clear_line(api: Api) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "mcp-stdio",
        "--url",
        api.url("/"),
        env=bridge_env(MCP_GATEWAY_TOKEN="wrong-token"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert stdout == b""
    assert stderr.decode().startswith("error: UNAUTHENTICATED: "), stderr
    assert b"401" in stderr
    assert b"Traceback" not in stderr


async def test_bridge_forwards_progress_and_cancellation(api: Api) -> None:
    """Progress comes back through the bridge; a local cancel kills the gateway's command."""
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    tasks = api.server.app[GATEWAY].tasks
    env = bridge_env(MCP_GATEWAY_TOKEN="alice-token")
    async with bridge(["--url", api.url("/")], env) as client:
        await client.call_tool("write_file", {"path": "slow.sh", "content": "sleep 2.5\necho b\n"})
        result = await client.call_tool(
            "shell_execute", {"command": ["sh", "slow.sh"]}, progress_callback=on_progress
        )
        assert result.structuredContent is not None
        assert result.structuredContent["stdout"] == "b\n"
        assert len(seen) >= 2

        local_id = client._request_id  # the id the next request gets
        call = asyncio.create_task(client.call_tool("shell_execute", {"command": ["sleep", "30"]}))
        task_id = await live_task(tasks, polls=200)
        await client.send_notification(
            types.ClientNotification(
                types.CancelledNotification(
                    params=types.CancelledNotificationParams(requestId=local_id)
                )
            )
        )
        await until_ended(tasks, task_id, polls=200, every=0.05)
        assert task_id not in tasks._live  # stopped by the notification alone
        call.cancel()
        with contextlib.suppress(BaseException):
            await call
    record = tasks.get(task_id)
    assert record.state == TaskState.CANCELLED
    assert record.ended_at is not None
    assert record.started_at is not None
    assert record.ended_at - record.started_at < 15
