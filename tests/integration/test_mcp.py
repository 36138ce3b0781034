"""The MCP endpoint (/mcp): the official SDK client end to end, raw JSON-RPC for bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from gateway.app import build_app
from gateway.config import hash_token
from gateway.models import TaskState
from gateway.rest import GATEWAY
from tests.conftest import POLICIES, make_config
from tests.integration.conftest import Api
from tests.integration.mcp_sdk import connect, live_task, text, until_ended

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer alice-token"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


# -- the SDK client ----------------------------------------------------------------


async def test_initialize_and_list_tools(api: Api) -> None:
    async with (
        create_mcp_http_client(headers=AUTH) as http,
        streamable_http_client(api.url("/mcp"), http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.serverInfo.name == "mcp-security-gateway"
        assert init.protocolVersion == "2025-11-25"
        assert init.capabilities.tools is not None
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) >= {
            "shell_execute",
            "read_text_file",
            "write_file",
            "list_directory",
            "create_directory",
            "get_file_info",
            "list_allowed_directories",
        }
        assert tools["read_text_file"].annotations is not None
        assert tools["read_text_file"].annotations.readOnlyHint is True
        assert tools["shell_execute"].inputSchema["required"] == ["command"]
        await session.send_ping()


async def test_shell_execute_echo(api: Api) -> None:
    async with connect(api) as client:
        result = await client.call_tool("shell_execute", {"command": ["echo", "hello", "world"]})
        assert result.isError is False
        assert result.structuredContent is not None
        assert result.structuredContent["stdout"] == "hello world\n"
        assert result.structuredContent["exit_code"] == 0
        assert result.structuredContent["state"] == "COMPLETED"
        assert "hello world" in text(result)


async def test_shell_execute_stdin_and_directory(api: Api) -> None:
    async with connect(api) as client:
        await client.call_tool("create_directory", {"path": "sub/dir"})
        result = await client.call_tool(
            "shell_execute", {"command": ["pwd"], "directory": "/workspace/sub/dir"}
        )
        assert result.structuredContent is not None
        assert result.structuredContent["stdout"] == "/workspace/sub/dir\n"
        result = await client.call_tool("shell_execute", {"command": ["cat"], "stdin": "piped"})
        assert result.structuredContent is not None
        assert result.structuredContent["stdout"] == "piped"


async def test_shell_execute_policy_deny_is_tool_error(api: Api) -> None:
    async with connect(api) as client:
        result = await client.call_tool("shell_execute", {"command": ["sh", "-c", "id"]})
        assert result.isError is True
        message = text(result)
        assert "PERMISSION_DENIED" in message
        assert "reason:" in message


async def test_shell_execute_failure_is_tool_error(api: Api) -> None:
    async with connect(api) as client:
        result = await client.call_tool("shell_execute", {"command": ["false"]})
        assert result.isError is True
        assert result.structuredContent is not None
        assert result.structuredContent["exit_code"] == 1


async def test_file_round_trip_and_listing(api: Api) -> None:
    async with connect(api) as client:
        wrote = await client.call_tool("write_file", {"path": "notes.txt", "content": "a\nb\nc\n"})
        assert wrote.isError is False, text(wrote)
        read = await client.call_tool("read_text_file", {"path": "/workspace/notes.txt"})
        assert text(read) == "a\nb\nc\n"
        head = await client.call_tool("read_text_file", {"path": "notes.txt", "head": 1})
        assert text(head) == "a\n"
        tail = await client.call_tool("read_text_file", {"path": "notes.txt", "tail": 2})
        assert text(tail) == "b\nc\n"
        made = await client.call_tool("create_directory", {"path": "src"})
        assert made.isError is False, text(made)
        listing = text(await client.call_tool("list_directory", {"path": "."})).splitlines()
        assert "[FILE] notes.txt" in listing
        assert "[DIR] src" in listing
        info = await client.call_tool("get_file_info", {"path": "notes.txt"})
        assert info.structuredContent is not None
        assert info.structuredContent["size"] == 6
        assert info.structuredContent["type"] == "file"
        allowed = await client.call_tool("list_allowed_directories", {})
        assert "/workspace" in text(allowed)


async def test_file_errors_are_tool_errors(api: Api) -> None:
    async with connect(api) as client:
        missing = await client.call_tool("read_text_file", {"path": "nope.txt"})
        assert missing.isError is True
        assert "NOT_FOUND" in text(missing)
        escape = await client.call_tool("read_text_file", {"path": "../etc/passwd"})
        assert escape.isError is True
        assert "'..'" in text(escape)


# -- raw JSON-RPC ------------------------------------------------------------------


async def _session(api: Api) -> dict[str, str]:
    async with api.session.post(api.url("/mcp"), json=INIT, headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert body["result"]["protocolVersion"] == "2025-06-18"
        return {
            **AUTH,
            "Mcp-Session-Id": resp.headers["Mcp-Session-Id"],
            "MCP-Protocol-Version": "2025-06-18",
        }


async def _post(api: Api, headers: dict[str, str], **kw: Any) -> tuple[int, Any]:
    async with api.session.post(api.url("/mcp"), headers=headers, **kw) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.read()


async def test_raw_lifecycle(api: Api) -> None:
    headers = await _session(api)
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert await _post(api, headers, json=note) == (202, b"")
    status, body = await _post(api, headers, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
    assert (status, body) == (200, {"jsonrpc": "2.0", "id": 2, "result": {}})
    async with api.session.delete(api.url("/mcp"), headers=headers) as resp:
        assert resp.status == 204
    status, body = await _post(api, headers, json={"jsonrpc": "2.0", "id": 3, "method": "ping"})
    assert status == 404


async def test_session_is_bound_to_subject(api: Api) -> None:
    headers = await _session(api)
    bob = {**headers, "Authorization": "Bearer bob-token"}
    status, _ = await _post(api, bob, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
    assert status == 404


async def test_bad_protocol_version_header(api: Api) -> None:
    headers = {**await _session(api), "MCP-Protocol-Version": "1999-01-01"}
    status, body = await _post(api, headers, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_parse_error(api: Api) -> None:
    status, body = await _post(api, await _session(api), data=b"{not json")
    assert status == 400
    assert body["error"]["code"] == -32700
    assert body["id"] is None


async def test_wrong_jsonrpc_version(api: Api) -> None:
    status, body = await _post(
        api, await _session(api), json={"jsonrpc": "1.0", "id": 2, "method": "ping"}
    )
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_batch_rejected(api: Api) -> None:
    batch = [{"jsonrpc": "2.0", "id": 2, "method": "ping"}]
    status, body = await _post(api, await _session(api), json=batch)
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_unknown_method(api: Api) -> None:
    status, body = await _post(
        api, await _session(api), json={"jsonrpc": "2.0", "id": 2, "method": "nope/nothing"}
    )
    assert status == 200
    assert body["error"]["code"] == -32601
    assert body["id"] == 2


async def test_unknown_tool_and_bad_arguments(api: Api) -> None:
    headers = await _session(api)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
    status, body = await _post(
        api, headers, json={**call, "params": {"name": "rm_rf", "arguments": {}}}
    )
    assert (status, body["error"]["code"]) == (200, -32602)
    assert "rm_rf" in body["error"]["message"]
    bad: list[dict[str, Any]] = [
        {"command": []},
        {"command": "echo hi"},
        {"command": ["a"], "x": 1},
    ]
    for arguments in bad:
        status, body = await _post(
            api, headers, json={**call, "params": {"name": "shell_execute", "arguments": arguments}}
        )
        assert (status, body["error"]["code"]) == (200, -32602), arguments


async def test_missing_token_is_401(api: Api) -> None:
    status, body = await _post(api, {}, json=INIT)
    assert status == 401
    assert body["error"]["code"] == "UNAUTHENTICATED"


async def test_foreign_origin_is_403(api: Api) -> None:
    status, _ = await _post(api, {**AUTH, "Origin": "https://evil.example"}, json=INIT)
    assert status == 403
    status, _ = await _post(api, {**AUTH, "Origin": "http://localhost:5173"}, json=INIT)
    assert status == 200
    status, _ = await _post(api, {**AUTH, "Origin": "http://[::1]:8080"}, json=INIT)
    assert status == 200


async def test_missing_session_header(api: Api) -> None:
    status, body = await _post(api, AUTH, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_get_stream_not_offered(api: Api) -> None:
    async with api.session.get(api.url("/mcp"), headers=await _session(api)) as resp:
        assert resp.status == 405


async def test_client_disconnect_cancels_the_command(api: Api) -> None:
    headers = await _session(api)
    tasks = api.server.app[GATEWAY].tasks
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "shell_execute", "arguments": {"command": ["sleep", "30"]}},
    }
    post = asyncio.create_task(_post(api, headers, json=call))
    task_id = await live_task(tasks)
    post.cancel()  # the client goes away: aiohttp closes the connection
    with contextlib.suppress(asyncio.CancelledError):
        await post
    await until_ended(tasks, task_id)
    record = tasks.get(task_id)
    assert record.state == TaskState.CANCELLED
    assert record.ended_at is not None
    assert record.started_at is not None
    assert record.ended_at - record.started_at < 15


# -- the tool list follows the policy ---------------------------------------------------

WRITE_TOOLS = {"write_file", "edit_file", "create_directory", "move_file"}
COMMAND_TOOLS = {"shell_execute", "job_start", "job_output", "job_terminate", "job_list"}


async def _tool_names(api: Api, token: str) -> set[str]:
    async with connect(api, token=token) as session:
        return {t.name for t in (await session.list_tools()).tools}


async def test_tool_list_follows_the_policy(api: Api) -> None:
    """readonly sees no writing tool; agent (writes under src/, deletes under out/) sees them."""
    everything = await _tool_names(api, "admin-token")
    assert everything >= WRITE_TOOLS | COMMAND_TOOLS | {"read_text_file", "directory_tree"}
    reader = await _tool_names(api, "reader-token")
    assert not reader & WRITE_TOOLS
    assert reader == everything - WRITE_TOOLS
    assert await _tool_names(api, "agent-token") == everything
    probes = [
        e
        for e in (json.loads(line) for line in (api.state / "audit.log").read_text().splitlines())
        if e["event"] == "policy.decision"
        and e["subject"] == "reader"
        and e["input"].get("file", {}).get("probe")
    ]
    assert {(e["action"], e["allow"]) for e in probes} == {
        ("file.read", True),
        ("file.list", True),
        ("file.write", False),
        ("file.delete", False),
    }
    assert all(e["visibility"] is True for e in probes)
    # Listing tools is not a denial spike: visibility questions are not counted.
    counter = api.server.app[GATEWAY].metrics.policy_decisions
    assert counter.labels(action="file.write", result="deny")._value.get() == 0


async def test_tool_list_of_a_role_without_commands(state_dir: Path, tmp_path: Path) -> None:
    """A role granted no program and no tasks does not see the command and job tools."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    data = json.loads((policies / "data.json").read_text())
    data["gateway"]["roles"]["viewer"] = {
        **data["gateway"]["roles"]["readonly"],
        "commands": [],
        "tasks": {},
    }
    (policies / "data.json").write_text(json.dumps(data))
    config = make_config(
        state_dir,
        policy={"dir": str(policies)},
        auth={"tokens": [{"subject": "carol", "roles": ["viewer"], "sha256": hash_token("c")}]},
    )
    server = TestServer(build_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            names = await _tool_names(Api(server, http, state_dir), "c")
            async with (
                create_mcp_http_client(headers={"Authorization": "Bearer c"}) as client,
                streamable_http_client(str(server.make_url("/mcp")), http_client=client) as (
                    read,
                    write,
                    _,
                ),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                # Hidden is not the enforcement: a direct call is still decided.
                result = await session.call_tool("shell_execute", {"command": ["true"]})
                assert result.isError is True
                assert "PERMISSION_DENIED" in text(result)
    finally:
        await server.close()
    assert not names & (COMMAND_TOOLS | WRITE_TOOLS)
    assert {"read_text_file", "list_directory", "search_files"} <= names


# -- streaming answers, progress, cancellation -----------------------------------------


async def test_progress_notifications_for_a_long_command(api: Api) -> None:
    """With a progressToken the SDK client gets an SSE answer carrying progress."""
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(api) as client:
        await client.call_tool(
            "write_file", {"path": "slow.sh", "content": "echo a\nsleep 2.5\necho b\n"}
        )
        result = await client.call_tool(
            "shell_execute",
            {"command": ["sh", "slow.sh"], "timeout": 20},
            progress_callback=on_progress,
        )
    assert result.structuredContent is not None
    assert result.structuredContent["stdout"] == "a\nb\n"
    assert len(seen) >= 2
    values = [p for p, _, _ in seen]
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    assert {t for _, t, _ in seen} == {20.0}
    assert any(m is not None and m.startswith("RUNNING, ") for _, _, m in seen)


async def test_sse_answer_when_preferred(api: Api) -> None:
    headers = await _session(api)
    ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
    sse_only = {**headers, "Accept": "text/event-stream"}
    async with api.session.post(api.url("/mcp"), headers=sse_only, json=ping) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        body = (await resp.read()).decode()
    assert body == 'event: message\ndata: {"jsonrpc":"2.0","id":5,"result":{}}\n\n'
    both = {**headers, "Accept": "application/json, text/event-stream"}
    status, answer = await _post(api, both, json=ping)
    assert (status, answer) == (200, {"jsonrpc": "2.0", "id": 5, "result": {}})
    json_first = {**headers, "Accept": "text/event-stream;q=0.5, application/json"}
    traced = {**ping, "params": {"_meta": {"progressToken": "p"}}}
    status, answer = await _post(api, json_first, json=traced)
    assert status == 200
    assert answer["id"] == 5


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
async def test_cancelled_notification_kills_the_command(api: Api, accept: str) -> None:
    """notifications/cancelled stops the request and kills its sandboxed process tree."""
    headers = {**await _session(api), "Accept": accept}
    tasks = api.server.app[GATEWAY].tasks
    call = {
        "jsonrpc": "2.0",
        "id": "long-1",
        "method": "tools/call",
        "params": {"name": "shell_execute", "arguments": {"command": ["sleep", "30"]}},
    }
    post = asyncio.create_task(_post(api, headers, json=call))
    task_id = await live_task(tasks)
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": "long-1", "reason": "user pressed stop"},
    }
    assert await _post(api, headers, json=cancel) == (202, b"")
    status, body = await asyncio.wait_for(post, 15)
    assert status == 200
    if accept == "text/event-stream":
        body = json.loads(body.decode().split("data: ", 1)[1])
    assert body["error"]["code"] == -32800
    record = tasks.get(task_id)
    assert record.state == TaskState.CANCELLED
    assert record.reason == "cancelled by alice"
    assert record.ended_at is not None
    assert record.started_at is not None
    assert record.ended_at - record.started_at < 15
    events = [json.loads(line) for line in (api.state / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in events if e.get("task_id") == task_id][-1] == "task.cancelled"


async def test_cancelling_an_unknown_request_is_harmless(api: Api) -> None:
    headers = await _session(api)
    for params in ({"requestId": 99}, {"requestId": None}, {}):
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}
        assert await _post(api, headers, json=note) == (202, b"")
    status, _ = await _post(api, headers, json={"jsonrpc": "2.0", "id": 2, "method": "ping"})
    assert status == 200
