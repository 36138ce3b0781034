"""Model Context Protocol endpoint: Streamable HTTP at ``/mcp`` on the REST app.

JSON-RPC 2.0 over POST, answered with ``application/json`` (no SSE stream),
protocol revisions 2025-06-18 and 2025-11-25.  ``initialize`` issues an
``Mcp-Session-Id`` bound to the authenticated subject; DELETE ends it.
Authentication is the REST bearer middleware; every tool goes through
:class:`~gateway.service.Gateway`, so policy, audit and sandbox apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from gateway import __version__
from gateway.errors import InvalidArgument, McpError
from gateway.models import Subject, TaskState
from gateway.rest import GATEWAY, SUBJECT
from gateway.schema import parse_execute, pydantic_error
from gateway.service import Gateway, RequestContext
from gateway.store import TaskRecord
from gateway.tracing import extract_meta
from gateway.workspace import ROOT, normalize_path

log = structlog.get_logger("gateway.mcp")

MCP_PATH = "/mcp"
SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18")
LATEST_VERSION = SUPPORTED_VERSIONS[0]
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
WORKSPACE = "/workspace"
MAX_SESSIONS = 10_000
DISCONNECT_POLL_S = 0.25

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(slots=True)
class _Session:
    subject: str
    version: str
    created: float


class McpSessions:
    """Live MCP sessions of this process, keyed by ``Mcp-Session-Id``."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._limit = limit
        self._sessions: dict[str, _Session] = {}

    def open(self, subject: str, version: str) -> str:
        if len(self._sessions) >= self._limit:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
            del self._sessions[oldest]
        session_id = secrets.token_hex(16)
        self._sessions[session_id] = _Session(subject, version, time.monotonic())
        return session_id

    def get(self, session_id: str, subject: str) -> _Session | None:
        """The session, only for the subject it was issued to."""
        session = self._sessions.get(session_id)
        return session if session is not None and session.subject == subject else None

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


SESSIONS = web.AppKey("mcp_sessions", McpSessions)


class _RpcError(Exception):
    def __init__(self, code: int, message: str, status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# -- tool arguments ----------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True)


class ShellExecuteArgs(BaseModel):
    model_config = _STRICT
    command: Annotated[
        list[StrictStr],
        Field(min_length=1, description="argv: program name then its arguments (no shell)"),
    ]
    directory: Annotated[
        StrictStr | None, Field(description="working directory relative to /workspace")
    ] = None
    stdin: Annotated[StrictStr | None, Field(description="text fed to standard input")] = None
    timeout: Annotated[float | None, Field(gt=0, description="seconds before the kill")] = None


class PathArgs(BaseModel):
    model_config = _STRICT
    path: Annotated[StrictStr, Field(description="path relative to /workspace")]


class ReadTextFileArgs(PathArgs):
    head: Annotated[StrictInt | None, Field(ge=0, description="only the first N lines")] = None
    tail: Annotated[StrictInt | None, Field(ge=0, description="only the last N lines")] = None


class WriteFileArgs(PathArgs):
    content: StrictStr


class NoArgs(BaseModel):
    model_config = _STRICT


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    schema.setdefault("properties", {})
    return schema


_EXEC_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "exit_code": {"type": ["integer", "null"]},
        "duration_s": {"type": ["number", "null"]},
        "stdout_truncated": {"type": "boolean"},
        "stderr_truncated": {"type": "boolean"},
        "state": {"type": "string"},
    },
    "required": ["stdout", "stderr", "exit_code", "state"],
}

_INFO_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "type": {"type": "string", "enum": ["file", "dir", "symlink", "other"]},
        "size": {"type": "integer"},
        "mode": {"type": "string"},
        "mtime": {"type": "number"},
    },
    "required": ["path", "type", "size", "mode", "mtime"],
}


def _hints(*, read_only: bool, destructive: bool, idempotent: bool) -> dict[str, bool]:
    return {
        "readOnlyHint": read_only,
        "destructiveHint": destructive,
        "idempotentHint": idempotent,
        "openWorldHint": False,
    }


# -- tool implementations -------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    request: web.Request
    gateway: Gateway
    subject: Subject
    ctx: RequestContext


_Result = dict[str, Any]


