"""gateway.client against a real gateway process: REST and gRPC, async and sync."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.client import (
    AsyncClient,
    AsyncGrpcClient,
    Client,
    GrpcClient,
    connect,
    decode_output,
)
from gateway.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from tests.conftest import USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

TOKEN = USERS["alice"][0]
KINDS = ["rest-async", "rest-sync", "grpc-async", "grpc-sync"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("client")
    state = work / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), work)
    gw.start()
    yield gw
    gw.stop()


class Driver:
    """One awaitable face over the four clients.

    Async clients are awaited directly; sync clients run on one worker thread
    (their private event loop must not nest in the test's loop).
    """

    def __init__(self, kind: str, gw: GatewayProcess, **kw: Any) -> None:
        self.kind = kind
        self._gw = gw
        self._kw = kw
        self._client: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def _sync(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    async def open(self) -> None:
        rest, grpc = self._gw.url, f"grpc://127.0.0.1:{self._gw.grpc_port}"
        if self.kind == "rest-async":
            self._client = AsyncClient(rest, TOKEN, **self._kw)
        elif self.kind == "grpc-async":
            self._client = AsyncGrpcClient(grpc, TOKEN, **self._kw)
        else:
            cls = Client if self.kind == "rest-sync" else GrpcClient
            target = rest if self.kind == "rest-sync" else grpc
            self._client = await self._sync(cls, target, TOKEN, **self._kw)

    async def close(self) -> None:
        if self.kind.endswith("async"):
            await self._client.close()
        else:
            await self._sync(self._client.close)
        self._pool.shutdown()

    async def call(self, name: str, *args: Any, **kw: Any) -> Any:
        method = getattr(self._client, name)
        if self.kind.endswith("async"):
            return await method(*args, **kw)
        return await self._sync(method, *args, **kw)

    async def stream(self, task_id: str) -> list[dict[str, Any]]:
        if self.kind.endswith("async"):
            return [line async for line in self._client.stream_output(task_id)]
        result: list[dict[str, Any]] = await self._sync(
            lambda: list(self._client.stream_output(task_id))
        )
        return result


@pytest.fixture(params=KINDS)
async def client(request: pytest.FixtureRequest, gateway: GatewayProcess) -> AsyncIterator[Driver]:
    driver = Driver(request.param, gateway)
    await driver.open()
    yield driver
    await driver.close()


async def wait_state(client: Driver, task_id: str, state: str) -> None:
    for _ in range(300):
        if (await client.call("status", task_id))["state"] == state:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"task never reached {state}")


async def test_execute_wait_hello_world(client: Driver) -> None:
    """execute(wait=True) returns the ended task with its output, REST-shaped."""
    task = await client.call("execute", "echo", ["hello world"], wait=True)
    assert task["state"] == "COMPLETED"
    assert task["exit_code"] == 0
    assert task["stdout"] == "hello world\n"
    assert task["stderr"] == ""
    assert task["stdout_truncated"] is False
    assert task["command"] == ["echo", "hello world"]
    assert isinstance(task["created_at"], float)


async def test_execute_then_wait(client: Driver) -> None:
    """execute returns at once; wait follows the task to its end."""
    task = await client.call("execute", "seq", ["3"])
    assert task["state"] in {"CREATED", "QUEUED", "RUNNING", "COMPLETED"}
    assert task["task_id"]
    done = await client.call("wait", task["task_id"])
    assert (done["state"], done["exit_code"], done["stdout"]) == ("COMPLETED", 0, "1\n2\n3\n")


async def test_stdin_bytes_and_binary_output(client: Driver) -> None:
    """bytes stdin reaches the command; non-UTF-8 output comes back as base64."""
    data = b"\xff\x00binary\n"
    task = await client.call("execute", "cat", stdin=data, wait=True)
    assert "stdout" not in task
    assert decode_output(task, "stdout") == data


async def test_stream_output_chunks_and_end(client: Driver) -> None:
    """stream_output yields offset-tagged chunks and one final end event."""
    task = await client.call("execute", "ls", ["/definitely-missing", "/"])
    lines = await client.stream(task["task_id"])
    end = lines[-1]
    assert end["event"] == "end"
    assert end["task_id"] == task["task_id"]
    assert end["exit_code"] == 2
    chunks = lines[:-1]
    assert chunks
    assert all(set(c) >= {"stream", "offset"} for c in chunks)
    stdout = b"".join(decode_output(c, "data") for c in chunks if c["stream"] == "stdout")
    stderr = b"".join(decode_output(c, "data") for c in chunks if c["stream"] == "stderr")
    assert b"definitely-missing" in stderr
    assert b"usr" in stdout
    offsets = [c["offset"] for c in chunks if c["stream"] == "stdout"]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0


async def test_cancel_sleeping_task(client: Driver) -> None:
    """cancel ends a running task as CANCELLED."""
    task = await client.call("execute", "sleep", ["30"])
    await wait_state(client, task["task_id"], "RUNNING")
    await client.call("cancel", task["task_id"])
    done = await client.call("wait", task["task_id"])
    assert done["state"] == "CANCELLED"


async def test_policy_deny_raises_permission_denied(client: Driver) -> None:
    """A policy deny is PermissionDenied with the policy's reasons."""
    with pytest.raises(PermissionDenied) as info:
        await client.call("execute", "sh", ["-c", "id"], wait=True)
    assert info.value.reasons


async def test_bad_input_raises_invalid_argument_with_field(client: Driver) -> None:
    """Bad input is InvalidArgument naming the field, on both transports."""
    with pytest.raises(InvalidArgument) as info:
        await client.call("execute", "echo", ["x"], cwd="/etc")
    assert info.value.field == "cwd"
    with pytest.raises(InvalidArgument) as info:
        await client.call("status", "not-a-task-id")
    assert info.value.field == "task_id"


async def test_unknown_task_raises_not_found(client: Driver) -> None:
    """A well-formed but unknown task id is NotFound."""
    with pytest.raises(NotFound):
        await client.call("status", "0" * 32)
    with pytest.raises(NotFound):
        await client.stream("0" * 32)


async def test_file_round_trip_binary(client: Driver) -> None:
    """write, read, list and delete binary data; a deleted file is NotFound."""
    data = bytes(range(256)) * 4
    folder = f"rt-{client.kind}"
    written = await client.call("write_file", f"{folder}/data.bin", data, create_dirs=True)
    assert written["bytes"] == len(data)
    assert await client.call("read_file", f"{folder}/data.bin") == data
    entries = await client.call("list_files", folder)
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [("data.bin", "file", 1024)]
    assert (await client.call("delete_file", folder, recursive=True))["deleted"] is True
    with pytest.raises(NotFound):
        await client.call("read_file", f"{folder}/data.bin")


@pytest.mark.parametrize("kind", KINDS)
async def test_client_created_before_server_retries_idempotent_read(
    kind: str, tmp_path: Path
) -> None:
    """A client made before the gateway listens succeeds once it does (reads retry)."""
    state = tmp_path / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), tmp_path)
    starter = threading.Timer(0.5, gw.start)
    driver = Driver(kind, gw, retries=30)
    await driver.open()
    try:
        starter.start()
        t0 = time.monotonic()
        assert await driver.call("list_files") == []
        assert time.monotonic() - t0 > 0.3
    finally:
        await driver.close()
        starter.join()
        gw.stop()


