"""REST adapter (aiohttp): translates HTTP to the service layer and back.

Handlers only parse, call :class:`~gateway.service.Gateway` and render; every
error leaves through :func:`error_middleware` as JSON with a stable code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway import __version__
from gateway.auth import PeerIdentity, TokenAuthenticator
from gateway.config import OAuthConfig
from gateway.errors import (
    InvalidArgument,
    McpError,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
    Unauthenticated,
)
from gateway.models import Subject
from gateway.oauth import metadata_document, metadata_paths
from gateway.openapi import openapi_document
from gateway.schema import parse_bool, parse_execute, parse_mode, parse_task_id
from gateway.service import Gateway, RequestContext
from gateway.store import TaskRecord
from gateway.tracing import current_trace_ids, extract
from gateway.workspace import FileEntry

log = structlog.get_logger("gateway.rest")

GATEWAY = web.AppKey("gateway", Gateway)
AUTH = web.AppKey("auth", TokenAuthenticator)
PUBLIC = web.AppKey("public_paths", frozenset)
CTX = web.RequestKey("ctx", RequestContext)
SUBJECT = web.RequestKey("subject", Subject)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Errors raised before any decision existed get their own audit record, so a
# probe with bad input or a stolen-token guess still leaves a trace.
_AUDITED_REJECTIONS = (InvalidArgument, PayloadTooLarge, Unauthenticated, ResourceExhausted)


def _ctx(request: web.Request) -> RequestContext:
    return request[CTX]


def _subject(request: web.Request) -> Subject:
    subject = request.get(SUBJECT)
    if not isinstance(subject, Subject):
        raise Unauthenticated("authentication required")
    return subject


def _peer(request: web.Request) -> PeerIdentity | None:
    """The client certificate the TLS layer verified (CERT_OPTIONAL/REQUIRED), if any."""
    if request.app[AUTH].client_auth == "off" or request.transport is None:
        return None
    ssl_object = request.transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return PeerIdentity.from_der(der) if der else None


def _error_response(
    error: McpError, request_id: str, auth: TokenAuthenticator | None = None
) -> web.Response:
    headers = {"X-Request-Id": request_id}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = (
            auth.challenge(error) if auth is not None else 'Bearer realm="mcp-gateway"'
        )
    body = error.to_dict()
    body["error"]["request_id"] = request_id
    return web.json_response(body, status=error.http_status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Trace, authenticate, count, and turn every failure into a JSON error.

    The request's span continues the caller's W3C trace context
    (``traceparent``/``tracestate`` headers); structlog lines of the request
    carry its ``request_id``, and the response names it (``X-Request-Id``)
    and the trace (``X-Trace-Id``).
    """
    gateway = request.app[GATEWAY]
    ctx = RequestContext(transport="rest", source=request.remote or "")
    request[CTX] = ctx
    route = request.match_info.route.name or "unmatched"
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else ""
    started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
    with gateway.tracing.span(
        f"{request.method} {template}" if template else f"{request.method}",
        kind=SpanKind.SERVER,
        parent=extract(request.headers),
        attributes={
            "http.request.method": request.method,
            "http.route": template,
            "mcp.transport": "rest",
            "mcp.request_id": ctx.request_id,
        },
    ) as span:
        response = await _handle(request, handler, gateway, ctx, route)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        trace_id = current_trace_ids().get("trace_id")
        elapsed = time.perf_counter() - started
        gateway.metrics.api_request_seconds.labels(transport="rest", method=route).observe(elapsed)
        # Probes (/health, /ready every second from keepalived, /metrics) log at
        # debug.  Logged on the loop's next turn, after the answer is sent; the
        # callback runs in a copy of this context (request and trace ids).
        asyncio.get_running_loop().call_soon(
            functools.partial(
                log.debug if request.path in request.app[PUBLIC] else log.info,
                "request",
                method=request.method,
                route=template or request.path[:200],
                status=response.status,
                duration_ms=round(elapsed * 1000, 2),
                transport="rest",
            )
        )
    if trace_id is not None and not response.prepared:
        response.headers["X-Trace-Id"] = trace_id
    return response


