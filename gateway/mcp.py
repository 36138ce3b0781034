"""Model Context Protocol endpoint: Streamable HTTP at ``/mcp`` on the REST app.

JSON-RPC 2.0 over POST.  Two styles share the dispatch: the session revisions
2025-06-18 and 2025-11-25, where ``initialize`` issues an ``Mcp-Session-Id``
bound to the authenticated subject and DELETE ends it, and the stateless
revision 2026-07-28, where every message is its own POST whose routing headers
must agree with its body (:mod:`gateway.mcp_headers`) and ``server/discover``
replaces ``initialize``.  A POST is answered with ``application/json``, or with
a ``text/event-stream`` carrying progress notifications and then the response
when the client prefers it (:func:`wants_sse`); there is no GET stream.
``notifications/cancelled`` stops a request still in flight of the same
session (or, stateless, of the same subject).
Authentication is the REST bearer middleware; every tool goes through
:class:`~gateway.service.Gateway`, so policy, audit and sandbox apply unchanged,
and ``tools/list`` shows only the tools the policy lets the subject call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard
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
from gateway.mcp_headers import (
    META_SERVER_INFO,
    STATELESS_VERSION,
    VERSION_HEADER,
    check_client_meta,
    check_headers,
    is_stateless,
)
from gateway.mcp_tool import Progress, Result, Tool, ToolCall, tool_error
from gateway.models import Subject
from gateway.rest import GATEWAY, SUBJECT
from gateway.schema import pydantic_error
from gateway.service import RequestContext
from gateway.tracing import extract_meta

log = structlog.get_logger("gateway.mcp")

MCP_PATH = "/mcp"
#: The revisions with ``initialize`` and sessions, newest first.
SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18")
LATEST_VERSION = SUPPORTED_VERSIONS[0]
#: Every revision served, newest first (what ``server/discover`` lists).
ALL_VERSIONS = (STATELESS_VERSION, *SUPPORTED_VERSIONS)
SESSION_HEADER = "Mcp-Session-Id"
INSTRUCTIONS = (
    "Commands and files run in your sandboxed workspace /workspace; "
    "every call is checked by policy and audited."
)
MAX_SESSIONS = 10_000

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: Answer to a request the client cancelled (the code LSP uses; MCP sends none,
#: but an HTTP POST needs an answer).
REQUEST_CANCELLED = -32800
#: Revision 2026-07-28: the routing headers are missing, repeated or disagree
#: with the body; answered with HTTP 400 and nothing runs.
HEADER_MISMATCH = -32020

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


Inflight = dict[str | int, asyncio.Future[Any]]


@dataclass(slots=True)
class _Session:
    subject: str
    version: str
    created: float
    #: Requests being answered, by JSON-RPC id: what notifications/cancelled stops.
    inflight: Inflight = field(default_factory=dict)


class McpSessions:
    """Live MCP sessions of this process, keyed by ``Mcp-Session-Id``, and the
    requests of the stateless revision in flight, keyed by subject."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._limit = limit
        self._sessions: dict[str, _Session] = {}
        self._stateless: dict[str, Inflight] = {}

    def stateless_inflight(self, subject: str) -> Inflight:
        """The subject's stateless requests being answered (what its
        ``notifications/cancelled`` can stop); drop it with :meth:`release`."""
        return self._stateless.setdefault(subject, {})

    def release(self, subject: str) -> None:
        if not self._stateless.get(subject, True):
            del self._stateless[subject]

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


def _is_id(value: Any) -> TypeGuard[str | int]:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


async def _post(request: web.Request) -> web.StreamResponse:
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
    stateless = is_stateless(request.headers, message)
    try:
        check_headers(request.headers, message, stateless=stateless)
    except InvalidArgument as exc:
        # Fail closed: whatever an intermediary decided on the headers, the
        # body is not what it decided on.  Audited, and nothing runs.
        return await _refuse(request, subject, request_id, HEADER_MISMATCH, exc)
    if stateless:
        return await _post_stateless(request, subject, request_id, method, params)

    if method == "initialize" and request_id is not None:
        # A client asking for 2026-07-28 here gets the newest session revision:
        # that revision has no initialize.
        requested = params.get("protocolVersion")
        version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        new_id = sessions.open(subject.id, version)
        result = {
            "protocolVersion": version,
            "capabilities": _capabilities(),
            "serverInfo": _server_info(),
            "instructions": INSTRUCTIONS,
        }
        return web.json_response(
            {"jsonrpc": "2.0", "id": request_id, "result": result},
            headers={SESSION_HEADER: new_id},
        )

    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None:
        return _rpc_error(request_id, INVALID_REQUEST, f"missing {SESSION_HEADER}", status=400)
    session = sessions.get(session_id, subject.id)
    if session is None:
        return _rpc_error(request_id, INVALID_REQUEST, "unknown session", status=404)
    header = request.headers.get(VERSION_HEADER)
    if header is not None and header not in SUPPORTED_VERSIONS:
        return _rpc_error(
            request_id, INVALID_REQUEST, f"unsupported protocol version {header!r}", status=400
        )
    if method is None or request_id is None:
        # A notification (notifications/initialized, cancelled...) or a response.
        if method == "notifications/cancelled":
            _cancel_inflight(session.inflight, params)
        return web.Response(status=202)
    return await _answer(request, subject, request_id, method, params, lambda: session.inflight)


