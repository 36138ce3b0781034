"""Protocol revision 2026-07-28 on /mcp: stateless POSTs over raw HTTP against the real app."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.models import TaskState
from gateway.rest import GATEWAY
from tests.conftest import USERS
from tests.integration.conftest import Api
from tests.integration.mcp_sdk import live_task

pytestmark = pytest.mark.integration

VERSION = "2026-07-28"
META_VERSION = "io.modelcontextprotocol/protocolVersion"
META: dict[str, Any] = {
    META_VERSION: VERSION,
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


ALICE = {"Authorization": f"Bearer {USERS['alice'][0]}"}


def rpc(method: str, request_id: str | int | None = 1, **params: Any) -> dict[str, Any]:
    """A message of the revision: ``params._meta`` says version, client and capabilities."""
    message: dict[str, Any] = {
        "jsonrpc": "2.0",
        "method": method,
        "params": {**params, "_meta": {**META, **params.get("_meta", {})}},
    }
    if request_id is not None:
        message["id"] = request_id
    return message


def tool(name: str, request_id: str | int = 1, **arguments: Any) -> dict[str, Any]:
    return rpc("tools/call", request_id, name=name, arguments=arguments)


def headers_for(message: dict[str, Any], user: str = "alice") -> CIMultiDict[str]:
    """The headers a conforming client sends: they mirror the body."""
    headers = CIMultiDict(
        {
            "Authorization": f"Bearer {USERS[user][0]}",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": VERSION,
            "Mcp-Method": message["method"],
        }
    )
    if message["method"] == "tools/call":
        headers["Mcp-Name"] = message["params"]["name"]
    return headers


async def post(
    api: Api, message: dict[str, Any], headers: CIMultiDict[str] | None = None
) -> tuple[int, Any]:
    sent = headers_for(message) if headers is None else headers
    async with api.session.post(api.url("/mcp"), json=message, headers=sent) as resp:
        assert "Mcp-Session-Id" not in resp.headers
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, (await resp.read()).decode()


async def result_of(api: Api, message: dict[str, Any], user: str = "alice") -> Any:
    status, body = await post(api, message, headers_for(message, user))
    assert status == 200, body
    assert body["id"] == message["id"]
    assert body["result"]["resultType"] == "complete"
    return body["result"]


async def initialize(api: Api, protocol_version: str) -> tuple[str, dict[str, Any]]:
    """A session revision's raw initialize (no revision headers, no ``_meta``): its
    session id and answer."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": protocol_version,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    async with api.session.post(api.url("/mcp"), json=init, headers=ALICE) as resp:
        assert resp.status == 200
        return resp.headers["Mcp-Session-Id"], dict(await resp.json())