async def _handle(
    request: web.Request, handler: Handler, gateway: Gateway, ctx: RequestContext, route: str
) -> web.StreamResponse:
    code = "OK"
    try:
        if request.path not in request.app[PUBLIC]:
            with gateway.tracing.span("auth.authenticate"):
                request[SUBJECT] = request.app[AUTH].authenticate(
                    request.headers.get("Authorization"), _peer(request)
                )
        response = await handler(request)
    except McpError as exc:
        code = str(exc.code)
        if isinstance(exc, _AUDITED_REJECTIONS):
            with contextlib.suppress(McpError):
                await gateway.reject(request.get(SUBJECT), ctx, exc)
        return _error_response(exc, ctx.request_id, request.app[AUTH])
    except web.HTTPRequestEntityTooLarge:
        code = "PAYLOAD_TOO_LARGE"
        exc2 = PayloadTooLarge(
            f"body: larger than {request.app[GATEWAY].config.server.max_body_bytes} bytes",
            field="body",
        )
        with contextlib.suppress(McpError):
            await gateway.reject(request.get(SUBJECT), ctx, exc2)
        return _error_response(exc2, ctx.request_id)
    except web.HTTPNotFound:
        code = "NOT_FOUND"
        return _error_response(NotFound(f"no route for {request.path}"), ctx.request_id)
    except web.HTTPMethodNotAllowed as exc:
        code = "METHOD_NOT_ALLOWED"
        return web.json_response(
            {
                "error": {
                    "code": "METHOD_NOT_ALLOWED",
                    "message": f"{request.method} not allowed",
                    "allowed": sorted(exc.allowed_methods),
                }
            },
            status=405,
        )
    except web.HTTPException:
        raise
    except Exception:
        code = "INTERNAL"
        log.exception("unhandled error", request_id=ctx.request_id)
        return web.json_response(
            {
                "error": {
                    "code": "INTERNAL",
                    "message": "internal error",
                    "request_id": ctx.request_id,
                }
            },
            status=500,
        )
    finally:
        gateway.metrics.api_requests.labels(transport="rest", method=route, code=code).inc()
    if not response.prepared:
        response.headers["X-Request-Id"] = ctx.request_id
    return response


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise InvalidArgument("body: a JSON object is required", field="body")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"body: malformed JSON ({exc})", field="body") from None


def _output_fields(data: bytes, name: str) -> dict[str, str]:
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode()}


def task_view(record: TaskRecord, *, with_output: bool = False) -> dict[str, Any]:
    view = record.summary()
    if with_output:
        view.update(_output_fields(record.stdout, "stdout"))
        view.update(_output_fields(record.stderr, "stderr"))
    return view


def entry_view(entry: FileEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "type": entry.type,
        "size": entry.size,
        "mode": f"{entry.mode:o}",
        "mtime": entry.mtime,
    }


