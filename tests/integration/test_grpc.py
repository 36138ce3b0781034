"""The gRPC adapter end to end: real port, real policy, bwrap, audit, SQLite."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import open_gateway
from gateway.auth import TokenAuthenticator
from gateway.errors import BY_CODE, ErrorCode
from gateway.grpc_server import GRPC_STATUS, McpServicer, start_grpc, stop
from gateway.proto import mcp_pb2, mcp_pb2_grpc
from gateway.service import Gateway
from tests.conftest import ROOT, USERS, make_config

pytestmark = pytest.mark.integration

GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


class Rpc:
    """A stub bound to one running gRPC server, with per-user metadata."""

    def __init__(self, gateway: Gateway, channel: grpc.aio.Channel, port: int) -> None:
        self.gateway = gateway
        self.channel = channel
        self.port = port
        self.stub = mcp_pb2_grpc.McpServiceStub(channel)

    @staticmethod
    def md(user: str | None = "alice") -> tuple[tuple[str, str], ...]:
        return () if user is None else (("authorization", f"Bearer {USERS[user][0]}"),)

    async def run(self, command: str, *args: str, **kw: Any) -> mcp_pb2.TaskCreatedResponse:
        req = mcp_pb2.CommandRequest(command=command, args=list(args), wait=True, **kw)
        response: mcp_pb2.TaskCreatedResponse = await self.stub.ExecuteCommand(
            req, metadata=self.md()
        )
        return response

    async def wait_running(self, task_id: str) -> None:
        req = mcp_pb2.TaskStatusRequest(task_id=task_id)
        for _ in range(200):
            status = await self.stub.GetTaskStatus(req, metadata=self.md())
            if status.task_info.status == mcp_pb2.TASK_RUNNING:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("task never ran")


@pytest.fixture
async def rpc(state_dir: Path) -> AsyncIterator[Rpc]:
    config = make_config(state_dir)
    async with open_gateway(config) as gateway:
        server, port = await start_grpc(
            gateway, TokenAuthenticator(config.auth.tokens), "127.0.0.1", 0
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Rpc(gateway, channel, port)
        finally:
            await stop(server, 1.0)


def trailing(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: str(v) for k, v in (err.trailing_metadata() or ())}


async def test_execute_wait_hello_world(rpc: Rpc) -> None:
    """echo runs in the sandbox; wait returns the result in the response."""
    resp = await rpc.run("echo", "hello world", timeout=30)
    assert resp.status == mcp_pb2.TASK_COMPLETED
    assert len(resp.task_id) == 32
    assert resp.result.exit_code == 0
    assert resp.result.stdout == "hello world\n"
    assert not resp.result.HasField("stdout_raw")
    assert resp.task_info.owner == "alice"
    assert list(resp.task_info.command) == ["echo", "hello world"]
    assert resp.created_at.endswith("+00:00")


async def test_execute_async_then_status(rpc: Rpc) -> None:
    """Without wait the task id comes back at once; GetTaskStatus follows it."""
    resp = await rpc.stub.ExecuteCommand(mcp_pb2.CommandRequest(command="true"), metadata=rpc.md())
    assert resp.status in (mcp_pb2.TASK_QUEUED, mcp_pb2.TASK_RUNNING)
    assert not resp.HasField("result")
    req = mcp_pb2.TaskStatusRequest(task_id=resp.task_id)
    for _ in range(200):
        status = await rpc.stub.GetTaskStatus(req, metadata=rpc.md())
        if status.task_info.status == mcp_pb2.TASK_COMPLETED:
            break
        await asyncio.sleep(0.02)
    assert status.task_info.status == mcp_pb2.TASK_COMPLETED
    assert status.HasField("result")
    assert status.result.exit_code == 0
    assert status.task_info.completed_at


async def test_env_cwd_stdin_exit_code(rpc: Rpc) -> None:
    """env and stdin reach the command; a non-zero exit is COMPLETED with its code."""
    resp = await rpc.run("cat", stdin=b"from stdin")
    assert resp.result.stdout == "from stdin"
    resp = await rpc.run("printenv", "GREETING", env={"GREETING": "hi"}, cwd="/workspace")
    assert resp.result.stdout == "hi\n"
    resp = await rpc.run("ls", "/definitely-missing")
    assert resp.status == mcp_pb2.TASK_COMPLETED
    assert resp.result.exit_code == 2
    assert "definitely-missing" in resp.result.stderr


async def test_policy_deny_is_permission_denied(rpc: Rpc) -> None:
    """An interpreter escape is denied: PERMISSION_DENIED with the reasons."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.run("sh", "-c", "id")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    md = trailing(info.value)
    assert md["mcp-error-code"] == "PERMISSION_DENIED"
    assert "mcp-error-reason" in md
    assert "denied by policy" in (info.value.details() or "")


