"""Python clients for the gateway: REST and gRPC, async and sync, same methods.

Four classes share one API (``execute``, ``status``, ``wait``,
``stream_output``, ``cancel``, ``read_file``, ``write_file``, ``delete_file``,
``list_files``) and return the same plain dicts, in the form of the REST API's
task JSON (see docs/client.md):

* :class:`AsyncClient` / :class:`Client` speak REST (aiohttp);
* :class:`AsyncGrpcClient` / :class:`GrpcClient` speak ``mcp.McpService``.

:func:`connect` picks one from a URL (``http(s)://`` or ``grpc(s)://``).
Errors come back as the gateway's own :mod:`gateway.errors` classes, rebuilt
from the JSON error body (REST) or the status and trailing metadata (gRPC).
Only requests that are safe to repeat are retried: any request that could not
be sent (no connection), and the idempotent calls in :data:`IDEMPOTENT`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import grpc
import grpc.aio

from gateway.errors import BY_CODE, ErrorCode, McpError, Unavailable, from_dict
from gateway.proto import mcp_pb2, mcp_pb2_grpc

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})

# Calls repeated after a failure once the request may have reached the server.
# ``execute`` and ``delete_file`` are never in here: a repeat could run the
# command twice or report NOT_FOUND for a delete that worked.
IDEMPOTENT = frozenset(
    {"status", "stream_output", "cancel", "read_file", "write_file", "list_files"}
)

_T = TypeVar("_T")


def _backoff(attempt: int) -> float:
    return float(min(2.0, 0.1 * 2**attempt))


# -- shared conversion ---------------------------------------------------------------


def output_fields(data: bytes, name: str) -> dict[str, str]:
    """``{name: text}`` for UTF-8, else ``{name_base64: ...}`` (the REST form)."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode()}


def decode_output(view: Mapping[str, Any], name: str) -> bytes:
    """The exact bytes of ``stdout``/``stderr``/``data`` in a task dict or chunk."""
    if f"{name}_base64" in view:
        return base64.b64decode(view[f"{name}_base64"])
    return str(view.get(name, "")).encode("utf-8")


def execute_body(
    command: str,
    args: Sequence[str],
    *,
    cwd: str | None,
    env: Mapping[str, str] | None,
    timeout: float | None,
    stdin: str | bytes | None,
    wait: bool,
) -> dict[str, Any]:
    """The REST execute body; the gRPC client builds its request from it."""
    body: dict[str, Any] = {"command": command, "args": list(args), "wait": wait}
    if cwd is not None:
        body["cwd"] = cwd
    if env:
        body["env"] = dict(env)
    if timeout is not None:
        body["timeout"] = timeout
    if isinstance(stdin, bytes):
        body["stdin_base64"] = base64.b64encode(stdin).decode()
    elif stdin is not None:
        body["stdin"] = stdin
    return body


def build_error(
    code: str | None,
    message: str,
    *,
    field: str | None = None,
    reasons: Sequence[str] = (),
    retry_after: float | None = None,
) -> McpError:
    """One :class:`McpError` from its parts, whatever transport carried them."""
    return from_dict(
        {
            "error": {
                "code": code or "INTERNAL",
                "message": message,
                "field": field,
                "reasons": list(reasons),
                "retry_after": retry_after,
            }
        }
    )


# -- REST ----------------------------------------------------------------------------


