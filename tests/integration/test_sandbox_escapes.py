"""The escape battery of ``escape_cases`` run directly through :class:`BwrapSandbox`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.models import Limits, SandboxRequest, Stream
from gateway.sandbox import BwrapSandbox
from tests.integration.escape_cases import (
    ESCAPE_CASES,
    BaitListeners,
    EscapeCase,
    HostContext,
    Outcome,
    Runner,
)

pytestmark = pytest.mark.integration

# Small, fast defaults; cases override what they test.
BASE_LIMITS = Limits(timeout_s=20.0, memory_bytes=256 << 20, pids=64, output_bytes=1 << 20)
SECRET_ENV = "MCP_ESCAPE_TEST_SECRET"


@pytest.fixture(
    scope="module", params=["auto", "off", "warm"], ids=["cgroups", "rlimits-only", "warm"]
)
def sandbox(request: pytest.FixtureRequest) -> Iterator[BwrapSandbox]:
    """The battery runs in sandboxes started for each case, and in warm ones."""
    warm = request.param == "warm"
    sb = BwrapSandbox(
        cgroup_parent=f"mcp-escape-test-{os.getpid()}",
        cgroups="auto" if warm else request.param,
        warm=1 if warm else 0,
    )
    yield sb
    sb.close()


@pytest.fixture
def host_context(
    tmp_path: Path, sandbox: BwrapSandbox, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HostContext]:
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv(SECRET_ENV, secret)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    other = tmp_path / "other-subject"
    other.mkdir()
    (other / "secret.txt").write_text(secret)
    bait = BaitListeners("mcp-escape-")
    yield HostContext(
        token="escape-token-" + secrets.token_hex(8),
        secret=secret,
        secret_env=SECRET_ENV,
        workspace=str(workspace),
        other_workspace=str(other),
        host_port=bait.port,
        abstract_name=bait.abstract_name,
        connections=bait.connections,
        cgroup_controllers=sandbox.cgroups.controllers,
        gateway_is_root=os.geteuid() == 0,
    )
    bait.close()


@pytest.fixture
def runner(sandbox: BwrapSandbox) -> Runner:
    """Runs one case in the sandbox; the REST flavour posts the same request instead."""

    async def run(case: EscapeCase, ctx: HostContext) -> Outcome:
        limits = dataclasses.replace(BASE_LIMITS, **case.limits)  # type: ignore[arg-type]
        req = SandboxRequest(
            task_id=f"escape-{case.name}",
            argv=tuple(ctx.fill(arg) for arg in case.argv),
            workspace=ctx.workspace,
            stdin=case.stdin,
            limits=limits,
        )
        out = {"stdout": bytearray(), "stderr": bytearray()}

        def collect(stream: Stream, data: bytes) -> None:
            out[stream].extend(data)

        # With warm sandboxes, one waits for exactly this request (unless the
        # request is one a launcher cannot run, e.g. with stdin data).
        waiting = await sandbox.warm(req)
        cancel = asyncio.Event()
        if case.cancel_after_s is not None:
            asyncio.get_running_loop().call_later(case.cancel_after_s, cancel.set)
        result = await sandbox.run(req, collect, cancel)
        assert result.warm == bool(waiting), result
        return Outcome(
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=bytes(out["stdout"]),
            stderr=bytes(out["stderr"]),
            timed_out=result.timed_out,
            cancelled=result.cancelled,
            stdout_bytes=result.stdout_bytes,
            stdout_truncated=result.stdout_truncated,
            error=result.error,
        )

    return run


def test_battery_is_large_and_unique() -> None:
    """The battery has at least 30 distinct attempts."""
    names = [case.name for case in ESCAPE_CASES]
    assert len(names) >= 30
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", ESCAPE_CASES, ids=lambda case: case.name)
async def test_escape_is_contained(
    case: EscapeCase, runner: Runner, host_context: HostContext
) -> None:
    """Each escape attempt of the battery is contained (see the case's check)."""
    outcome = await runner(case, host_context)
    assert outcome.error is None, str(outcome)
    case.check(outcome, host_context)
    if case.after is not None:
        case.after(host_context)