def _server_info() -> dict[str, str]:
    return {"name": "mcp-security-gateway", "version": __version__}


def _capabilities() -> dict[str, Any]:
    return {"tools": {"listChanged": False}}


async def _refuse(
    request: web.Request, subject: Subject, request_id: Any, code: int, exc: InvalidArgument
) -> web.Response:
    """Audit a message refused before dispatch and answer it with HTTP 400."""
    log.warning("mcp message refused", subject=subject.id, field=exc.field, reason=exc.message)
    with contextlib.suppress(McpError):
        await request.app[GATEWAY].reject(
            subject, RequestContext(transport="mcp", source=request.remote or ""), exc
        )
    return _rpc_error(request_id, code, exc.message, status=400)


async def _post_stateless(
    request: web.Request,
    subject: Subject,
    request_id: Any,
    method: str | None,
    params: dict[str, Any],
) -> web.StreamResponse:
    """A message of revision 2026-07-28 whose headers agree with its body."""
    if SESSION_HEADER in request.headers:
        # Refused rather than ignored: a session id would suggest state (a
        # subject, a revision) that this revision never consults.
        exc = InvalidArgument(
            f"{SESSION_HEADER}: not used by protocol revision {STATELESS_VERSION}; "
            "send the request without it",
            field=SESSION_HEADER,
        )
        return await _refuse(request, subject, request_id, INVALID_REQUEST, exc)
    if method in ("initialize", "notifications/initialized"):
        exc = InvalidArgument(
            f"method {method}: not part of protocol revision {STATELESS_VERSION} "
            "(use server/discover)",
            field="method",
        )
        return await _refuse(request, subject, request_id, INVALID_REQUEST, exc)
    sessions = request.app[SESSIONS]
    if method is None or request_id is None:
        if method == "notifications/cancelled":
            _cancel_inflight(sessions.stateless_inflight(subject.id), params)
            sessions.release(subject.id)
        return web.Response(status=202)
    try:
        check_client_meta(params)
    except InvalidArgument as exc:
        return await _refuse(request, subject, request_id, INVALID_PARAMS, exc)
    try:
        return await _answer(
            request,
            subject,
            request_id,
            method,
            params,
            lambda: sessions.stateless_inflight(subject.id),
            stateless=True,
        )
    finally:
        sessions.release(subject.id)