def _text(text: str, *, error: bool = False, structured: dict[str, Any] | None = None) -> _Result:
    result: _Result = {"content": [{"type": "text", "text": text}], "isError": error}
    if structured is not None:
        result["structuredContent"] = structured
    return result


def _ws_path(path: str) -> str:
    """Accept ``/workspace/x`` as well as ``x``; return the workspace-relative path."""
    if path == WORKSPACE:
        return ""
    return path.removeprefix(WORKSPACE + "/")


async def _wait_watching(call: _Call, record: TaskRecord) -> TaskRecord:
    """Wait for the task; cancel it if the HTTP client goes away first."""
    waiter = asyncio.ensure_future(call.gateway.tasks.wait(record.id))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            transport = call.request.transport
            if transport is None or transport.is_closing():
                log.info("mcp client went away; cancelling", task_id=record.id)
                await _cancel_quietly(call, record.id)
                return await waiter
    except asyncio.CancelledError:
        await asyncio.shield(_cancel_quietly(call, record.id))
        raise
    finally:
        if not waiter.done():
            waiter.cancel()


async def _cancel_quietly(call: _Call, task_id: str) -> None:
    with contextlib.suppress(McpError):
        await call.gateway.cancel(call.subject, task_id, call.ctx)


async def shell_execute(call: _Call, args: ShellExecuteArgs) -> _Result:
    cwd = WORKSPACE
    if args.directory is not None:
        rel = normalize_path(_ws_path(args.directory), field="directory")
        cwd = WORKSPACE if rel == ROOT else f"{WORKSPACE}/{rel}"
    body: dict[str, Any] = {
        "command": args.command[0],
        "args": args.command[1:],
        "cwd": cwd,
        "wait": True,
    }
    if args.stdin is not None:
        body["stdin"] = args.stdin
    if args.timeout is not None:
        body["timeout"] = args.timeout
    config = call.gateway.config
    try:
        spec, _ = parse_execute(body, tasks=config.tasks, limits=config.sandbox.limits)
    except InvalidArgument as exc:
        with contextlib.suppress(McpError):
            await call.gateway.reject(call.subject, call.ctx, exc)
        raise
    record = await call.gateway.execute(call.subject, spec, call.ctx)
    record = await _wait_watching(call, record)
    summary = record.summary()
    out = record.stdout.decode("utf-8", errors="replace")
    err = record.stderr.decode("utf-8", errors="replace")
    structured = {
        "stdout": out,
        "stderr": err,
        "exit_code": record.exit_code,
        "duration_s": summary["duration_s"],
        "stdout_truncated": record.stdout_truncated,
        "stderr_truncated": record.stderr_truncated,
        "state": str(record.state),
    }
    failed = record.state != TaskState.COMPLETED or record.exit_code != 0
    lines = [f"state: {record.state}, exit code: {record.exit_code}"]
    if record.reason:
        lines.append(f"reason: {record.reason}")
    if out:
        lines.append(f"stdout:\n{out}")
    if err:
        lines.append(f"stderr:\n{err}")
    return _text("\n".join(lines), error=failed, structured=structured)


async def read_text_file(call: _Call, args: ReadTextFileArgs) -> _Result:
    if args.head is not None and args.tail is not None:
        raise InvalidArgument("give either head or tail, not both", field="head")
    path = _ws_path(args.path)
    data = await call.gateway.read_file(call.subject, path, call.ctx)
    text = data.decode("utf-8", errors="replace")
    if args.head is not None:
        text = "".join(text.splitlines(keepends=True)[: args.head])
    elif args.tail is not None:
        text = "".join(text.splitlines(keepends=True)[-args.tail :]) if args.tail else ""
    return _text(text, structured={"content": text})


async def write_file(call: _Call, args: WriteFileArgs) -> _Result:
    path = _ws_path(args.path)
    written = await call.gateway.write_file(call.subject, path, args.content.encode(), call.ctx)
    return _text(f"Successfully wrote {written} bytes to {args.path}")


async def list_directory(call: _Call, args: PathArgs) -> _Result:
    entries = await call.gateway.list_files(call.subject, _ws_path(args.path), call.ctx)
    lines = [f"[{'DIR' if e.type == 'dir' else 'FILE'}] {e.name}" for e in entries]
    if entries.truncated:
        lines.append("(listing truncated)")
    return _text("\n".join(lines))


