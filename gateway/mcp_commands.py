"""The command tools: run and wait (``shell_execute``) and long jobs (``job_*``).

Commands go through :meth:`~gateway.service.Gateway.execute` (policy, audit,
task queue, sandbox) exactly like ``POST /v1/commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, Field, StrictInt, StrictStr

from gateway.errors import McpError
from gateway.mcp_tool import (
    STRICT,
    WORKSPACE,
    Result,
    Tool,
    ToolCall,
    hints,
    text_result,
    ws_path,
)
from gateway.models import CommandSpec, TaskState
from gateway.schema import parse_execute, parse_task_id
from gateway.store import TaskRecord
from gateway.workspace import ROOT

log = structlog.get_logger("gateway.mcp")

DEFAULT_OUTPUT_READ = 64 * 1024
MAX_OUTPUT_READ = 1024 * 1024
MAX_JOBS_LISTED = 200

#: How often a waiting ``shell_execute`` reports progress when asked to.
PROGRESS_INTERVAL_S = 1.0

#: How often a waiting ``shell_execute`` checks that its HTTP client is still there.
DISCONNECT_POLL_S = 0.25


class ShellExecuteArgs(BaseModel):
    model_config = STRICT
    command: Annotated[
        list[StrictStr],
        Field(min_length=1, description="argv: program name then its arguments (no shell)"),
    ]
    directory: Annotated[
        StrictStr | None, Field(description="working directory relative to /workspace")
    ] = None
    stdin: Annotated[StrictStr | None, Field(description="text fed to standard input")] = None
    timeout: Annotated[float | None, Field(gt=0, description="seconds before the kill")] = None


def command_spec(call: ToolCall, args: ShellExecuteArgs) -> CommandSpec:
    """Validate the arguments as the REST body would be (InvalidArgument names the field)."""
    cwd = WORKSPACE
    if args.directory is not None:
        rel = ws_path(args.directory, field="directory")
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
    spec, _ = parse_execute(body, tasks=config.tasks, limits=config.sandbox.limits)
    return spec


async def _wait_watching(call: ToolCall, record: TaskRecord) -> TaskRecord:
    """Wait for the task; report progress if asked; cancel it if the client goes away.

    A cancelled wait (the client's ``notifications/cancelled``) cancels the
    task too: its process tree is killed and the cancellation audited.
    """
    waiter = asyncio.ensure_future(call.gateway.tasks.wait(record.id))
    loop = asyncio.get_running_loop()
    started = loop.time()
    reported = -math.inf
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
            now = loop.time()
            if call.progress is not None and now - reported >= PROGRESS_INTERVAL_S:
                reported = now
                await _report(call, record, round(now - started, 3))
    except asyncio.CancelledError:
        await asyncio.shield(_cancel_quietly(call, record.id))
        raise
    finally:
        if not waiter.done():
            waiter.cancel()


async def _report(call: ToolCall, record: TaskRecord, elapsed: float) -> None:
    """One progress notification: seconds elapsed out of the timeout, output so far."""
    assert call.progress is not None  # noqa: S101 - the caller checked
    tasks = call.gateway.tasks
    size = len(tasks.output(record.id, "stdout")) + len(tasks.output(record.id, "stderr"))
    state = tasks.get(record.id).state
    await call.progress(elapsed, record.timeout_s or None, f"{state}, {size} bytes of output")


async def _cancel_quietly(call: ToolCall, task_id: str) -> None:
    with contextlib.suppress(McpError):
        await call.gateway.cancel(call.subject, task_id, call.ctx)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


async def shell_execute(call: ToolCall, args: ShellExecuteArgs) -> Result:
    spec = command_spec(call, args)
    record = await call.gateway.execute(call.subject, spec, call.ctx)
    record = await _wait_watching(call, record)
    summary = record.summary()
    out, err = _decode(record.stdout), _decode(record.stderr)
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
    return text_result("\n".join(lines), error=failed, structured=structured)


class TaskIdArgs(BaseModel):
    model_config = STRICT
    task_id: Annotated[StrictStr, Field(description="the id job_start returned")]


class JobOutputArgs(TaskIdArgs):
    stream: Annotated[Literal["stdout", "stderr"], Field(description="which stream")] = "stdout"
    offset: Annotated[StrictInt, Field(ge=0, description="first byte to return")] = 0
    length: Annotated[
        StrictInt, Field(ge=1, le=MAX_OUTPUT_READ, description="at most this many bytes")
    ] = DEFAULT_OUTPUT_READ


class JobListArgs(BaseModel):
    model_config = STRICT
    limit: Annotated[StrictInt, Field(ge=1, le=MAX_JOBS_LISTED, description="newest N")] = 50


def _job_view(record: TaskRecord) -> dict[str, Any]:
    summary = record.summary()
    return {
        "task_id": record.id,
        "state": str(record.state),
        "command": list(record.argv),
        "created_at": record.created_at,
        "exit_code": record.exit_code,
        "duration_s": summary["duration_s"],
        "reason": record.reason,
    }


async def job_start(call: ToolCall, args: ShellExecuteArgs) -> Result:
    spec = command_spec(call, args)
    record = await call.gateway.execute(call.subject, spec, call.ctx)
    view = _job_view(record)
    return text_result(f"started task {record.id} ({record.state})", structured=view)


async def job_output(call: ToolCall, args: JobOutputArgs) -> Result:
    task_id = parse_task_id(args.task_id)
    record, data, total = await call.gateway.read_output(
        call.subject,
        task_id,
        call.ctx,
        stream=args.stream,
        offset=args.offset,
        length=args.length,
    )
    next_offset = args.offset + len(data)
    ended = record.state.terminal
    truncated = record.stdout_truncated if args.stream == "stdout" else record.stderr_truncated
    structured = {
        "task_id": task_id,
        "state": str(record.state),
        "stream": args.stream,
        "offset": args.offset,
        "data": _decode(data),
        "bytes": len(data),
        "next_offset": next_offset,
        "total": total,
        "eof": ended and next_offset >= total,
        "exit_code": record.exit_code,
        "truncated": truncated,
    }
    head = (
        f"{args.stream} bytes {args.offset}..{next_offset} of {total}"
        f"{'' if ended else ' so far'}; state: {record.state}"
    )
    if ended:
        head += f", exit code: {record.exit_code}"
    return text_result(f"{head}\n{_decode(data)}", structured=structured)


async def job_terminate(call: ToolCall, args: TaskIdArgs) -> Result:
    record = await call.gateway.cancel(call.subject, parse_task_id(args.task_id), call.ctx)
    view = _job_view(record)
    return text_result(f"task {record.id}: {record.state} ({record.reason})", structured=view)


async def job_list(call: ToolCall, args: JobListArgs) -> Result:
    records = await call.gateway.list_tasks(call.subject, call.ctx, args.limit)
    jobs = [_job_view(r) for r in records]
    lines = [f"{j['task_id']} {j['state']} {' '.join(j['command'])}" for j in jobs]
    return text_result("\n".join(lines) or "no jobs", structured={"jobs": jobs})


_JOB: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string"},
        "state": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "created_at": {"type": "number"},
        "exit_code": {"type": ["integer", "null"]},
        "duration_s": {"type": ["number", "null"]},
        "reason": {"type": "string"},
    },
    "required": ["task_id", "state", "command"],
}

_OUTPUT_SLICE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string"},
        "state": {"type": "string"},
        "stream": {"type": "string", "enum": ["stdout", "stderr"]},
        "offset": {"type": "integer"},
        "data": {"type": "string"},
        "bytes": {"type": "integer"},
        "next_offset": {"type": "integer"},
        "total": {"type": "integer"},
        "eof": {"type": "boolean"},
        "exit_code": {"type": ["integer", "null"]},
        "truncated": {"type": "boolean"},
    },
    "required": ["task_id", "state", "stream", "offset", "data", "next_offset", "total", "eof"],
}

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

COMMAND_TOOLS: tuple[Tool, ...] = (
    Tool(
        "shell_execute",
        "Run a command (argv, no shell) in the caller's sandboxed workspace and wait "
        "for it; policy decides which programs are allowed.",
        ShellExecuteArgs,
        shell_execute,
        hints(read_only=False, destructive=True, idempotent=False),
        _EXEC_OUTPUT,
        ("command.execute",),
    ),
    Tool(
        "job_start",
        "Start a long command (argv, no shell) in the sandboxed workspace without waiting; "
        "returns its task_id for job_output, job_terminate and job_list.",
        ShellExecuteArgs,
        job_start,
        hints(read_only=False, destructive=True, idempotent=False),
        _JOB,
        ("command.execute",),
    ),
    Tool(
        "job_output",
        "Read a job's stdout or stderr from a byte offset (what exists so far while it "
        "runs); next_offset continues, eof says the job ended and everything was read.",
        JobOutputArgs,
        job_output,
        hints(read_only=True),
        _OUTPUT_SLICE,
        ("task.read",),
    ),
    Tool(
        "job_terminate",
        "Stop a queued or running job: its whole process tree is killed.",
        TaskIdArgs,
        job_terminate,
        hints(read_only=False, destructive=True, idempotent=False),
        _JOB,
        ("task.cancel",),
    ),
    Tool(
        "job_list",
        "The caller's own jobs, newest first, with state and exit code.",
        JobListArgs,
        job_list,
        hints(read_only=True),
        {
            "type": "object",
            "properties": {"jobs": {"type": "array", "items": _JOB}},
            "required": ["jobs"],
        },
        ("task.read",),
    ),
)
