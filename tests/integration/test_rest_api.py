"""The REST API end to end: real policy, real bwrap + seccomp, real audit file."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import sqlite3
import subprocess
from typing import Any

import pytest

from gateway.audit import verify_file
from tests.integration.conftest import Api

pytestmark = pytest.mark.integration


def audit_events(api: Api) -> list[dict[str, Any]]:
    lines = (api.state / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def survivors(token: str) -> list[str]:
    return subprocess.run(
        ["pgrep", "-f", token], capture_output=True, text=True, check=False
    ).stdout.split()


def task_count(api: Api) -> int:
    with sqlite3.connect(api.state / "tasks.db") as db:
        count: int = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
        return count


async def test_hello_world(api: Api) -> None:
    """The README example: echo runs in the sandbox and its output comes back."""
    body = await api.run("echo", "hello world")
    assert body["state"] == "COMPLETED"
    assert body["exit_code"] == 0
    assert body["stdout"] == "hello world\n"
    assert body["stdout_truncated"] is False
    assert body["duration_s"] > 0
    events = [e["event"] for e in audit_events(api)]
    # decision on disk before the task was queued and ran
    assert (
        events.index("policy.decision")
        < events.index("task.queued")
        < events.index("task.running")
        < events.index("task.completed")
    )
    assert verify_file(api.state / "audit.log").ok


async def test_async_submit_then_status(api: Api) -> None:
    """Without wait the API answers 202 and the task can be polled to completion."""
    status, body = await api.call("POST", "/v1/commands", json={"command": "true"})
    assert status == 202
    assert body["state"] in ("QUEUED", "RUNNING")
    task_id = body["task_id"]
    for _ in range(200):
        status, body = await api.call("GET", f"/v1/tasks/{task_id}")
        assert status == 200
        if body["state"] == "COMPLETED":
            break
        await asyncio.sleep(0.02)
    assert body["state"] == "COMPLETED"
    assert body["exit_code"] == 0


async def test_exit_code_and_stderr(api: Api) -> None:
    """Non-zero exits are COMPLETED with the code; stderr is kept apart."""
    body = await api.run("ls", "/definitely-missing")
    assert body["state"] == "COMPLETED"
    assert body["exit_code"] == 2
    assert "definitely-missing" in body["stderr"]


async def test_policy_deny_is_403_with_reasons(api: Api) -> None:
    """An interpreter escape is denied by policy: 403, reasons, audited, nothing ran."""
    before = task_count(api)
    status, body = await api.call(
        "POST", "/v1/commands", json={"command": "sh", "args": ["-c", "id"], "wait": True}
    )
    assert status == 403
    assert body["error"]["code"] == "PERMISSION_DENIED"
    assert body["error"]["reasons"]
    assert task_count(api) == before
    last = audit_events(api)[-1]
    assert last["event"] == "policy.decision"
    assert last["allow"] is False


def prestarts(metrics: str, result: str) -> float:
    """The ``mcp_sandbox_prestarts_total`` counter for ``result`` in a /metrics page."""
    return sample(metrics, f'mcp_sandbox_prestarts_total{{result="{result}"}}')


def sample(metrics: str, series: str) -> float:
    """One series' value in a /metrics page (0 if absent)."""
    prefix = series + " "
    values = [
        float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)
    ]
    return values[0] if values else 0.0


async def metrics_page(api: Api) -> str:
    status, raw = await api.call("GET", "/metrics", user=None)
    assert status == 200
    return bytes(raw).decode()


async def test_denied_command_begun_early_never_runs(api: Api) -> None:
    """bwrap is forked while the policy decides; a deny kills it before the command.

    The subject has a workspace (so the fork happens), the command would leave
    a file there and linger; after the 403 neither the file nor a process exists.
    """
    await api.run("true")  # alice's workspace exists from here on
    token = secrets.token_hex(6)
    before = prestarts(await metrics_page(api), "discarded")
    status, body = await api.call(
        "POST",
        "/v1/commands",
        json={"command": "sh", "args": ["-c", f"touch /workspace/{token}; sleep 30 # {token}"]},
    )
    assert status == 403, body
    assert prestarts(await metrics_page(api), "discarded") == before + 1
    await asyncio.sleep(0.5)  # time the command would have had to run
    assert not (api.state / "workspaces" / "alice" / token).exists()
    assert survivors(token) == []


async def test_a_subjects_next_commands_run_in_warm_sandboxes(api: Api) -> None:
    """After a first command, the subject's next ones find a sandbox set up and waiting.

    Counted by ``mcp_sandbox_starts_total{kind}``; the commands run as usual.
    """
    warm = 'mcp_sandbox_starts_total{kind="warm"}'
    cold = 'mcp_sandbox_starts_total{kind="cold"}'
    first = await api.run("echo", "one")
    assert first["stdout"] == "one\n"
    page = await metrics_page(api)
    warm_before, cold_before = sample(page, warm), sample(page, cold)
    assert cold_before >= 1
    for _ in range(3):
        await asyncio.sleep(0.3)  # a person or an agent between two commands
        task = await api.run("cat", "/proc/self/stat")
        assert task["stdout"].startswith("2 (cat) "), task  # pid 1's child, as ever
    page = await metrics_page(api)
    assert sample(page, warm) == warm_before + 3
    assert sample(page, cold) == cold_before