async def create_directory(call: _Call, args: PathArgs) -> _Result:
    await call.gateway.make_directory(call.subject, _ws_path(args.path), call.ctx)
    return _text(f"Successfully created directory {args.path}")


async def get_file_info(call: _Call, args: PathArgs) -> _Result:
    entry = await call.gateway.stat_file(call.subject, _ws_path(args.path), call.ctx)
    info = {
        "path": args.path,
        "type": entry.type,
        "size": entry.size,
        "mode": f"{entry.mode:o}",
        "mtime": entry.mtime,
    }
    return _text("\n".join(f"{k}: {v}" for k, v in info.items()), structured=info)


async def list_allowed_directories(call: _Call, args: NoArgs) -> _Result:
    return _text(f"Allowed directories:\n{WORKSPACE}")


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    args: type[BaseModel]
    run: Callable[[_Call, Any], Awaitable[_Result]]
    annotations: dict[str, bool]
    output_schema: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "inputSchema": _schema(self.args),
            "annotations": self.annotations,
        }
        if self.output_schema is not None:
            view["outputSchema"] = self.output_schema
        return view


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool(
            "shell_execute",
            "Run a command (argv, no shell) in the caller's sandboxed workspace and wait "
            "for it; policy decides which programs are allowed.",
            ShellExecuteArgs,
            shell_execute,
            _hints(read_only=False, destructive=True, idempotent=False),
            _EXEC_OUTPUT,
        ),
        Tool(
            "read_text_file",
            "Read a UTF-8 text file of the workspace; head/tail limit it to N lines.",
            ReadTextFileArgs,
            read_text_file,
            _hints(read_only=True, destructive=False, idempotent=True),
            {"type": "object", "properties": {"content": {"type": "string"}}},
        ),
        Tool(
            "write_file",
            "Create or replace a file of the workspace (atomic); the parent must exist.",
            WriteFileArgs,
            write_file,
            _hints(read_only=False, destructive=True, idempotent=True),
        ),
        Tool(
            "list_directory",
            "List a workspace directory as lines '[FILE] name' and '[DIR] name'.",
            PathArgs,
            list_directory,
            _hints(read_only=True, destructive=False, idempotent=True),
        ),
        Tool(
            "create_directory",
            "Create a workspace directory and any missing parents (no error if it exists).",
            PathArgs,
            create_directory,
            _hints(read_only=False, destructive=False, idempotent=True),
        ),
        Tool(
            "get_file_info",
            "Type, size, permission bits and modification time of a workspace path.",
            PathArgs,
            get_file_info,
            _hints(read_only=True, destructive=False, idempotent=True),
            _INFO_OUTPUT,
        ),
        Tool(
            "list_allowed_directories",
            "The directories this server may access (the workspace, /workspace).",
            NoArgs,
            list_allowed_directories,
            _hints(read_only=True, destructive=False, idempotent=True),
        ),
    )
}


def _tool_error(exc: McpError) -> _Result:
    lines = [f"{exc.code}: {exc.message}"]
    lines += [f"reason: {r}" for r in exc.reasons]
    return _text("\n".join(lines), error=True)


async def _call_tool(call: _Call, params: dict[str, Any]) -> _Result:
    name = params.get("name")
    tool = TOOLS.get(name) if isinstance(name, str) else None
    if tool is None:
        raise _RpcError(INVALID_PARAMS, f"unknown tool: {name!r}")
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise _RpcError(INVALID_PARAMS, "arguments: must be an object")
    try:
        parsed = tool.args.model_validate(arguments)
    except ValidationError as exc:
        raise _RpcError(INVALID_PARAMS, f"{name}: {pydantic_error(exc).message}") from None
    try:
        return await tool.run(call, parsed)
    except McpError as exc:
        return _tool_error(exc)


# -- transport ------------------------------------------------------------------------


def _origin_allowed(origin: str | None) -> bool:
    if origin is None:
        return True
    try:
        parts = urlsplit(origin)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and host in _LOOPBACK_HOSTS


def _rpc_error(request_id: Any, code: int, message: str, status: int = 200) -> web.Response:
    return web.json_response(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}},
        status=status,
    )


def _subject(request: web.Request) -> Subject:
    return request[SUBJECT]


