"""Model Context Protocol endpoint: Streamable HTTP at ``/mcp`` on the REST app.

JSON-RPC 2.0 over POST, answered with ``application/json`` (no SSE stream),
protocol revisions 2025-06-18 and 2025-11-25.  ``initialize`` issues an
``Mcp-Session-Id`` bound to the authenticated subject; DELETE ends it.
Authentication is the REST bearer middleware; every tool goes through
:class:`~gateway.service.Gateway`, so policy, audit and sandbox apply unchanged.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from gateway import __version__
from gateway.errors import InvalidArgument, McpError
from gateway.mcp_commands import COMMAND_TOOLS
from gateway.mcp_files import FILE_TOOLS
from gateway.mcp_tool import Result, Tool, ToolCall, tool_error
from gateway.models import Subject
from gateway.rest import GATEWAY, SUBJECT
from gateway.schema import pydantic_error
from gateway.service import RequestContext
from gateway.tracing import extract_meta

log = structlog.get_logger("gateway.mcp")

MCP_PATH = "/mcp"
SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18")
LATEST_VERSION = SUPPORTED_VERSIONS[0]
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
MAX_SESSIONS = 10_000

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

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


def _tools() -> dict[str, Tool]:
    tools = (*COMMAND_TOOLS, *FILE_TOOLS)
    return {t.name: t for t in tools}


TOOLS: dict[str, Tool] = _tools()


async def _visible_tools(call: ToolCall) -> list[dict[str, Any]]:
    """The tools whose every policy action the subject may perform (one probe per action).

    Hiding a tool is a convenience for the agent, not the enforcement: each
    call is decided on its own arguments anyway.
    """
    actions = sorted({a for tool in TOOLS.values() for a in tool.actions})
    allowed = set()
    for action in actions:
        if await call.gateway.may(action, call.subject, call.ctx):
            allowed.add(action)
    return [t.describe() for t in TOOLS.values() if allowed.issuperset(t.actions)]


async def _call_tool(call: ToolCall, params: dict[str, Any]) -> Result:
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
    except InvalidArgument as exc:
        # Refused before (or instead of) a decision: the refusal is audited too.
        with contextlib.suppress(McpError):
            await call.gateway.reject(call.subject, call.ctx, exc)
        return tool_error(exc)
    except McpError as exc:
        return tool_error(exc)


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
    call = ToolCall(
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


async def _dispatch(call: ToolCall, method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "ping":
        return {}
    if method == "tools/list":
        try:
            return {"tools": await _visible_tools(call)}
        except McpError as exc:
            raise _RpcError(INTERNAL_ERROR, f"{exc.code}: {exc.message}") from exc
    if method == "tools/call":
        return await _call_tool(call, params)
    raise _RpcError(METHOD_NOT_FOUND, f"method not found: {method}")


def add_mcp_routes(app: web.Application) -> None:
    """Register ``/mcp`` (and its session table) on the REST application."""
    app[SESSIONS] = McpSessions()
    app.router.add_route("*", MCP_PATH, mcp_handler, name="mcp")