async def test_early_starts_stay_within_max_concurrent(api: Api) -> None:
    """With every slot busy nothing is begun early: a burst cannot multiply sandboxes."""
    await api.run("true")
    page = await metrics_page(api)
    submitted, discarded = prestarts(page, "submitted"), prestarts(page, "discarded")
    ids = []
    for _ in range(4):  # max_concurrent of the test config
        status, body = await api.call(
            "POST", "/v1/commands", json={"command": "sleep", "args": ["30"], "timeout": 60}
        )
        assert status == 202, body
        ids.append(body["task_id"])
    page = await metrics_page(api)
    assert prestarts(page, "submitted") == submitted + 4
    status, _ = await api.call("POST", "/v1/commands", json={"command": "true"})
    assert status == 202
    status, _ = await api.call("POST", "/v1/commands", json={"command": "sh", "args": ["-c", "id"]})
    assert status == 403
    page = await metrics_page(api)
    assert prestarts(page, "submitted") == submitted + 4
    assert prestarts(page, "discarded") == discarded
    for task_id in ids:
        await api.call("POST", f"/v1/tasks/{task_id}/cancel")


async def test_missing_token_is_401(api: Api) -> None:
    """No token, no access; the answer says how to authenticate."""
    status, body = await api.call("POST", "/v1/commands", user=None, json={"command": "true"})
    assert status == 401
    assert body["error"]["code"] == "UNAUTHENTICATED"


async def test_public_endpoints(api: Api) -> None:
    """/health, /ready, /metrics and /openapi.json answer; metrics carry our series."""
    status, body = await api.call("GET", "/health", user=None)
    assert (status, body["status"]) == (200, "ok")
    status, body = await api.call("GET", "/ready", user=None)
    assert status == 200, body
    assert body["ready"] is True
    assert body["checks"]["sandbox"]["ok"] is True
    await api.run("true")
    status, raw = await api.call("GET", "/metrics", user=None)
    text = raw.decode()
    assert "mcp_task_latency_ms_bucket" in text
    assert 'mcp_api_requests_total{code="OK",method="execute",transport="rest"}' in text
    assert 'mcp_policy_decisions_total{action="command.execute",result="allow"}' in text
    status, doc = await api.call("GET", "/openapi.json", user="alice")
    assert status == 200
    assert "/v1/commands" in doc["paths"]


BAD_BODIES: list[tuple[str, bytes | str, str]] = [
    ("malformed json", b'{"command": "echo",', "body"),
    ("not an object", b"[1,2,3]", "body"),
    ("empty body", b"", "body"),
    ("not utf-8", b"\xff\xfe{}", "body"),
    ("missing command", b'{"args": []}', "command"),
    ("wrong type", b'{"command": ["echo"]}', "command"),
    ("args wrong type", b'{"command": "echo", "args": [1]}', "args[0]"),
    ("nul in arg", b'{"command": "echo", "args": ["a\\u0000b"]}', "args[0]"),
    ("unknown field", b'{"command": "echo", "shell": true}', "shell"),
    ("huge argv", json.dumps({"command": "echo", "args": ["x"] * 5000}), "args"),
    ("bad timeout", b'{"command": "echo", "timeout": -5}', "timeout"),
    ("cwd escape", b'{"command": "echo", "cwd": "/workspace/../../etc"}', "cwd"),
]