async def mcp_handler(request: web.Request) -> web.StreamResponse:
    if not _origin_allowed(request.headers.get("Origin")):
        return _rpc_error(None, INVALID_REQUEST, "origin not allowed", status=403)
    if request.method == "POST":
        return await _post(request)
    if request.method == "DELETE":
        session_id = request.headers.get(SESSION_HEADER, "")
        sessions = request.app[SESSIONS]
        if sessions.get(session_id, _subject(request).id) is None:
            return _rpc_error(None, INVALID_REQUEST, "unknown session", status=404)
        sessions.close(session_id)
        return web.Response(status=204)
    # No server-initiated SSE stream (GET) in this slice.
    return web.Response(status=405, headers={"Allow": "POST, DELETE"})


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


async def _post(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _rpc_error(None, PARSE_ERROR, f"parse error: {exc}", status=400)
    if isinstance(message, list):
        return _rpc_error(None, INVALID_REQUEST, "batch requests are not supported", status=400)
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _rpc_error(None, INVALID_REQUEST, 'jsonrpc must be "2.0"', status=400)
    request_id = message.get("id")
    method = message.get("method")
    if "id" in message and not _is_id(request_id):
        return _rpc_error(None, INVALID_REQUEST, "id must be a string or integer", status=400)
    if method is not None and not isinstance(method, str):
        return _rpc_error(request_id, INVALID_REQUEST, "method must be a string", status=400)
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return _rpc_error(request_id, INVALID_PARAMS, "params must be an object")

    subject = _subject(request)
    sessions = request.app[SESSIONS]
    if method == "initialize" and request_id is not None:
        requested = params.get("protocolVersion")
        version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        new_id = sessions.open(subject.id, version)
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "mcp-security-gateway", "version": __version__},
            "instructions": "Commands and files run in your sandboxed workspace /workspace; "
            "every call is checked by policy and audited.",
        }
        return web.json_response(
            {"jsonrpc": "2.0", "id": request_id, "result": result},
            headers={SESSION_HEADER: new_id},
        )

    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None:
        return _rpc_error(request_id, INVALID_REQUEST, f"missing {SESSION_HEADER}", status=400)
    if sessions.get(session_id, subject.id) is None:
        return _rpc_error(request_id, INVALID_REQUEST, "unknown session", status=404)
    header = request.headers.get(VERSION_HEADER)
    if header is not None and header not in SUPPORTED_VERSIONS:
        return _rpc_error(
            request_id, INVALID_REQUEST, f"unsupported protocol version {header!r}", status=400
        )
    if method is None or request_id is None:
        # A notification (notifications/initialized, cancelled...) or a response.
        return web.Response(status=202)

    gateway = request.app[GATEWAY]
    call = _Call(
        request,
        gateway,
        subject,
        RequestContext(transport="mcp", source=request.remote or ""),
    )
    # params._meta.traceparent (the MCP convention) continues the agent's
    # trace; without it the span is a child of the HTTP request's span.
    http_span = trace.get_current_span()
    parent = extract_meta(params.get("_meta"))
    tool = params.get("name") if method == "tools/call" else None
    attributes: dict[str, str] = {"mcp.method.name": method, "mcp.transport": "mcp"}
    if isinstance(tool, str):
        attributes["gen_ai.tool.name"] = tool
    with gateway.tracing.span(
        f"{method} {tool}" if isinstance(tool, str) else method,
        kind=SpanKind.SERVER,
        parent=parent,
        attributes=attributes,
    ) as span:
        if parent is not None and http_span.get_span_context().is_valid:
            span.add_link(http_span.get_span_context())
        try:
            result = await _dispatch(call, method, params)
        except _RpcError as exc:
            span.set_attribute("rpc.jsonrpc.error_code", exc.code)
            return _rpc_error(request_id, exc.code, exc.message, status=exc.status)
        if result.get("isError") is True:
            span.set_attribute("mcp.tool.is_error", True)
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": result})


async def _dispatch(call: _Call, method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": [t.describe() for t in TOOLS.values()]}
    if method == "tools/call":
        return await _call_tool(call, params)
    raise _RpcError(METHOD_NOT_FOUND, f"method not found: {method}")


def add_mcp_routes(app: web.Application) -> None:
    """Register ``/mcp`` (and its session table) on the REST application."""
    app[SESSIONS] = McpSessions()
    app.router.add_route("*", MCP_PATH, mcp_handler, name="mcp")