# -- handlers ------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    state = await request.app[GATEWAY].readiness()
    return web.json_response(state, status=200 if state["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    # mcp_ready must be current even where nothing polls /ready (cached 2 s).
    await gateway.readiness()
    body = gateway.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def execute(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    subject = _subject(request)
    body = await _json_body(request)
    spec, wait = parse_execute(
        body, tasks=gateway.config.tasks, limits=gateway.config.sandbox.limits
    )
    record = await gateway.execute(subject, spec, _ctx(request))
    if not wait:
        return web.json_response(task_view(record), status=202)
    record = await gateway.tasks.wait(record.id)
    return web.json_response(task_view(record, with_output=True), status=200)


async def task_status(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    task_id = parse_task_id(request.match_info["task_id"])
    record = await gateway.task(_subject(request), task_id, _ctx(request))
    return web.json_response(
        task_view(record, with_output=parse_bool(request.query.get("output"), "output"))
    )


async def task_output(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    task_id = parse_task_id(request.match_info["task_id"])
    fmt = request.query.get("format", "ndjson")
    if fmt not in ("ndjson", "raw"):
        raise InvalidArgument("format: must be ndjson or raw", field="format")
    chunks = await gateway.output(_subject(request), task_id, _ctx(request))
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson"
            if fmt == "ndjson"
            else "application/octet-stream",
            "X-Request-Id": _ctx(request).request_id,
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    try:
        async for chunk in chunks:
            if fmt == "raw":
                await response.write(chunk.data)
                continue
            line: dict[str, object] = {"stream": chunk.stream, "offset": chunk.offset}
            line.update(_output_fields(chunk.data, "data"))
            await response.write(json.dumps(line).encode() + b"\n")
        if fmt == "ndjson":
            record = gateway.tasks.get(task_id)
            end = {"event": "end", **task_view(record)}
            await response.write(json.dumps(end).encode() + b"\n")
        await response.write_eof()
    except ConnectionResetError:
        log.info("output reader went away", task_id=task_id)
    return response


async def task_cancel(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    task_id = parse_task_id(request.match_info["task_id"])
    record = await gateway.cancel(_subject(request), task_id, _ctx(request))
    return web.json_response(task_view(record))


async def file_get(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    path = request.match_info.get("path", "")
    subject, ctx = _subject(request), _ctx(request)
    if path == "" or parse_bool(request.query.get("list"), "list"):
        entries = await gateway.list_files(subject, path, ctx)
        return web.json_response(
            {
                "path": path,
                "entries": [entry_view(e) for e in entries],
                "truncated": entries.truncated,
            }
        )
    if parse_bool(request.query.get("stat"), "stat"):
        return web.json_response(entry_view(await gateway.stat_file(subject, path, ctx)))
    offset = _int_query(request, "offset", 0) or 0
    length = _int_query(request, "length", None)
    data = await gateway.read_file(subject, path, ctx, offset=offset, length=length)
    return web.Response(body=data, content_type="application/octet-stream")


def _int_query(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise InvalidArgument(f"{name}: must be a non-negative integer", field=name)
    return int(raw)


async def file_put(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    path = request.match_info["path"]
    mode = parse_mode(request.query.get("mode"))
    create_dirs = parse_bool(request.query.get("create_dirs"), "create_dirs")
    data = await request.read()
    written = await gateway.write_file(
        _subject(request), path, data, _ctx(request), mode=mode, create_dirs=create_dirs
    )
    return web.json_response({"path": path, "bytes": written}, status=201)


async def file_delete(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    path = request.match_info["path"]
    recursive = parse_bool(request.query.get("recursive"), "recursive")
    await gateway.delete_file(_subject(request), path, _ctx(request), recursive=recursive)
    return web.json_response({"path": path, "deleted": True})


def add_metadata_routes(app: web.Application, settings: OAuthConfig) -> tuple[str, ...]:
    """Serve the protected resource metadata document (RFC 9728); return its paths.

    The document is public: a client needs it to learn where to get a token.
    """
    body = json.dumps(metadata_document(settings))

    async def resource_metadata(request: web.Request) -> web.Response:
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"Cache-Control": "public, max-age=300"},
        )

    paths = metadata_paths(settings.audience)
    for index, path in enumerate(paths):
        app.router.add_get(path, resource_metadata, name=f"oauth_resource_metadata_{index}")
    return paths


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health, name="health")
    r.add_get("/ready", ready, name="ready")
    r.add_get("/metrics", metrics, name="metrics")
    r.add_get("/openapi.json", openapi, name="openapi")
    r.add_post("/v1/commands", execute, name="execute")
    r.add_get("/v1/tasks/{task_id}", task_status, name="task_status")
    r.add_get("/v1/tasks/{task_id}/output", task_output, name="task_output")
    r.add_post("/v1/tasks/{task_id}/cancel", task_cancel, name="task_cancel")
    r.add_get("/v1/files", file_get, name="file_list")
    r.add_get("/v1/files/{path:.+}", file_get, name="file_get")
    r.add_put("/v1/files/{path:.+}", file_put, name="file_put")
    r.add_delete("/v1/files/{path:.+}", file_delete, name="file_delete")