@pytest.mark.parametrize(("name", "raw", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_input_is_400_naming_field(
    api: Api, name: str, raw: bytes | str, field: str
) -> None:
    """Bad bodies get a clear 400 naming the field, create no task, keep the chain valid."""
    before = task_count(api)
    status, body = await api.call(
        "POST", "/v1/commands", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400, body
    assert body["error"]["code"] == "INVALID_ARGUMENT"
    assert body["error"]["field"] == field
    assert "Traceback" not in json.dumps(body)
    assert task_count(api) == before
    assert audit_events(api)[-1]["event"] == "request.rejected"
    assert verify_file(api.state / "audit.log").ok


async def test_oversize_body_is_413(api: Api) -> None:
    """Bodies beyond server.max_body_bytes are refused before parsing."""
    big = io.BytesIO(json.dumps({"command": "echo", "args": ["x" * (9 * 1024 * 1024)]}).encode())
    status, body = await api.call(
        "POST", "/v1/commands", data=big, headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert body["error"]["field"] == "body"


@pytest.mark.parametrize(
    ("task_id", "status_code"),
    [("0" * 32, 404), ("nothex", 400), ("../../etc/passwd", 404)],
)
async def test_unknown_task_ids(api: Api, task_id: str, status_code: int) -> None:
    """Unknown ids are 404; malformed ids are 400 naming task_id."""
    status, body = await api.call("GET", f"/v1/tasks/{task_id}")
    assert status == status_code, body
    if status_code == 400:
        assert body["error"]["field"] == "task_id"


async def test_other_subjects_task_is_denied(api: Api) -> None:
    """bob may not read or cancel alice's task; an admin may read it."""
    body = await api.run("true")
    status, err = await api.call("GET", f"/v1/tasks/{body['task_id']}", user="bob")
    assert status == 403, err
    status, _ = await api.call("GET", f"/v1/tasks/{body['task_id']}", user="root-admin")
    assert status == 200


async def test_timeout_marks_timed_out(api: Api) -> None:
    """A command past its timeout is killed and TIMED_OUT."""
    body = await api.run("sleep", "30", timeout=0.5)
    assert body["state"] == "TIMED_OUT"
    assert body["duration_s"] < 10


async def test_output_streams_live_to_two_readers(api: Api) -> None:
    """Two readers follow the same output live and both see every byte and the end."""
    status, body = await api.call(
        "POST",
        "/v1/commands",
        json={"command": "seq", "args": ["1", "20000"], "timeout": 20},
    )
    assert status == 202
    task_id = body["task_id"]

    async def read() -> tuple[bytes, dict[str, Any]]:
        data = b""
        end: dict[str, Any] = {}
        async with api.session.get(
            api.url(f"/v1/tasks/{task_id}/output"), headers=api.auth("alice")
        ) as resp:
            assert resp.status == 200
            async for raw in resp.content:
                line = json.loads(raw)
                if line.get("event") == "end":
                    end = line
                else:
                    data += line["data"].encode()
        return data, end

    (a, end_a), (b, end_b) = await asyncio.gather(read(), read())
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert a == b == expected
    assert end_a["state"] == end_b["state"] == "COMPLETED"


async def test_cancel_kills_running_task(api: Api) -> None:
    """Cancel ends a running task as CANCELLED quickly."""
    status, body = await api.call(
        "POST", "/v1/commands", json={"command": "sleep", "args": ["60"], "timeout": 120}
    )
    task_id = body["task_id"]
    for _ in range(100):
        _, body = await api.call("GET", f"/v1/tasks/{task_id}")
        if body["state"] == "RUNNING":
            break
        await asyncio.sleep(0.02)
    status, body = await api.call("POST", f"/v1/tasks/{task_id}/cancel")
    assert status == 200, body
    assert body["state"] == "CANCELLED"
    status, body = await api.call("POST", f"/v1/tasks/{task_id}/cancel")
    assert status == 409


async def test_queue_full_is_429_with_retry_after(api: Api) -> None:
    """Past max_concurrent + max_queue the API answers 429 with Retry-After."""
    ids = []
    for _ in range(4 + 8):
        status, body = await api.call(
            "POST", "/v1/commands", json={"command": "sleep", "args": ["30"], "timeout": 60}
        )
        assert status == 202, body
        ids.append(body["task_id"])
    async with api.session.post(
        api.url("/v1/commands"), headers=api.auth("alice"), json={"command": "true"}
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert body["error"]["code"] == "RESOURCE_EXHAUSTED"
    for task_id in ids:
        await api.call("POST", f"/v1/tasks/{task_id}/cancel")


async def test_files_round_trip(api: Api) -> None:
    """PUT, GET, list, stat and DELETE work in the caller's workspace, binary-safe."""
    data = bytes(range(256)) * 4
    status, body = await api.call(
        "PUT", "/v1/files/dir/blob.bin?create_dirs=true&mode=600", data=data
    )
    assert status == 201, body
    status, got = await api.call("GET", "/v1/files/dir/blob.bin")
    assert (status, got) == (200, data)
    status, listing = await api.call("GET", "/v1/files/dir?list=true")
    assert [e["name"] for e in listing["entries"]] == ["blob.bin"]
    assert listing["entries"][0]["mode"] == "600"
    # the sandbox sees the same workspace
    body = await api.run("sha256sum", "dir/blob.bin")
    assert body["exit_code"] == 0
    status, _ = await api.call("DELETE", "/v1/files/dir?recursive=true")
    assert status == 200
    status, _ = await api.call("GET", "/v1/files/dir/blob.bin")
    assert status == 404


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "a/../../x", "%2e%2e/x", "a%00b", "/etc/passwd"],
)
async def test_file_path_tricks_are_refused(api: Api, path: str) -> None:
    """Path tricks never leave the workspace: 4xx naming the path."""
    status, body = await api.call("GET", f"/v1/files/{path}")
    assert 400 <= status < 500, body
    if isinstance(body, dict):
        assert "Traceback" not in json.dumps(body)


async def test_workspaces_are_per_subject(api: Api) -> None:
    """bob cannot see alice's files, through the API or from the sandbox."""
    await api.call("PUT", "/v1/files/secret.txt", data=b"alice only")
    status, _ = await api.call("GET", "/v1/files/secret.txt", user="bob")
    assert status == 404
    body = await api.run("cat", "secret.txt", user="bob")
    assert body["exit_code"] != 0
    assert "alice only" not in body["stdout"]
