"""gRPC adapter (grpc.aio): translates ``mcp.McpService`` to the service layer.

It runs in the same process and event loop as the REST adapter, over the
same :class:`~gateway.service.Gateway`: the servicer only parses, calls the
service layer and renders, exactly like :mod:`gateway.rest`.  Input goes
through :func:`gateway.schema.parse_execute` / :func:`parse_task_id`, so both
transports accept and reject the same requests with the same field names.

Errors leave as a gRPC status from :data:`GRPC_STATUS` with the message as
details and machine-readable trailing metadata (``mcp-error-code``,
``mcp-error-field``, ``mcp-error-reason``, ``mcp-retry-after``,
``mcp-request-id``).  The standard ``grpc.health.v1`` service and server
reflection are served next to ``mcp.McpService``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import mimetypes
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import Span, SpanKind

from gateway import __version__
from gateway.auth import PeerIdentity, TokenAuthenticator
from gateway.errors import (
    ErrorCode,
    InvalidArgument,
    McpError,
    PayloadTooLarge,
    ResourceExhausted,
    Unauthenticated,
)
from gateway.models import Subject
from gateway.proto import mcp_pb2, mcp_pb2_grpc
from gateway.schema import parse_execute, parse_mode, parse_task_id
from gateway.service import Gateway, RequestContext
from gateway.store import TaskRecord
from gateway.tracing import extract
from gateway.workspace import FileEntry

log = structlog.get_logger("gateway.grpc")

SERVICE_NAME: str = mcp_pb2.DESCRIPTOR.services_by_name["McpService"].full_name

# One table: the gateway's stable codes to gRPC status codes.  The exact
# gateway code always travels in the ``mcp-error-code`` trailing metadata.
GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Rejected before any decision existed: audited as ``request.rejected`` (as REST does).
_AUDITED_REJECTIONS = (InvalidArgument, PayloadTooLarge, Unauthenticated, ResourceExhausted)

# Head room over the file limits for the rest of the message.
_MESSAGE_SLACK = 64 * 1024

_Context = grpc.aio.ServicerContext[Any, Any]
_R = TypeVar("_R")

_CHUNK_TYPE = {"stdout": mcp_pb2.CHUNK_STDOUT, "stderr": mcp_pb2.CHUNK_STDERR}


def _ascii(text: str) -> str:
    """Metadata values must be printable ASCII."""
    return text.encode("ascii", "backslashreplace").decode().replace("\n", " ")


def error_metadata(error: McpError, request_id: str) -> tuple[tuple[str, str], ...]:
    """The machine-readable trailing metadata of an error."""
    items = [("mcp-error-code", str(error.code)), ("mcp-request-id", request_id)]
    if error.field is not None:
        items.append(("mcp-error-field", _ascii(error.field)))
    items.extend(("mcp-error-reason", _ascii(reason)) for reason in error.reasons)
    if error.retry_after is not None:
        items.append(("mcp-retry-after", str(max(1, round(error.retry_after)))))
    return tuple(items)


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def _text(data: bytes) -> tuple[str, bytes | None]:
    """UTF-8 text, or a lossy decoding plus the exact bytes."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), data


def task_status(record: TaskRecord) -> mcp_pb2.TaskStatus.ValueType:
    return mcp_pb2.TaskStatus.Value(f"TASK_{record.state}")


def task_info(record: TaskRecord) -> mcp_pb2.TaskInfo:
    info = mcp_pb2.TaskInfo(
        task_id=record.id,
        task_type=mcp_pb2.TASK_COMMAND,
        status=task_status(record),
        created_at=_iso(record.created_at),
        reason=record.reason,
        owner=record.owner,
        command=list(record.argv),
        cwd=record.cwd,
    )
    if record.started_at is not None:
        info.started_at = _iso(record.started_at)
    if record.ended_at is not None:
        info.completed_at = _iso(record.ended_at)
    return info


def task_result(record: TaskRecord) -> mcp_pb2.TaskResult:
    """The result of an ended task; ``exit_code`` is -1 when there is none."""
    stdout, stdout_raw = _text(record.stdout)
    stderr, stderr_raw = _text(record.stderr)
    duration = (
        0.0
        if record.started_at is None or record.ended_at is None
        else record.ended_at - record.started_at
    )
    result = mcp_pb2.TaskResult(
        exit_code=-1 if record.exit_code is None else record.exit_code,
        stdout=stdout,
        stderr=stderr,
        resource_usage=mcp_pb2.ResourceUsage(
            cpu_time_ms=round(record.cpu_time_s * 1000),
            max_memory_kb=record.max_rss_bytes // 1024,
        ),
        execution_time_ms=max(0, round(duration * 1000)),
        stdout_truncated=record.stdout_truncated,
        stderr_truncated=record.stderr_truncated,
    )
    if stdout_raw is not None:
        result.stdout_raw = stdout_raw
    if stderr_raw is not None:
        result.stderr_raw = stderr_raw
    if record.signal is not None:
        result.signal = record.signal
    return result


