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
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.audit import verify_file
from tests.conftest import USERS, make_config
from tests.integration.escape_cases import ESCAPE_CASES, EscapeCase, HostContext, Outcome

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
async def bait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv(SECRET_ENV, secret)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    abstract_name = "mcp-rest-escape-" + secrets.token_hex(6)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + abstract_name)
    unix.listen(8)
    yield {"secret": secret, "tcp": tcp, "unix": unix, "abstract_name": abstract_name}
    tcp.close()
    unix.close()


@pytest.mark.parametrize("case", ESCAPE_CASES, ids=lambda case: case.name)
async def test_escape_is_contained_via_rest(
    case: EscapeCase, state_dir: Path, bait: dict[str, Any]
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
    (other / "secret.txt").write_text(bait["secret"])
    (workspaces / "alice").mkdir(mode=0o700)

    def connections() -> int:
        count = 0
        for sock in (bait["tcp"], bait["unix"]):
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
        return count

    ctx = HostContext(
        token=USERS["alice"][0],
        secret=bait["secret"],
        secret_env=SECRET_ENV,
        workspace=str(workspaces / "alice"),
        other_workspace=str(other),
        host_port=bait["tcp"].getsockname()[1],
        abstract_name=bait["abstract_name"],
        connections=connections,
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