class _AsyncBase:
    """What every async client shares: context manager and :meth:`wait`."""

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError

    async def status(self, task_id: str, *, output: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def stream_output(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError

    async def wait(self, task_id: str) -> dict[str, Any]:
        """Follow the output stream to its end, then return the final status with output."""
        async for _ in self.stream_output(task_id):
            pass
        return await self.status(task_id, output=True)


_Self = TypeVar("_Self", bound=_AsyncBase)


class AsyncClient(_AsyncBase):
    """Async REST client; use as ``async with AsyncClient(url, token) as c``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8081",
        token: str | None = None,
        *,
        timeout_s: float = 300.0,
        retries: int = 2,
        ca_file: str | Path | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        # A private CA (the appliance's internal one); None trusts the system's.
        self._ssl = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self._session: aiohttp.ClientSession | None = None
        # Requests repeated after a failure (connection refused, reset, timeout).
        self.retried = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else None
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=connector
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        attempt = 0
        while True:
            try:
                async with self._http().request(
                    method, self._base + path, json=json_body, data=data, params=params
                ) as resp:
                    body = await resp.read()
                    if resp.status >= 400:
                        raise _http_error(resp.status, body)
                    return resp.status, body
            except aiohttp.ClientConnectorError as exc:
                # Nothing was sent: always safe to try again.
                if attempt >= self._retries:
                    raise Unavailable(f"cannot connect to {self._base}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not idempotent or attempt >= self._retries:
                    raise Unavailable(f"request to {self._base} failed: {exc}") from exc
            attempt += 1
            self.retried += 1
            await asyncio.sleep(_backoff(attempt))

    async def _json(self, method: str, path: str, *, idempotent: bool, **kw: Any) -> Any:
        _, body = await self._request(method, path, idempotent=idempotent, **kw)
        return json.loads(body)

    # -- commands and tasks ----------------------------------------------------------

    async def execute(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        wait: bool = False,
    ) -> dict[str, Any]:
        body = execute_body(
            command, args, cwd=cwd, env=env, timeout=timeout, stdin=stdin, wait=wait
        )
        result: dict[str, Any] = await self._json(
            "POST", "/v1/commands", idempotent=False, json_body=body
        )
        return result

    async def status(self, task_id: str, *, output: bool = False) -> dict[str, Any]:
        params = {"output": "true"} if output else None
        result: dict[str, Any] = await self._json(
            "GET", f"/v1/tasks/{task_id}", idempotent=True, params=params
        )
        return result

    async def stream_output(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """Yield NDJSON lines: output chunks, then one ``{"event": "end", ...}``.

        The start is retried on connection failures until the first line arrived.
        """
        url = self._base + f"/v1/tasks/{task_id}/output"
        attempt = 0
        received = False
        while True:
            try:
                async with self._http().get(url) as resp:
                    if resp.status >= 400:
                        raise _http_error(resp.status, await resp.read())
                    async for raw in resp.content:
                        if raw.strip():
                            received = True
                            yield json.loads(raw)
                    return
            except (aiohttp.ClientError, TimeoutError) as exc:
                if received or attempt >= self._retries:
                    raise Unavailable(f"output stream from {self._base} failed: {exc}") from exc
            attempt += 1
            await asyncio.sleep(_backoff(attempt))

    async def cancel(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(
            "POST", f"/v1/tasks/{task_id}/cancel", idempotent=True
        )
        return result

    # -- files ------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        _, body = await self._request("GET", f"/v1/files/{_quote(path)}", idempotent=True)
        return body

    async def write_file(
        self, path: str, data: bytes, *, mode: int = 0o644, create_dirs: bool = False
    ) -> dict[str, Any]:
        params = {"mode": f"{mode:o}", "create_dirs": "true" if create_dirs else "false"}
        result: dict[str, Any] = await self._json(
            "PUT", f"/v1/files/{_quote(path)}", idempotent=True, data=data, params=params
        )
        return result

    async def delete_file(self, path: str, *, recursive: bool = False) -> dict[str, Any]:
        params = {"recursive": "true" if recursive else "false"}
        result: dict[str, Any] = await self._json(
            "DELETE", f"/v1/files/{_quote(path)}", idempotent=True, params=params
        )
        return result

    async def list_files(self, path: str = "") -> list[dict[str, Any]]:
        target = f"/v1/files/{_quote(path)}" if path else "/v1/files"
        result = await self._json("GET", target, idempotent=True, params={"list": "true"})
        entries: list[dict[str, Any]] = result["entries"]
        return entries


def _quote(path: str) -> str:
    return quote(path, safe="/")


def _http_error(status: int, body: bytes) -> McpError:
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            return from_dict(doc)
    except ValueError:
        pass
    return Unavailable(f"HTTP {status}: {body[:200].decode(errors='replace')}")


# -- gRPC ----------------------------------------------------------------------------

# gRPC status -> gateway code, for errors without ``mcp-error-code`` metadata
# (raised by the gRPC runtime itself, or by a proxy in between).
_FROM_GRPC: dict[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: ErrorCode.UNAVAILABLE,
}

_STATE_NAMES: dict[int, str] = {
    number: name.removeprefix("TASK_") for name, number in mcp_pb2.TaskStatus.items()
}
_STREAMS = {mcp_pb2.CHUNK_STDOUT: "stdout", mcp_pb2.CHUNK_STDERR: "stderr"}

# Reconnect quickly while a server is (re)starting; gRPC's default starts at 1 s.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def grpc_error(exc: grpc.aio.AioRpcError) -> McpError:
    """An :class:`McpError` from a gRPC status and its trailing metadata."""
    code: str | None = None
    field: str | None = None
    reasons: list[str] = []
    retry_after: float | None = None
    for key, value in exc.trailing_metadata() or ():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if key == "mcp-error-code":
            code = text
        elif key == "mcp-error-field":
            field = text
        elif key == "mcp-error-reason":
            reasons.append(text)
        elif key == "mcp-retry-after":
            try:
                retry_after = float(text)
            except ValueError:
                retry_after = None
    if code is None or code not in BY_CODE:
        code = str(_FROM_GRPC.get(exc.code(), ErrorCode.INTERNAL))
    return build_error(
        code,
        exc.details() or str(exc.code()),
        field=field,
        reasons=reasons,
        retry_after=retry_after,
    )


def _epoch(iso: str) -> float | None:
    if not iso:
        return None
    return datetime.datetime.fromisoformat(iso).timestamp()


def task_dict(
    info: mcp_pb2.TaskInfo, result: mcp_pb2.TaskResult | None, *, with_output: bool
) -> dict[str, Any]:
    """A TaskInfo (+ TaskResult) in the form of the REST task JSON.

    gRPC does not carry the total output sizes: ``stdout_bytes`` and
    ``stderr_bytes`` are the kept sizes when nothing was cut, else None.
    """
    view: dict[str, Any] = {
        "task_id": info.task_id,
        "state": _STATE_NAMES.get(info.status, str(info.status)),
        "owner": info.owner,
        "command": list(info.command),
        "cwd": info.cwd,
        "created_at": _epoch(info.created_at),
        "started_at": _epoch(info.started_at) if info.HasField("started_at") else None,
        "ended_at": _epoch(info.completed_at) if info.HasField("completed_at") else None,
        "exit_code": None,
        "signal": None,
        "reason": info.reason,
        "stdout_bytes": None,
        "stderr_bytes": None,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "cpu_time_s": 0.0,
        "max_rss_bytes": 0,
        "duration_s": None,
    }
    if result is None:
        return view
    stdout = result.stdout_raw if result.HasField("stdout_raw") else result.stdout.encode()
    stderr = result.stderr_raw if result.HasField("stderr_raw") else result.stderr.encode()
    view.update(
        exit_code=None if result.exit_code == -1 else result.exit_code,
        signal=result.signal if result.HasField("signal") else None,
        stdout_bytes=None if result.stdout_truncated else len(stdout),
        stderr_bytes=None if result.stderr_truncated else len(stderr),
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
        cpu_time_s=result.resource_usage.cpu_time_ms / 1000,
        max_rss_bytes=result.resource_usage.max_memory_kb * 1024,
        duration_s=result.execution_time_ms / 1000 if view["started_at"] is not None else None,
    )
    if with_output:
        view.update(output_fields(stdout, "stdout"))
        view.update(output_fields(stderr, "stderr"))
    return view


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class AsyncGrpcClient(_AsyncBase):
    """Async gRPC client; use as ``async with AsyncGrpcClient("host:port", token) as c``.

    ``target`` is ``host:port`` (a ``grpc://`` or ``grpcs://`` prefix is
    accepted).  TLS is used when ``tls`` is true or any of the PEM file paths
    is given (``root_certificates`` for the server's CA, ``private_key`` and
    ``certificate_chain`` for a client certificate).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        *,
        timeout_s: float = 300.0,
        retries: int = 2,
        connect_timeout_s: float = 10.0,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
    ) -> None:
        for prefix in ("grpcs://", "grpc://"):
            if target.startswith(prefix):
                tls = tls or prefix == "grpcs://"
                target = target.removeprefix(prefix)
        self._target = target.rstrip("/")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout_s
        self._retries = retries
        self._connect_timeout = connect_timeout_s
        self._credentials: grpc.ChannelCredentials | None = None
        if tls or root_certificates or private_key or certificate_chain:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(root_certificates),
                private_key=_read(private_key),
                certificate_chain=_read(certificate_chain),
            )
        self._channel: grpc.aio.Channel | None = None
        self._stub: mcp_pb2_grpc.McpServiceAsyncStub | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def _ready_stub(self) -> mcp_pb2_grpc.McpServiceAsyncStub:
        """The stub, once the channel is connected (nothing is sent before that).

        Waits up to ``connect_timeout_s`` while gRPC (re)connects with backoff;
        raises :class:`Unavailable` if the server stays unreachable.
        """
        if self._channel is None or self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(
                    self._target, self._credentials, options=_CHANNEL_OPTIONS
                )
            self._stub = mcp_pb2_grpc.McpServiceStub(self._channel)
        if self._channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            try:
                await asyncio.wait_for(self._channel.channel_ready(), self._connect_timeout)
            except TimeoutError as exc:
                raise Unavailable(
                    f"cannot connect to {self._target} within {self._connect_timeout:g}s"
                ) from exc
        return self._stub

    async def _call(
        self,
        name: str,
        call: Callable[[mcp_pb2_grpc.McpServiceAsyncStub], Awaitable[_T]],
    ) -> _T:
        """Run one unary call; repeat it on UNAVAILABLE only if ``name`` is idempotent."""
        attempt = 0
        while True:
            stub = await self._ready_stub()
            try:
                return await call(stub)
            except grpc.aio.AioRpcError as exc:
                error = grpc_error(exc)
                if (
                    not isinstance(error, Unavailable)
                    or name not in IDEMPOTENT
                    or attempt >= self._retries
                ):
                    raise error from None
            attempt += 1
            await asyncio.sleep(_backoff(attempt))

    # -- commands and tasks ----------------------------------------------------------

    async def execute(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        wait: bool = False,
    ) -> dict[str, Any]:
        """Start a command; never repeated once sent.  ``timeout`` is rounded up
        to whole seconds (the proto field is an integer)."""
        body = execute_body(
            command, args, cwd=cwd, env=env, timeout=timeout, stdin=stdin, wait=wait
        )
        request = mcp_pb2.CommandRequest(
            command=body["command"],
            args=body["args"],
            env=body.get("env", {}),
            wait=wait,
        )
        if "cwd" in body:
            request.cwd = body["cwd"]
        if timeout is not None:
            request.timeout = max(1, math.ceil(timeout))
        if stdin is not None:
            request.stdin = stdin if isinstance(stdin, bytes) else stdin.encode()
        response = await self._call(
            "execute",
            lambda s: s.ExecuteCommand(request, metadata=self._metadata, timeout=self._timeout),
        )
        result = response.result if response.HasField("result") else None
        return task_dict(response.task_info, result, with_output=wait and result is not None)

    async def status(self, task_id: str, *, output: bool = False) -> dict[str, Any]:
        request = mcp_pb2.TaskStatusRequest(task_id=task_id)
        response = await self._call(
            "status",
            lambda s: s.GetTaskStatus(request, metadata=self._metadata, timeout=self._timeout),
        )
        result = response.result if response.HasField("result") else None
        return task_dict(response.task_info, result, with_output=output)

    async def stream_output(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"stream", "offset", "data"}`` chunks, then ``{"event": "end", ...}``.

        The start is retried on UNAVAILABLE until the first chunk arrived.
        """
        request = mcp_pb2.TaskStatusRequest(task_id=task_id)
        attempt = 0
        received = False
        while True:
            stub = await self._ready_stub()
            stream = stub.StreamTaskOutput(request, metadata=self._metadata, timeout=self._timeout)
            try:
                async for chunk in stream:
                    received = True
                    if chunk.type in _STREAMS:
                        line: dict[str, Any] = {
                            "stream": _STREAMS[chunk.type],
                            "offset": chunk.offset,
                        }
                        line.update(output_fields(chunk.data, "data"))
                        yield line
                    elif chunk.type == mcp_pb2.CHUNK_EXIT_CODE:
                        break
                break
            except grpc.aio.AioRpcError as exc:
                error = grpc_error(exc)
                if not isinstance(error, Unavailable) or received or attempt >= self._retries:
                    raise error from None
            finally:
                stream.cancel()
            attempt += 1
            await asyncio.sleep(_backoff(attempt))
        yield {"event": "end", **await self.status(task_id)}

    async def cancel(self, task_id: str) -> dict[str, Any]:
        request = mcp_pb2.TaskStatusRequest(task_id=task_id)
        response = await self._call(
            "cancel",
            lambda s: s.CancelTask(request, metadata=self._metadata, timeout=self._timeout),
        )
        result = response.result if response.HasField("result") else None
        return task_dict(response.task_info, result, with_output=False)

    # -- files ------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        request = mcp_pb2.ReadFileRequest(path=path)
        response = await self._call(
            "read_file",
            lambda s: s.ReadFile(request, metadata=self._metadata, timeout=self._timeout),
        )
        return response.content

    async def write_file(
        self, path: str, data: bytes, *, mode: int = 0o644, create_dirs: bool = False
    ) -> dict[str, Any]:
        request = mcp_pb2.WriteFileRequest(
            path=path, content=data, mode=mode, create_dirs=create_dirs
        )
        response = await self._call(
            "write_file",
            lambda s: s.WriteFile(request, metadata=self._metadata, timeout=self._timeout),
        )
        return {"path": response.path, "bytes": response.bytes_written}

    async def delete_file(self, path: str, *, recursive: bool = False) -> dict[str, Any]:
        request = mcp_pb2.DeleteFileRequest(path=path, recursive=recursive)
        response = await self._call(
            "delete_file",
            lambda s: s.DeleteFile(request, metadata=self._metadata, timeout=self._timeout),
        )
        return {"path": response.path, "deleted": response.success}

    async def list_files(self, path: str = "") -> list[dict[str, Any]]:
        request = mcp_pb2.ListFilesRequest(path=path)
        response = await self._call(
            "list_files",
            lambda s: s.ListFiles(request, metadata=self._metadata, timeout=self._timeout),
        )
        return [
            {
                "name": e.name,
                "type": e.type,
                "size": e.size,
                "mode": f"{e.mode:o}",
                "mtime": e.mtime,
            }
            for e in response.entries
        ]


# -- blocking twins ------------------------------------------------------------------


class _Blocking:
    """A blocking client over an async one, running a private event loop."""

    _async: Any

    def __init__(self, inner: Callable[[], Any]) -> None:
        self._loop = asyncio.new_event_loop()
        # Created inside the loop: gRPC aio binds its channel to the running loop.
        self._async = self._loop.run_until_complete(_make(inner))

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Awaitable[_T]) -> _T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._async.close())
            self._loop.close()

    def execute(self, command: str, args: Sequence[str] = (), **kw: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._async.execute(command, args, **kw))
        return result

    def status(self, task_id: str, *, output: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._async.status(task_id, output=output))
        return result

    def wait(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._async.wait(task_id))
        return result

    def stream_output(self, task_id: str) -> Iterator[dict[str, Any]]:
        agen = aiter(self._async.stream_output(task_id))
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._run(aclose())

    def cancel(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._async.cancel(task_id))
        return result

    def read_file(self, path: str) -> bytes:
        result: bytes = self._run(self._async.read_file(path))
        return result

    def write_file(self, path: str, data: bytes, **kw: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._async.write_file(path, data, **kw))
        return result

    def delete_file(self, path: str, *, recursive: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._async.delete_file(path, recursive=recursive))
        return result

    def list_files(self, path: str = "") -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._run(self._async.list_files(path))
        return result


_B = TypeVar("_B", bound=_Blocking)


async def _make(factory: Callable[[], _T]) -> _T:
    return factory()


class Client(_Blocking):
    """Blocking twin of :class:`AsyncClient` (same arguments)."""

    _async: AsyncClient

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncClient(*args, **kwargs))

    @property
    def retried(self) -> int:
        """Requests repeated after a failure so far."""
        return self._async.retried


class GrpcClient(_Blocking):
    """Blocking twin of :class:`AsyncGrpcClient` (same arguments)."""

    _async: AsyncGrpcClient

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncGrpcClient(*args, **kwargs))


def connect(url: str, token: str | None = None, *, sync: bool = True, **kwargs: Any) -> Any:
    """A client for ``url``: REST for ``http(s)://``, gRPC for ``grpc(s)://host:port``.

    ``sync`` picks the blocking (default) or the async class; other keyword
    arguments go to its constructor.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return Client(url, token, **kwargs) if sync else AsyncClient(url, token, **kwargs)
    if scheme in ("grpc", "grpcs"):
        cls = GrpcClient if sync else AsyncGrpcClient
        return cls(url, token, **kwargs)
    raise ValueError(f"unsupported URL scheme {scheme!r}: use http(s):// or grpc(s)://")