def status_response(record: TaskRecord) -> mcp_pb2.TaskStatusResponse:
    response = mcp_pb2.TaskStatusResponse(task_info=task_info(record))
    if record.state.terminal:
        response.result.CopyFrom(task_result(record))
    return response


def file_entry(entry: FileEntry) -> mcp_pb2.FileEntry:
    return mcp_pb2.FileEntry(
        name=entry.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        type=entry.type,
        size=entry.size,
        mode=entry.mode,
        mtime=entry.mtime,
    )


def execute_body(request: mcp_pb2.CommandRequest) -> dict[str, Any]:
    """A CommandRequest as the body :func:`parse_execute` validates.

    ``sandbox_config`` is only a request: its network access becomes the
    command's ``network`` request (policy and config decide); everything else
    in it is decided by the gateway's configuration and policy.
    """
    body: dict[str, Any] = {
        "command": request.command,
        "args": list(request.args),
        "env": dict(request.env),
        "wait": request.wait,
    }
    if request.HasField("cwd"):
        body["cwd"] = request.cwd
    if request.timeout:
        body["timeout"] = float(request.timeout)
    if request.HasField("stdin"):
        body["stdin_base64"] = base64.b64encode(request.stdin).decode()
    if request.HasField("sandbox_config"):
        access = request.sandbox_config.network_access
        if access not in mcp_pb2.NetworkAccess.values():
            raise InvalidArgument(
                f"sandbox_config.network_access: unknown value {access}",
                field="sandbox_config.network_access",
            )
        body["network"] = access != mcp_pb2.NETWORK_NONE
    return body


def _path(value: str) -> str:
    if not value:
        raise InvalidArgument("path: must not be empty", field="path")
    return value


