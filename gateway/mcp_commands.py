"""The command tools: run and wait (``shell_execute``) and long jobs.

Commands go through :meth:`~gateway.service.Gateway.execute` (policy, audit,
task queue, sandbox) exactly like ``POST /v1/commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import structlog
from pydantic import BaseModel, Field, StrictStr

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
from gateway.schema import parse_execute
from gateway.store import TaskRecord
from gateway.workspace import ROOT

log = structlog.get_logger("gateway.mcp")

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
)
