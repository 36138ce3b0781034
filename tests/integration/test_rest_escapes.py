"""The escape battery of ``escape_cases`` run through the public REST API.

Each case is sent as ``POST /v1/commands`` by a developer, so it passes the
real token check, the real policy and the audit log before the real sandbox
runs it.  Shell and Python snippets are uploaded with ``PUT /v1/files`` and
run as script files (``sh case.sh`` / ``python3 case.py``), which the default
policy allows developers, exactly as an agent would get code past argument
rules; so the *sandbox* is what is tested.
Per-case limits are the gateway's configured caps for that case.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.audit import verify_file
from tests.conftest import USERS, make_config
from tests.integration.escape_cases import (
    ESCAPE_CASES,
    BaitListeners,
    EscapeCase,
    HostContext,
    Outcome,
)

pytestmark = pytest.mark.integration

SECRET_ENV = "MCP_REST_ESCAPE_SECRET"
BASE_LIMITS: dict[str, Any] = {
    "timeout_s": 20.0,
    "memory_bytes": 256 << 20,
    "pids": 64,
    "output_bytes": 1 << 20,
}


def as_script(case: EscapeCase, ctx: HostContext) -> tuple[str, str, str]:
    """(interpreter, script file name, script text) for one case."""
    argv = [ctx.fill(arg) for arg in case.argv]
    if argv[0] in ("/bin/sh", "sh") and argv[1] == "-c":
        return "sh", "case.sh", argv[2]
    if argv[0] == "python3" and argv[1] == "-c":
        return "python3", "case.py", argv[2]
    return "sh", "case.sh", "exec " + shlex.join(argv) + "\n"


def outcome(task: dict[str, Any]) -> Outcome:
    def data(name: str) -> bytes:
        if name in task:
            return str(task[name]).encode()
        return base64.b64decode(task.get(f"{name}_base64", ""))

    failed_to_start = task["state"] == "FAILED" and task["signal"] is None
    return Outcome(
        exit_code=task["exit_code"],
        signal=task["signal"],
        stdout=data("stdout"),
        stderr=data("stderr"),
        timed_out=task["state"] == "TIMED_OUT",
        cancelled=task["state"] == "CANCELLED",
        stdout_bytes=task["stdout_bytes"],
        stdout_truncated=task["stdout_truncated"],
        error=task["reason"] if failed_to_start else None,
    )


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv(SECRET_ENV, value)
    return value


@pytest.fixture
def bait() -> Iterator[BaitListeners]:
    listeners = BaitListeners("mcp-rest-escape-")
    yield listeners
    listeners.close()


@pytest.mark.parametrize("case", ESCAPE_CASES, ids=lambda case: case.name)
async def test_escape_is_contained_via_rest(
    case: EscapeCase, state_dir: Path, secret: str, bait: BaitListeners
) -> None:
    """Each escape attempt, sent through REST by a developer, is contained."""
    limits = {**BASE_LIMITS, **case.limits}
    config = make_config(
        state_dir,
        sandbox={
            "cgroup_parent": f"mcp-rest-escape-{os.getpid()}",
            "limits": {**limits, "max_timeout_s": 60},
        },
    )
    workspaces = state_dir / "workspaces"
    other = workspaces / "bob"
    other.mkdir(parents=True, mode=0o700)
    (other / "secret.txt").write_text(secret)
    (workspaces / "alice").mkdir(mode=0o700)

    ctx = HostContext(
        token=USERS["alice"][0],
        secret=secret,
        secret_env=SECRET_ENV,
        workspace=str(workspaces / "alice"),
        other_workspace=str(other),
        host_port=bait.port,
        abstract_name=bait.abstract_name,
        connections=bait.connections,
        cgroup_controllers=frozenset({"memory", "pids", "cpu"}),
        gateway_is_root=os.geteuid() == 0,
    )
    server = TestServer(build_app(config), host="127.0.0.1")
    await server.start_server()
    headers = {"Authorization": f"Bearer {USERS['alice'][0]}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            interpreter, name, script = as_script(case, ctx)
            async with http.put(
                server.make_url(f"/v1/files/escape/{name}"),
                params={"create_dirs": "true"},
                data=script.encode(),
            ) as r:
                assert r.status == 201, await r.text()
            body = {
                "command": interpreter,
                "args": [f"escape/{name}"],
                "timeout": limits["timeout_s"],
            }
            wait = case.cancel_after_s is None
            async with http.post(server.make_url("/v1/commands"), json={**body, "wait": wait}) as r:
                task = await r.json()
                assert r.status in (200, 202), task
            if not wait:
                await asyncio.sleep(case.cancel_after_s or 0)
                async with http.post(server.make_url(f"/v1/tasks/{task['task_id']}/cancel")) as r:
                    assert r.status == 200, await r.text()
                async with http.get(
                    server.make_url(f"/v1/tasks/{task['task_id']}"), params={"output": "true"}
                ) as r:
                    task = await r.json()
    finally:
        await server.close()
    result = outcome(task)
    assert result.error is None, task
    case.check(result, ctx)
    if case.after is not None:
        case.after(ctx)
    assert verify_file(state_dir / "audit.log").ok