class McpServicer(mcp_pb2_grpc.McpServiceServicer):
    """``mcp.McpService`` over the service layer."""

    def __init__(self, gateway: Gateway, authenticator: TokenAuthenticator) -> None:
        self.gateway = gateway
        self.authenticator = authenticator
        self.started = time.monotonic()

    # -- plumbing ------------------------------------------------------------------

    def _authenticate(self, context: _Context) -> Subject:
        header = None
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        return self.authenticator.authenticate(header, self._peer(context))

    def _peer(self, context: _Context) -> PeerIdentity | None:
        """The verified client certificate, if this server requires and verified one.

        grpcio only requests client certificates when it also requires them,
        so with ``client_auth: optional`` gRPC callers authenticate by token.
        """
        if self.authenticator.client_auth != "required":
            return None
        pems = list(context.auth_context().get("x509_pem_cert") or ())
        return PeerIdentity.from_pem(pems[0]) if pems else None

    @staticmethod
    def _ctx(context: _Context) -> RequestContext:
        return RequestContext(transport="grpc", source=context.peer() or "")

    async def _fail(
        self, context: _Context, ctx: RequestContext, subject: Subject | None, exc: McpError
    ) -> None:
        if isinstance(exc, _AUDITED_REJECTIONS):
            with contextlib.suppress(McpError):
                await self.gateway.reject(subject, ctx, exc)
        await context.abort(GRPC_STATUS[exc.code], exc.message, error_metadata(exc, ctx.request_id))

    async def _internal(self, context: _Context, ctx: RequestContext) -> None:
        log.exception("unhandled error", request_id=ctx.request_id)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            "internal error",
            (("mcp-error-code", "INTERNAL"), ("mcp-request-id", ctx.request_id)),
        )

    def _count(self, method: str, code: str, started: float | None = None) -> None:
        metrics = self.gateway.metrics
        metrics.api_requests.labels(transport="grpc", method=method, code=code).inc()
        if started is not None:
            elapsed = time.perf_counter() - started
            metrics.api_request_seconds.labels(transport="grpc", method=method).observe(elapsed)
            # Logged on the loop's next turn, once grpcio has the answer to
            # send (as REST does); the callback runs in a copy of this context.
            asyncio.get_running_loop().call_soon(
                functools.partial(
                    log.info,
                    "request",
                    method=method,
                    code=code,
                    duration_ms=round(elapsed * 1000, 2),
                    transport="grpc",
                )
            )

    @contextlib.contextmanager
    def _server_span(self, method: str, context: _Context, ctx: RequestContext) -> Iterator[Span]:
        """The RPC's span, continuing the caller's trace context from its metadata."""
        carrier: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            carrier[key] = value if isinstance(value, str) else value.decode("latin-1")
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
        with self.gateway.tracing.span(
            f"mcp.McpService/{method}",
            kind=SpanKind.SERVER,
            parent=extract(carrier),
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "mcp.McpService",
                "rpc.method": method,
                "mcp.transport": "grpc",
                "mcp.request_id": ctx.request_id,
            },
        ) as span:
            yield span

    def _auth_span(self, context: _Context) -> Subject:
        with self.gateway.tracing.span("auth.authenticate"):
            return self._authenticate(context)

    async def _unary(
        self,
        method: str,
        context: _Context,
        handler: Callable[[Subject, RequestContext], Awaitable[_R]],
    ) -> _R:
        """Authenticate, call, count; every failure becomes a status (abort raises)."""
        ctx = self._ctx(context)
        subject: Subject | None = None
        code = "OK"
        started = time.perf_counter()
        with self._server_span(method, context, ctx) as span:
            try:
                subject = self._auth_span(context)
                return await handler(subject, ctx)
            except McpError as exc:
                code = str(exc.code)
                span.set_attribute("rpc.grpc.status_code", GRPC_STATUS[exc.code].value[0])
                await self._fail(context, ctx, subject, exc)
                raise  # not reached: abort raises
            except Exception:
                code = "INTERNAL"
                await self._internal(context, ctx)
                raise
            finally:
                self._count(method, code, started)

    # -- RPCs ----------------------------------------------------------------------

    async def Health(  # noqa: N802
        self, request: mcp_pb2.HealthRequest, context: _Context
    ) -> mcp_pb2.HealthResponse:
        self._count("Health", "OK")
        return mcp_pb2.HealthResponse(
            status="ok",
            version=__version__,
            uptime_seconds=int(time.monotonic() - self.started),
        )

    async def ExecuteCommand(  # noqa: N802
        self, request: mcp_pb2.CommandRequest, context: _Context
    ) -> mcp_pb2.TaskCreatedResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.TaskCreatedResponse:
            config = self.gateway.config
            spec, wait = parse_execute(
                execute_body(request), tasks=config.tasks, limits=config.sandbox.limits
            )
            record = await self.gateway.execute(subject, spec, ctx)
            if wait:
                record = await self.gateway.tasks.wait(record.id)
            response = mcp_pb2.TaskCreatedResponse(
                task_id=record.id,
                status=task_status(record),
                created_at=_iso(record.created_at),
                task_info=task_info(record),
            )
            if record.state.terminal:
                response.result.CopyFrom(task_result(record))
            return response

        return await self._unary("ExecuteCommand", context, run)

    async def GetTaskStatus(  # noqa: N802
        self, request: mcp_pb2.TaskStatusRequest, context: _Context
    ) -> mcp_pb2.TaskStatusResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.TaskStatusResponse:
            task_id = parse_task_id(request.task_id)
            return status_response(await self.gateway.task(subject, task_id, ctx))

        return await self._unary("GetTaskStatus", context, run)

    async def StreamTaskOutput(  # noqa: N802
        self, request: mcp_pb2.TaskStatusRequest, context: _Context
    ) -> AsyncIterator[mcp_pb2.TaskOutputChunk]:
        """Output from the start, live, then one CHUNK_EXIT_CODE chunk with the end state."""
        ctx = self._ctx(context)
        with self._server_span("StreamTaskOutput", context, ctx):
            async for item in self._stream_output(request, context, ctx):
                yield item

    async def _stream_output(
        self, request: mcp_pb2.TaskStatusRequest, context: _Context, ctx: RequestContext
    ) -> AsyncIterator[mcp_pb2.TaskOutputChunk]:
        subject: Subject | None = None
        code = "OK"
        started = time.perf_counter()
        try:
            subject = self._auth_span(context)
            task_id = parse_task_id(request.task_id)
            chunks = await self.gateway.output(subject, task_id, ctx)
            async for chunk in chunks:
                yield mcp_pb2.TaskOutputChunk(
                    task_id=task_id,
                    type=_CHUNK_TYPE[chunk.stream],
                    data=chunk.data,
                    timestamp_ms=int(time.time() * 1000),
                    offset=chunk.offset,
                )
            record = self.gateway.tasks.get(task_id)
            end = mcp_pb2.TaskOutputChunk(
                task_id=task_id,
                type=mcp_pb2.CHUNK_EXIT_CODE,
                data=b"" if record.exit_code is None else str(record.exit_code).encode(),
                timestamp_ms=int(time.time() * 1000),
                status=task_status(record),
            )
            if record.exit_code is not None:
                end.exit_code = record.exit_code
            yield end
        except McpError as exc:
            code = str(exc.code)
            await self._fail(context, ctx, subject, exc)
        except Exception:
            code = "INTERNAL"
            await self._internal(context, ctx)
        finally:
            self._count("StreamTaskOutput", code, started)

    async def CancelTask(  # noqa: N802
        self, request: mcp_pb2.TaskStatusRequest, context: _Context
    ) -> mcp_pb2.TaskStatusResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.TaskStatusResponse:
            task_id = parse_task_id(request.task_id)
            return status_response(await self.gateway.cancel(subject, task_id, ctx))

        return await self._unary("CancelTask", context, run)

    async def ReadFile(  # noqa: N802
        self, request: mcp_pb2.ReadFileRequest, context: _Context
    ) -> mcp_pb2.ReadFileResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.ReadFileResponse:
            path = _path(request.path)
            length = request.length if request.HasField("length") else None
            data = await self.gateway.read_file(
                subject, path, ctx, offset=request.offset, length=length
            )
            mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
            return mcp_pb2.ReadFileResponse(path=path, content=data, mime_type=mime)

        return await self._unary("ReadFile", context, run)

    async def WriteFile(  # noqa: N802
        self, request: mcp_pb2.WriteFileRequest, context: _Context
    ) -> mcp_pb2.WriteFileResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.WriteFileResponse:
            path = _path(request.path)
            mode = parse_mode(f"{request.mode:o}" if request.mode else None)
            written = await self.gateway.write_file(
                subject, path, request.content, ctx, mode=mode, create_dirs=request.create_dirs
            )
            return mcp_pb2.WriteFileResponse(path=path, bytes_written=written)

        return await self._unary("WriteFile", context, run)

    async def DeleteFile(  # noqa: N802
        self, request: mcp_pb2.DeleteFileRequest, context: _Context
    ) -> mcp_pb2.DeleteFileResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.DeleteFileResponse:
            path = _path(request.path)
            await self.gateway.delete_file(subject, path, ctx, recursive=request.recursive)
            return mcp_pb2.DeleteFileResponse(path=path, success=True)

        return await self._unary("DeleteFile", context, run)

    async def ListFiles(  # noqa: N802
        self, request: mcp_pb2.ListFilesRequest, context: _Context
    ) -> mcp_pb2.ListFilesResponse:
        async def run(subject: Subject, ctx: RequestContext) -> mcp_pb2.ListFilesResponse:
            listing = await self.gateway.list_files(subject, request.path, ctx)
            return mcp_pb2.ListFilesResponse(
                path=request.path,
                entries=[file_entry(e) for e in listing],
                truncated=listing.truncated,
            )

        return await self._unary("ListFiles", context, run)


# Health servicers of the running servers, so stop() can flip them first.
_HEALTH: dict[grpc.aio.Server, HealthServicer] = {}


async def start_grpc(
    gateway: Gateway,
    authenticator: TokenAuthenticator,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start ``mcp.McpService`` + health + reflection on ``host:port`` (0: any free port).

    With ``credentials`` (see :func:`gateway.tls.grpc_server_credentials`) the
    port speaks TLS only.

    Must run in the event loop that serves REST; returns the server and the
    bound port.  Raises OSError when the address cannot be bound.
    """
    files = gateway.config.files
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", files.max_write_bytes + _MESSAGE_SLACK),
            ("grpc.max_send_message_length", files.max_read_bytes + _MESSAGE_SLACK),
        ]
    )
    mcp_pb2_grpc.add_McpServiceServicer_to_server(McpServicer(gateway, authenticator), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    _HEALTH[server] = health
    return server, bound


async def stop(server: grpc.aio.Server, grace: float | None) -> None:
    """Report NOT_SERVING, then stop accepting and give calls ``grace`` seconds."""
    health = _HEALTH.pop(server, None)
    if health is not None:
        await health.enter_graceful_shutdown()
    await server.stop(grace)