async def test_network_request_goes_through_policy(rpc: Rpc) -> None:
    """sandbox_config.network_access is only a request; the bad enum is rejected."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.run(
            "true",
            sandbox_config=mcp_pb2.SandboxConfig(network_access=7),  # type: ignore[arg-type]
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(info.value)["mcp-error-field"] == "sandbox_config.network_access"
    resp = await rpc.run(
        "true", sandbox_config=mcp_pb2.SandboxConfig(network_access=mcp_pb2.NETWORK_NONE)
    )
    assert resp.status == mcp_pb2.TASK_COMPLETED


@pytest.mark.parametrize("user", [None, "nobody"])
async def test_missing_or_bad_token_is_unauthenticated(rpc: Rpc, user: str | None) -> None:
    md: tuple[tuple[str, str], ...] = (
        () if user is None else (("authorization", "Bearer not-a-token"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.ExecuteCommand(mcp_pb2.CommandRequest(command="true"), metadata=md)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert trailing(info.value)["mcp-error-code"] == "UNAUTHENTICATED"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.ListFiles(mcp_pb2.ListFilesRequest(), metadata=md)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty command", {"command": ""}, "command"),
    ("NUL in arg", {"command": "echo", "args": ["a", "b\x00"]}, "args[1]"),
    ("too many args", {"command": "echo", "args": ["x"] * 2000}, "args"),
    ("huge args", {"command": "echo", "args": ["x" * 100_000] * 2}, "args"),
    ("cwd outside", {"command": "true", "cwd": "/etc"}, "cwd"),
    ("bad env name", {"command": "true", "env": {"1BAD": "x"}}, "env.1BAD"),
    ("timeout too long", {"command": "true", "timeout": 10**6}, "timeout"),
]


@pytest.mark.parametrize(
    ("name", "fields", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
async def test_bad_input_is_invalid_argument(
    rpc: Rpc, name: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.ExecuteCommand(mcp_pb2.CommandRequest(**fields), metadata=rpc.md())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(info.value)["mcp-error-field"] == field
    assert (info.value.details() or "").startswith(field.split("[")[0])


async def test_task_ids_bad_and_unknown(rpc: Rpc) -> None:
    """A malformed id is INVALID_ARGUMENT; a well-formed unknown id is NOT_FOUND."""
    for method in (rpc.stub.GetTaskStatus, rpc.stub.CancelTask):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(mcp_pb2.TaskStatusRequest(task_id="nope"), metadata=rpc.md())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailing(info.value)["mcp-error-field"] == "task_id"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(mcp_pb2.TaskStatusRequest(task_id="0" * 32), metadata=rpc.md())
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in rpc.stub.StreamTaskOutput(
            mcp_pb2.TaskStatusRequest(task_id="0" * 32), metadata=rpc.md()
        ):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_other_subjects_task_is_denied(rpc: Rpc) -> None:
    resp = await rpc.run("true")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.GetTaskStatus(
            mcp_pb2.TaskStatusRequest(task_id=resp.task_id), metadata=rpc.md("bob")
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_stream_to_two_readers(rpc: Rpc) -> None:
    """Two readers follow the same output live; both get every byte and the end chunk."""
    resp = await rpc.stub.ExecuteCommand(
        mcp_pb2.CommandRequest(command="seq", args=["1", "20000"], timeout=20),
        metadata=rpc.md(),
    )

    async def read() -> tuple[bytes, mcp_pb2.TaskOutputChunk]:
        data = b""
        last = mcp_pb2.TaskOutputChunk()
        async for chunk in rpc.stub.StreamTaskOutput(
            mcp_pb2.TaskStatusRequest(task_id=resp.task_id), metadata=rpc.md()
        ):
            if chunk.type == mcp_pb2.CHUNK_STDOUT:
                assert chunk.offset == len(data)
                data += chunk.data
            last = chunk
        return data, last

    (a, end_a), (b, end_b) = await asyncio.gather(read(), read())
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert a == b == expected
    for end in (end_a, end_b):
        assert end.type == mcp_pb2.CHUNK_EXIT_CODE
        assert end.status == mcp_pb2.TASK_COMPLETED
        assert end.exit_code == 0
        assert end.data == b"0"


async def test_cancel_mid_stream(rpc: Rpc) -> None:
    """CancelTask kills a running task; the open stream ends with CANCELLED."""
    resp = await rpc.stub.ExecuteCommand(
        mcp_pb2.CommandRequest(command="sleep", args=["60"], timeout=120), metadata=rpc.md()
    )
    await rpc.wait_running(resp.task_id)
    req = mcp_pb2.TaskStatusRequest(task_id=resp.task_id)

    async def follow() -> list[mcp_pb2.TaskOutputChunk]:
        return [c async for c in rpc.stub.StreamTaskOutput(req, metadata=rpc.md())]

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    assert not reader.done()
    cancelled = await rpc.stub.CancelTask(req, metadata=rpc.md())
    assert cancelled.task_info.status == mcp_pb2.TASK_CANCELLED
    assert cancelled.HasField("result")
    chunks = await asyncio.wait_for(reader, 10)
    assert chunks[-1].type == mcp_pb2.CHUNK_EXIT_CODE
    assert chunks[-1].status == mcp_pb2.TASK_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.CancelTask(req, metadata=rpc.md())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_files_round_trip(rpc: Rpc) -> None:
    """Write, read, list and delete through the service layer, binary-safe."""
    data = bytes(range(256)) * 4
    md = rpc.md()
    written = await rpc.stub.WriteFile(
        mcp_pb2.WriteFileRequest(path="dir/blob.bin", content=data, create_dirs=True, mode=0o600),
        metadata=md,
    )
    assert written.bytes_written == len(data)
    read = await rpc.stub.ReadFile(mcp_pb2.ReadFileRequest(path="dir/blob.bin"), metadata=md)
    assert read.content == data
    assert read.mime_type == "application/octet-stream"
    part = await rpc.stub.ReadFile(
        mcp_pb2.ReadFileRequest(path="dir/blob.bin", offset=256, length=4), metadata=md
    )
    assert part.content == bytes(range(4))
    listing = await rpc.stub.ListFiles(mcp_pb2.ListFilesRequest(path="dir"), metadata=md)
    assert [(e.name, e.type, e.size, e.mode) for e in listing.entries] == [
        ("blob.bin", "file", len(data), 0o600)
    ]
    root = await rpc.stub.ListFiles(mcp_pb2.ListFilesRequest(), metadata=md)
    assert [e.name for e in root.entries] == ["dir"]
    deleted = await rpc.stub.DeleteFile(
        mcp_pb2.DeleteFileRequest(path="dir", recursive=True), metadata=md
    )
    assert deleted.success
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.ReadFile(mcp_pb2.ReadFileRequest(path="dir/blob.bin"), metadata=md)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_file_bad_input(rpc: Rpc) -> None:
    md = rpc.md()
    for call in (
        rpc.stub.ReadFile(mcp_pb2.ReadFileRequest(path=""), metadata=md),
        rpc.stub.WriteFile(mcp_pb2.WriteFileRequest(path="x", mode=0o4755), metadata=md),
        rpc.stub.ReadFile(mcp_pb2.ReadFileRequest(path="../../etc/passwd"), metadata=md),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
        ), info.value


async def test_health(rpc: Rpc) -> None:
    """Standard health says SERVING; McpService.Health needs no token."""
    stub: Any = health_pb2_grpc.HealthStub(rpc.channel)  # the stubs lack the methods
    for service in ("", "mcp.McpService"):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    own = await rpc.stub.Health(mcp_pb2.HealthRequest())
    assert own.status == "ok"
    assert own.version


async def test_stop_reports_not_serving(state_dir: Path) -> None:
    """stop() flips health to NOT_SERVING before the server goes away."""
    config = make_config(state_dir)
    async with open_gateway(config) as gateway:
        server, port = await start_grpc(
            gateway, TokenAuthenticator(config.auth.tokens), "127.0.0.1", 0
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack the methods
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="mcp.McpService"))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(stop(server, 2.0))
            second = await asyncio.wait_for(watch.read(), 5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            await stopping


def test_error_mapping_covers_every_code() -> None:
    assert set(GRPC_STATUS) == set(ErrorCode)


class _AbortedError(Exception):
    pass


class _FakeContext:
    """Just enough of a ServicerContext to observe abort()."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {USERS['alice'][0]}"),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str, md: Any) -> None:
        self.aborted = (code, details, md)
        raise _AbortedError