async def test_grpc_unreachable_execute_is_unavailable_not_sent(tmp_path: Path) -> None:
    """With no server, execute fails as Unavailable after the connect timeout."""
    from tests.integration.gateway_proc import free_port

    async with AsyncGrpcClient(f"127.0.0.1:{free_port()}", TOKEN, connect_timeout_s=0.5) as client:
        with pytest.raises(Unavailable, match="cannot connect"):
            await client.execute("echo", ["x"])


def test_connect_picks_transport(gateway: GatewayProcess) -> None:
    """connect() chooses REST for http:// and gRPC for grpc://."""
    with connect(gateway.url, TOKEN) as rest:
        assert isinstance(rest, Client)
        assert rest.execute("echo", ["r"], wait=True)["stdout"] == "r\n"
    with connect(f"grpc://127.0.0.1:{gateway.grpc_port}", TOKEN) as grpc_client:
        assert isinstance(grpc_client, GrpcClient)
        assert grpc_client.execute("echo", ["g"], wait=True)["stdout"] == "g\n"
    assert isinstance(connect(gateway.url, TOKEN, sync=False), AsyncClient)
    with pytest.raises(ValueError, match="scheme"):
        connect("ftp://x", TOKEN)


def test_rest_and_grpc_return_the_same_shapes(gateway: GatewayProcess) -> None:
    """One task seen through both transports: same keys, same values where exact."""
    grpc_target = f"grpc://127.0.0.1:{gateway.grpc_port}"
    with Client(gateway.url, TOKEN) as rest, GrpcClient(grpc_target, TOKEN) as rpc:
        task = rest.execute("echo", ["same"], wait=True)
        via_rest, via_grpc = rest.status(task["task_id"]), rpc.status(task["task_id"])
        assert set(via_rest) == set(via_grpc)
        for key in ("task_id", "state", "owner", "command", "cwd", "exit_code", "reason"):
            assert via_rest[key] == via_grpc[key], key
        assert via_rest["created_at"] == pytest.approx(via_grpc["created_at"], abs=1e-3)
        assert set(rest.status(task["task_id"], output=True)) == set(
            rpc.status(task["task_id"], output=True)
        )
        rest_end, grpc_end = (
            list(rest.stream_output(task["task_id"])),
            list(rpc.stream_output(task["task_id"])),
        )
        assert rest_end[:-1] == grpc_end[:-1]
        assert set(rest_end[-1]) == set(grpc_end[-1])
        assert rest.list_files() == rpc.list_files()