def audit(api: Api) -> list[dict[str, Any]]:
    lines = (api.state / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _text(result: dict[str, Any]) -> str:
    return "".join(c["text"] for c in result["content"] if c["type"] == "text")


# -- the revision works without a handshake ----------------------------------------------


async def test_server_discover(api: Api) -> None:
    """server/discover names the revisions, capabilities and server, with no session."""
    result = await result_of(api, rpc("server/discover"))
    assert result["supportedVersions"] == ["2026-07-28", "2025-11-25", "2025-06-18"]
    assert result["capabilities"]["tools"] == {"listChanged": False}
    info = result["_meta"]["io.modelcontextprotocol/serverInfo"]
    assert info["name"] == "mcp-security-gateway"
    assert isinstance(info["version"], str)
    assert "audited" in result["instructions"]


async def test_tools_list_follows_the_token_of_each_request(api: Api) -> None:
    """The subject comes from each request's bearer token: readonly sees no writing tool."""
    everything = {t["name"] for t in (await result_of(api, rpc("tools/list")))["tools"]}
    assert {"shell_execute", "write_file", "read_text_file"} <= everything
    reader = await result_of(api, rpc("tools/list"), user="reader")
    names = {t["name"] for t in reader["tools"]}
    assert "read_text_file" in names
    assert "write_file" not in names


async def test_shell_execute_echo(api: Api) -> None:
    result = await result_of(api, tool("shell_execute", command=["echo", "hello", "world"]))
    assert result["isError"] is False
    assert result["structuredContent"]["stdout"] == "hello world\n"
    assert result["structuredContent"]["exit_code"] == 0


async def test_file_tools_share_the_workspace_across_requests(api: Api) -> None:
    wrote = await result_of(api, tool("write_file", path="notes.txt", content="a\nb\n"))
    assert wrote["isError"] is False, _text(wrote)
    read = await result_of(api, tool("read_text_file", 2, path="/workspace/notes.txt"))
    assert _text(read) == "a\nb\n"


async def test_policy_denial_is_a_tool_error(api: Api) -> None:
    result = await result_of(api, tool("shell_execute", command=["sh", "-c", "id"]))
    assert result["isError"] is True
    assert "PERMISSION_DENIED" in _text(result)
    denials = [e for e in audit(api) if e["event"] == "policy.decision" and not e["allow"]]
    assert denials
    assert denials[-1]["subject"] == "alice"


async def test_ping(api: Api) -> None:
    assert await result_of(api, rpc("ping", 7)) == {"resultType": "complete"}


# -- headers must agree with the body; nothing runs otherwise -----------------------------

WRITE = tool("write_file", path="pwned.txt", content="x")


def _drop(name: str) -> CIMultiDict[str]:
    headers = headers_for(WRITE)
    del headers[name]
    return headers


def _set(name: str, value: str) -> CIMultiDict[str]:
    headers = headers_for(WRITE)
    headers[name] = value
    return headers


def _twice(name: str, value: str) -> CIMultiDict[str]:
    headers = headers_for(WRITE)
    headers.add(name, value)
    return headers


def _meta_version(value: str | None) -> dict[str, Any]:
    message = copy.deepcopy(WRITE)
    if value is None:
        del message["params"]["_meta"][META_VERSION]
    else:
        message["params"]["_meta"][META_VERSION] = value
    return message


MISMATCHES: list[Any] = [
    pytest.param(_set("Mcp-Method", "tools/list"), WRITE, "Mcp-Method", id="method-differs"),
    pytest.param(_drop("Mcp-Method"), WRITE, "Mcp-Method", id="method-missing"),
    pytest.param(_set("Mcp-Method", "Tools/Call"), WRITE, "Mcp-Method", id="method-case"),
    pytest.param(_twice("Mcp-Method", "tools/list"), WRITE, "Mcp-Method", id="method-twice"),
    pytest.param(_set("Mcp-Name", "read_text_file"), WRITE, "Mcp-Name", id="name-differs"),
    pytest.param(_drop("Mcp-Name"), WRITE, "Mcp-Name", id="name-missing"),
    pytest.param(_twice("Mcp-Name", "read_text_file"), WRITE, "Mcp-Name", id="name-twice"),
    pytest.param(
        _set("MCP-Protocol-Version", "2025-11-25"),
        WRITE,
        "MCP-Protocol-Version",
        id="version-header-differs",
    ),
    pytest.param(
        _drop("MCP-Protocol-Version"), WRITE, "MCP-Protocol-Version", id="version-header-missing"
    ),
    pytest.param(
        headers_for(WRITE), _meta_version("2025-11-25"), "MCP-Protocol-Version", id="meta-differs"
    ),
    pytest.param(headers_for(WRITE), _meta_version(None), META_VERSION, id="meta-missing"),
]


@pytest.mark.parametrize(("headers", "message", "field"), MISMATCHES)
async def test_header_body_mismatch_is_refused(
    api: Api, headers: CIMultiDict[str], message: dict[str, Any], field: str
) -> None:
    """-32020 with HTTP 400 naming the field; the write never happens (audit and workspace)."""
    status, body = await post(api, message, headers)
    assert status == 400
    assert body["id"] == 1
    assert body["error"]["code"] == -32020
    assert field in body["error"]["message"]
    events = audit(api)
    assert not [e for e in events if e["event"] == "policy.decision"]
    (rejected,) = [e for e in events if e["event"] == "request.rejected"]
    assert rejected["subject"] == "alice"
    assert field in rejected["field"]
    read = await result_of(api, tool("read_text_file", 2, path="pwned.txt"))
    assert read["isError"] is True
    assert "NOT_FOUND" in _text(read)


async def test_name_header_on_a_method_without_a_name_is_refused(api: Api) -> None:
    message = rpc("tools/list")
    headers = headers_for(message)
    headers["Mcp-Name"] = "shell_execute"
    status, body = await post(api, message, headers)
    assert (status, body["error"]["code"]) == (400, -32020)
    assert "Mcp-Name" in body["error"]["message"]


async def test_session_revision_headers_must_agree_when_sent(api: Api) -> None:
    """A session client that sends Mcp-Method is held to it too."""
    session, _ = await initialize(api, "2025-11-25")
    headers = CIMultiDict(
        {**ALICE, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    )
    headers["Mcp-Method"] = "tools/list"
    message = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": WRITE["params"]}
    async with api.session.post(api.url("/mcp"), json=message, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32020
    assert not [e for e in audit(api) if e["event"] == "policy.decision"]


# -- what the revision does not have ----------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "field"),
    [
        ("io.modelcontextprotocol/clientInfo", "clientInfo"),
        ("io.modelcontextprotocol/clientCapabilities", "clientCapabilities"),
    ],
)
async def test_client_meta_is_required(api: Api, drop: str, field: str) -> None:
    message = tool("shell_execute", command=["echo", "hi"])
    del message["params"]["_meta"][drop]
    status, body = await post(api, message)
    assert (status, body["error"]["code"]) == (400, -32602)
    assert field in body["error"]["message"]
    assert not [e for e in audit(api) if e["event"] == "policy.decision"]


async def test_initialize_is_refused_under_the_revision_header(api: Api) -> None:
    message = rpc("initialize", protocolVersion=VERSION, capabilities={}, clientInfo={})
    status, body = await post(api, message)
    assert (status, body["error"]["code"]) == (400, -32600)
    assert "server/discover" in body["error"]["message"]


async def test_initialize_asking_for_the_revision_gets_a_session_revision(api: Api) -> None:
    """Without the revision's header, initialize is the session handshake as before."""
    session, body = await initialize(api, VERSION)
    assert session
    assert body["result"]["protocolVersion"] == "2025-11-25"


async def test_session_header_is_refused(api: Api) -> None:
    """A Mcp-Session-Id sent with the revision is refused (400), not silently ignored."""
    session, _ = await initialize(api, "2025-11-25")
    message = tool("shell_execute", command=["echo", "hi"])
    headers = headers_for(message)
    headers["Mcp-Session-Id"] = session
    status, body = await post(api, message, headers)
    assert (status, body["error"]["code"]) == (400, -32600)
    assert "Mcp-Session-Id" in body["error"]["message"]
    assert not [e for e in audit(api) if e["event"] == "policy.decision"]


# -- streams, progress, cancellation -----------------------------------------------------


def _events(body: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")
    ]


async def test_sse_answer_when_preferred(api: Api) -> None:
    message = rpc("server/discover", 3)
    headers = headers_for(message)
    headers["Accept"] = "text/event-stream"
    async with api.session.post(api.url("/mcp"), json=message, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        (reply,) = _events((await resp.read()).decode())
    assert reply["id"] == 3
    assert reply["result"]["resultType"] == "complete"


async def test_progress_over_sse(api: Api) -> None:
    """A progressToken in _meta gets progress notifications, then the tagged result."""
    await result_of(api, tool("write_file", path="slow.sh", content="echo a\nsleep 2\necho b\n"))
    message = tool("shell_execute", 2, command=["sh", "slow.sh"], timeout=20)
    message["params"]["_meta"]["progressToken"] = "p1"
    status, body = await post(api, message)
    assert status == 200
    events = _events(body)
    progress = [e for e in events if e.get("method") == "notifications/progress"]
    assert progress
    assert {e["params"]["progressToken"] for e in progress} == {"p1"}
    assert events[-1]["result"]["resultType"] == "complete"
    assert events[-1]["result"]["structuredContent"]["stdout"] == "a\nb\n"


async def test_cancelled_notification_is_scoped_to_the_subject(api: Api) -> None:
    """notifications/cancelled of another subject is ignored; the owner's kills the command."""
    tasks = api.server.app[GATEWAY].tasks
    call = tool("shell_execute", "long-1", command=["sleep", "30"])
    running = asyncio.create_task(post(api, call))
    task_id = await live_task(tasks)
    cancel = rpc("notifications/cancelled", None, requestId="long-1")
    assert await post(api, cancel, headers_for(cancel, "bob")) == (202, "")
    await asyncio.sleep(0.3)
    assert task_id in tasks._live
    assert await post(api, cancel) == (202, "")
    status, body = await asyncio.wait_for(running, 15)
    assert (status, body["error"]["code"]) == (200, -32800)
    record = tasks.get(task_id)
    assert record.state == TaskState.CANCELLED
    assert record.reason == "cancelled by alice"