async def _answer(
    request: web.Request,
    subject: Subject,
    request_id: str | int,
    method: str,
    params: dict[str, Any],
    inflight_table: Callable[[], Inflight],
    *,
    stateless: bool = False,
) -> web.StreamResponse:
    """Dispatch one request through the service layer and answer it (JSON or SSE).

    ``inflight_table`` is looked up only when the request is registered in it:
    a stateless subject's table is dropped whenever it is empty.
    """
    gateway = request.app[GATEWAY]
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    if not _is_id(token):
        token = None
    stream = _SseReply(request) if wants_sse(request.headers.get("Accept", ""), token) else None
    call = ToolCall(
        request,
        gateway,
        subject,
        RequestContext(transport="mcp", source=request.remote or ""),
        progress=stream.progress_sender(token) if stream and token is not None else None,
    )
    # params._meta.traceparent (the MCP convention) continues the agent's
    # trace; without it the span is a child of the HTTP request's span.
    http_span = trace.get_current_span()
    parent = extract_meta(meta)
    tool = params.get("name") if method == "tools/call" else None
    attributes: dict[str, str] = {"mcp.method.name": method, "mcp.transport": "mcp"}
    if stateless:
        attributes["mcp.protocol.version"] = STATELESS_VERSION
    if isinstance(tool, str):
        attributes["gen_ai.tool.name"] = tool
    reply: dict[str, Any]
    with gateway.tracing.span(
        f"{method} {tool}" if isinstance(tool, str) else method,
        kind=SpanKind.SERVER,
        parent=parent,
        attributes=attributes,
    ) as span:
        if parent is not None and http_span.get_span_context().is_valid:
            span.add_link(http_span.get_span_context())
        if stream is not None:
            await stream.open()
        work = asyncio.ensure_future(_dispatch(call, method, params, stateless=stateless))
        inflight = inflight_table()
        inflight[request_id] = work
        try:
            result = await work
        except _RpcError as exc:
            span.set_attribute("rpc.jsonrpc.error_code", exc.code)
            if stream is None:
                return _rpc_error(request_id, exc.code, exc.message, status=exc.status)
            reply = _error_body(request_id, exc.code, exc.message)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not work.cancelled() or (current is not None and current.cancelling()):
                raise
            # Cancelled by the client's notifications/cancelled: the tool has
            # stopped its command; the client no longer waits for an answer.
            span.set_attribute("mcp.cancelled", True)
            reply = _error_body(request_id, REQUEST_CANCELLED, "request cancelled by the client")
            if stream is None:
                return web.json_response(reply)
        else:
            if result.get("isError") is True:
                span.set_attribute("mcp.tool.is_error", True)
            if stateless:
                # Revision 2026-07-28 tags every final result.
                result = {"resultType": "complete", **result}
            reply = {"jsonrpc": "2.0", "id": request_id, "result": result}
        finally:
            if inflight.get(request_id) is work:
                del inflight[request_id]
            if not work.done():
                work.cancel()
    if stream is None:
        return web.json_response(reply)
    return await stream.finish(reply)


def _error_body(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _cancel_inflight(inflight: Inflight, params: dict[str, Any]) -> None:
    request_id = params.get("requestId")
    if not _is_id(request_id):
        return
    work = inflight.get(request_id)
    if work is not None and not work.done():
        log.info("mcp request cancelled by the client", request_id=request_id)
        work.cancel()


def _media_q(accept: str, media: str) -> float:
    """The quality ``accept`` gives ``media`` (RFC 9110, 12.5.1), 0 when not acceptable."""
    kind = media.split("/", 1)[0]
    best, specificity = 0.0, -1
    for item in accept.split(","):
        name, *options = (part.strip() for part in item.split(";"))
        name = name.lower()
        rank = 2 if name == media else 1 if name == f"{kind}/*" else 0 if name == "*/*" else -1
        if rank < specificity or rank < 0:
            continue
        q = 1.0
        for option in options:
            key, _, value = option.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        best, specificity = q, rank
    return best


def wants_sse(accept: str, progress_token: Any) -> bool:
    """Answer with an SSE stream?  When the client prefers ``text/event-stream`` to
    ``application/json``, or accepts both equally and asked for progress (which
    only a stream can carry).  Pure."""
    sse, plain = _media_q(accept, "text/event-stream"), _media_q(accept, "application/json")
    return sse > plain or (sse > 0 and sse == plain and progress_token is not None)


class _SseReply:
    """One POST answered as ``text/event-stream``: notifications, then the response."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

    async def open(self) -> None:
        await self._response.prepare(self._request)

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":"))
        with contextlib.suppress(ConnectionResetError):
            await self._response.write(f"event: message\ndata: {data}\n\n".encode())

    def progress_sender(self, token: str | int) -> Progress:
        async def progress(value: float, total: float | None, message: str) -> None:
            params: dict[str, Any] = {"progressToken": token, "progress": value}
            if total is not None:
                params["total"] = total
            if message:
                params["message"] = message
            await self.send(
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
            )

        return progress

    async def finish(self, reply: dict[str, Any]) -> web.StreamResponse:
        await self.send(reply)
        with contextlib.suppress(ConnectionResetError):
            await self._response.write_eof()
        return self._response


async def _dispatch(
    call: ToolCall, method: str, params: dict[str, Any], *, stateless: bool = False
) -> dict[str, Any]:
    if method == "ping":
        return {}
    if method == "server/discover" and stateless:
        return {
            "supportedVersions": list(ALL_VERSIONS),
            "capabilities": _capabilities(),
            "_meta": {META_SERVER_INFO: _server_info()},
            "instructions": INSTRUCTIONS,
        }
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
