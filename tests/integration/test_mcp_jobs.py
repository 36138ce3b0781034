"""Long jobs over /mcp (job_start, job_output, job_terminate, job_list) with the SDK client.

The jobs are real sandboxed tasks of the task manager; ownership is decided
by the real policy (task.read / task.cancel: "own" for developers).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mcp import ClientSession

from gateway.models import TaskState
from gateway.rest import GATEWAY
from tests.integration.conftest import Api
from tests.integration.mcp_sdk import connect, text
from tests.integration.test_mcp_files import audit_events, ok

pytestmark = pytest.mark.integration


async def structured(client: ClientSession, tool: str, arguments: dict[str, Any]) -> Any:
    result = await client.call_tool(tool, arguments)
    assert result.isError is False, text(result)
    assert result.structuredContent is not None
    return result.structuredContent


async def until_ended(client: ClientSession, task_id: str) -> dict[str, Any]:
    for _ in range(200):
        jobs = (await structured(client, "job_list", {}))["jobs"]
        (job,) = [j for j in jobs if j["task_id"] == task_id]
        if TaskState(job["state"]).terminal:
            return dict(job)
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not end")


async def test_start_then_read_output_in_slices(api: Api) -> None:
    async with connect(api) as client:
        started = await structured(client, "job_start", {"command": ["seq", "1", "1000"]})
        task_id = started["task_id"]
        assert started["state"] in ("QUEUED", "RUNNING")
        assert started["command"] == ["seq", "1", "1000"]
        job = await until_ended(client, task_id)
        assert (job["state"], job["exit_code"]) == ("COMPLETED", 0)
        first = await structured(client, "job_output", {"task_id": task_id, "length": 10})
        assert first["data"] == "1\n2\n3\n4\n5\n"
        assert (first["next_offset"], first["eof"]) == (10, False)
        expected = "".join(f"{i}\n" for i in range(1, 1001))
        assert first["total"] == len(expected)
        collected, offset = first["data"], first["next_offset"]
        while True:
            part = await structured(
                client, "job_output", {"task_id": task_id, "offset": offset, "length": 1000}
            )
            collected += part["data"]
            offset = part["next_offset"]
            if part["eof"]:
                break
        assert collected == expected
        err = await structured(client, "job_output", {"task_id": task_id, "stream": "stderr"})
        assert (err["data"], err["total"], err["eof"]) == ("", 0, True)


async def test_output_while_running_then_terminate(api: Api) -> None:
    """Output is readable while the job runs; terminate kills it and is audited."""
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "job.sh", "content": "echo started\nsleep 30\n"})
        task_id = (await structured(client, "job_start", {"command": ["sh", "job.sh"]}))["task_id"]
        for _ in range(200):
            out = await structured(client, "job_output", {"task_id": task_id})
            if out["data"]:
                break
            await asyncio.sleep(0.05)
        assert out["data"] == "started\n"
        assert out["state"] == "RUNNING"
        assert out["eof"] is False
        stopped = await structured(client, "job_terminate", {"task_id": task_id})
        assert stopped["state"] == "CANCELLED"
        again = await client.call_tool("job_terminate", {"task_id": task_id})
        assert again.isError is True
        assert "FAILED_PRECONDITION" in text(again)
        final = await structured(client, "job_output", {"task_id": task_id})
        assert final["eof"] is True
    record = api.server.app[GATEWAY].tasks.get(task_id)
    assert record.state == TaskState.CANCELLED
    assert record.ended_at is not None
    assert record.started_at is not None
    assert record.ended_at - record.started_at < 15
    events = [e["event"] for e in audit_events(api) if e.get("task_id") == task_id]
    assert events[-1] == "task.cancelled"


async def test_jobs_belong_to_their_owner(api: Api) -> None:
    async with connect(api) as alice:
        task_id = (await structured(alice, "job_start", {"command": ["echo", "mine"]}))["task_id"]
        await until_ended(alice, task_id)
    async with connect(api, "bob") as bob:
        peek = await bob.call_tool("job_output", {"task_id": task_id})
        assert peek.isError is True
        assert "PERMISSION_DENIED" in text(peek)
        assert "owned by 'alice'" in text(peek)
        kill = await bob.call_tool("job_terminate", {"task_id": task_id})
        assert kill.isError is True
        assert (await structured(bob, "job_list", {}))["jobs"] == []
    async with connect(api) as alice:
        listed = (await structured(alice, "job_list", {"limit": 5}))["jobs"]
        assert [j["task_id"] for j in listed] == [task_id]


async def test_job_errors_name_the_problem(api: Api) -> None:
    async with connect(api) as client:
        bad = await client.call_tool("job_output", {"task_id": "not-an-id"})
        assert bad.isError is True
        assert "field: task_id" in text(bad)
        unknown = api.server.app[GATEWAY].task_ids.tag + "0" * 24
        missing = await client.call_tool("job_output", {"task_id": unknown})
        assert missing.isError is True
        assert "NOT_FOUND" in text(missing)
        denied = await client.call_tool("job_start", {"command": ["nc", "-l", "80"]})
        assert denied.isError is True
        assert "PERMISSION_DENIED" in text(denied)
        assert (await structured(client, "job_list", {}))["jobs"] == []