EXPECTED_STATUS = {
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


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
async def test_error_mapping_table(
    rpc: Rpc, monkeypatch: pytest.MonkeyPatch, code: ErrorCode
) -> None:
    """Each gateway error reaches a real client with its status and metadata."""
    error = BY_CODE[code](f"boom {code}", field="f", reasons=["r1", "r2"], retry_after=1.5)

    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(rpc.gateway, "task", fail)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc.stub.GetTaskStatus(mcp_pb2.TaskStatusRequest(task_id="a" * 32), metadata=rpc.md())
    assert info.value.code() == EXPECTED_STATUS[code]
    assert info.value.details() == f"boom {code}"
    md = list(info.value.trailing_metadata() or ())
    assert ("mcp-error-code", str(code)) in md
    assert ("mcp-error-field", "f") in md
    assert [v for k, v in md if k == "mcp-error-reason"] == ["r1", "r2"]
    assert ("mcp-retry-after", "2") in md
    assert any(k == "mcp-request-id" for k, _ in md)
    # the servicer on its own, too (no network)
    ctx = _FakeContext()
    with pytest.raises(_AbortedError):
        await McpServicer(rpc.gateway, TokenAuthenticator(())).GetTaskStatus(
            mcp_pb2.TaskStatusRequest(task_id="a" * 32),
            ctx,  # type: ignore[arg-type]
        )
    assert ctx.aborted is not None
    assert ctx.aborted[0] == grpc.StatusCode.UNAUTHENTICATED  # empty token table


def _grpcurl(port: int, *args: str) -> Any:
    if not GRPCURL.exists():
        pytest.fail(f"{GRPCURL} is missing: run `make grpcurl`")
    out = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-H",
            f"authorization: Bearer {USERS['alice'][0]}",
            *args[:-1],
            f"127.0.0.1:{port}",
            args[-1],
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def test_grpcurl_via_reflection(rpc: Rpc) -> None:
    """grpcurl with no proto file: ExecuteCommand, then GetTaskStatus with the id."""
    body = '{"command":"echo","args":["hello world"],"timeout":30}'
    created = await asyncio.to_thread(
        _grpcurl, rpc.port, "-d", body, "mcp.McpService/ExecuteCommand"
    )
    task_id = created["task_id"]
    assert len(task_id) == 32
    status: dict[str, Any] = {}
    for _ in range(100):
        status = await asyncio.to_thread(
            _grpcurl,
            rpc.port,
            "-d",
            json.dumps({"task_id": task_id}),
            "mcp.McpService/GetTaskStatus",
        )
        if status["task_info"]["status"] == "TASK_COMPLETED":
            break
        await asyncio.sleep(0.05)
    assert status["task_info"]["status"] == "TASK_COMPLETED"
    assert status["result"]["stdout"] == "hello world\n"
