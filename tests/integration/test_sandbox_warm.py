"""Warm sandboxes for real: the same sandbox as a cold start, the run's limits, their life cycle.

The shared behaviours (streams, exit codes, fds, usage, timeouts, cancel,
daemons) run warm too, as the ``warm`` flavour of ``any_sandbox`` in
``test_sandbox.py``, and so does the escape battery
(``test_sandbox_escapes.py``).  Here: what only warm sandboxes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.models import Limits, RunResult, SandboxRequest, Stream
from gateway.sandbox import BwrapSandbox
from tests.conftest import until
from tests.integration.test_sandbox import survivors

pytestmark = pytest.mark.integration

LIMITS = Limits(timeout_s=20.0)

# What a command can see of its own process and sandbox, cgroup path aside.
SELF_PORTRAIT = """
id; pwd; echo "pid $$ ppid $PPID"; env | sort; ls /proc/self/fd
grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs|Cap[A-Za-z]+):' /proc/self/status
cat /proc/self/limits; grep -E '^(policy|prio) ' /proc/self/sched; cat /proc/self/oom_score_adj
umask; hostname; ls /; ls /tmp /workspace; mount | wc -l
"""


@pytest.fixture
def warm_sandbox() -> Iterator[BwrapSandbox]:
    sb = BwrapSandbox(cgroup_parent=f"mcp-warm-test-{os.getpid()}", warm=1)
    yield sb
    sb.close()


def workspace(tmp_path: Path, name: str = "ws", **files: str) -> str:
    path = tmp_path / name
    path.mkdir()
    for file_name, text in files.items():
        (path / file_name).write_text(text)
    return str(path)


def request(ws: str, *argv: str, **fields: object) -> SandboxRequest:
    limits = fields.pop("limits", LIMITS)
    return SandboxRequest(
        task_id="warm-" + secrets.token_hex(4),
        argv=argv,
        workspace=ws,
        limits=limits,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


async def run(sb: BwrapSandbox, req: SandboxRequest) -> tuple[RunResult, str, str]:
    out: dict[Stream, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def keep(stream: Stream, data: bytes) -> None:
        out[stream].extend(data)

    result = await sb.run(req, keep, asyncio.Event(), warm_up=False)
    return result, out["stdout"].decode(), out["stderr"].decode()


def sandbox_processes(ws: str) -> list[str]:
    """Host pids of bwraps (and their sandboxes) that mount ``ws``."""
    return survivors(f"--bind {ws} ")


async def test_a_warm_sandbox_is_the_sandbox_a_cold_start_gives(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """Identity, environment, fds, seccomp, capabilities, rlimits, priority, mounts: all equal."""
    cold_ws, warm_ws = workspace(tmp_path, "cold"), workspace(tmp_path, "warm")
    env = (("LANG", "C.UTF-8"), ("TZ", "UTC"))
    cold, cold_out, _ = await run(
        warm_sandbox, request(cold_ws, "sh", "-c", SELF_PORTRAIT, env=env)
    )
    warm_req = request(warm_ws, "sh", "-c", SELF_PORTRAIT, env=env)
    assert await warm_sandbox.warm(warm_req) == 1
    warm, warm_out, _ = await run(warm_sandbox, warm_req)
    assert (cold.warm, warm.warm) == (False, True)
    assert cold.exit_code == warm.exit_code == 0, (cold, warm)
    assert warm_out == cold_out
    assert "policy                                       :                    0" in warm_out
    assert "pid 2 ppid 1" in warm_out  # the command, not the launcher, is pid 1's child


async def test_the_runs_limits_apply_not_the_warm_sandboxes(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """Granted memory above and below what the sandbox waited with is what the command gets."""
    ws = workspace(tmp_path)
    grab = "b = bytearray({}); print(len(b))"
    # The sandbox waits with the default 256 MiB; 400 MiB must be allowed...
    big = request(
        ws, "python3", "-c", grab.format(300 << 20), limits=Limits(memory_bytes=400 << 20)
    )
    assert await warm_sandbox.warm(big) == 1
    result, out, _ = await run(warm_sandbox, big)
    assert (result.warm, result.exit_code, out) == (True, 0, f"{300 << 20}\n"), result
    assert result.max_rss_bytes >= 300 << 20
    # ...and 32 MiB must stop the same program.
    small = request(
        ws, "python3", "-c", grab.format(300 << 20), limits=Limits(memory_bytes=32 << 20)
    )
    assert await warm_sandbox.warm(small) == 1
    result, out, _ = await run(warm_sandbox, small)
    assert result.warm, result
    assert result.exit_code != 0, result
    assert out == ""


async def test_begun_early_and_granted_other_limits(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """prestart takes a warm sandbox with the asked limits; the run's granted ones replace them."""
    ws = workspace(tmp_path)
    asked = request(ws, "sh", "-c", "ulimit -n; ulimit -f", limits=Limits(nofile=512))
    assert await warm_sandbox.warm(asked) == 1
    early = warm_sandbox.prestart(asked)
    assert early is not None
    assert warm_sandbox.warm_waiting == 0
    granted = SandboxRequest(
        task_id=asked.task_id,
        argv=asked.argv,
        workspace=ws,
        limits=Limits(nofile=64, fsize_bytes=1 << 20),
    )
    out: list[bytes] = []
    result = await warm_sandbox.run(
        granted, lambda _s, d: out.append(d), asyncio.Event(), early=early, warm_up=False
    )
    assert (result.warm, result.exit_code) == (True, 0), result
    assert b"".join(out).decode().split() == ["64", str((1 << 20) // 512)]


async def test_exec_failures_read_as_a_cold_starts(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """A missing or non-executable command is a sandbox error (127 / 126), warm or cold."""
    ws = workspace(tmp_path, **{"script.sh": "echo hi\n"})
    for argv0, code in (("no-such-program", 127), ("/workspace/script.sh", 126)):
        outcomes = []
        for warm in (False, True):
            req = request(ws, argv0)
            if warm:
                assert await warm_sandbox.warm(req) == 1
            result, _, _ = await run(warm_sandbox, req)
            assert result.warm == warm
            outcomes.append((result.exit_code, result.error))
        assert outcomes[0] == outcomes[1], outcomes
        assert outcomes[1][0] == code
        assert (outcomes[1][1] or "").startswith("sandbox: execvp ")


async def test_requests_a_launcher_cannot_run_start_cold(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """stdin data, or a variable the shell owns: started for the request, and still right."""
    ws = workspace(tmp_path)
    assert await warm_sandbox.warm(request(ws, "true")) == 1
    with_stdin = request(ws, "cat", stdin=b"from stdin\n")
    assert await warm_sandbox.warm(with_stdin) == 0
    result, out, _ = await run(warm_sandbox, with_stdin)
    assert (result.warm, result.exit_code, out) == (False, 0, "from stdin\n")
    pwd = request(ws, "true", env=(("PWD", "/custom"),))
    result, _, _ = await run(warm_sandbox, pwd)
    assert (result.warm, result.exit_code) == (False, 0)
    assert warm_sandbox.warm_waiting == 1  # still waiting for a request it can run


async def test_a_dead_warm_sandbox_is_skipped(warm_sandbox: BwrapSandbox, tmp_path: Path) -> None:
    """If a waiting sandbox dies, the next request starts its own and runs normally."""
    ws = workspace(tmp_path)
    req = request(ws, "echo", "fine")
    assert await warm_sandbox.warm(req) == 1
    for pid in sandbox_processes(ws):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    await until(lambda: not sandbox_processes(ws))
    result, out, _ = await run(warm_sandbox, req)
    assert (result.warm, result.exit_code, out) == (False, 0, "fine\n")


async def test_idle_warm_sandboxes_are_dropped(tmp_path: Path) -> None:
    """After ``warm_idle_s`` without a request, the waiting sandboxes are killed."""
    sb = BwrapSandbox(cgroup_parent=f"mcp-warm-idle-{os.getpid()}", warm=2, warm_idle_s=0.3)
    try:
        ws = workspace(tmp_path)
        assert await sb.warm(request(ws, "true")) == 2
        assert len(sandbox_processes(ws)) >= 2
        await asyncio.sleep(0.8)
        assert sb.warm_waiting == 0
        await until(lambda: not sandbox_processes(ws))
        assert sandbox_processes(ws) == []
    finally:
        sb.close()


async def test_close_kills_the_waiting_sandboxes(tmp_path: Path) -> None:
    sb = BwrapSandbox(cgroup_parent=f"mcp-warm-close-{os.getpid()}", warm=2)
    ws = workspace(tmp_path)
    assert await sb.warm(request(ws, "true")) == 2
    sb.close()
    await until(lambda: not sandbox_processes(ws))
    assert sandbox_processes(ws) == []
    # Their cgroups are gone, and so are the base directories (empty by then).
    assert sb.cgroups.created
    left = await asyncio.to_thread(lambda: [d for d in sb.cgroups.created if os.path.exists(d)])
    assert left == []


async def test_a_finished_run_warms_the_next_one_up(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """Without any help, the second of two requests alike runs warm."""
    ws = workspace(tmp_path)
    out: list[bytes] = []
    first = await warm_sandbox.run(request(ws, "true"), lambda _s, d: None, asyncio.Event())
    await until(lambda: warm_sandbox.warm_waiting, timeout_s=10)
    second = await warm_sandbox.run(
        request(ws, "echo", "again"), lambda _s, d: out.append(d), asyncio.Event()
    )
    assert (first.warm, second.warm, b"".join(out)) == (False, True, b"again\n")


async def test_the_self_test_leaves_no_warm_sandbox(warm_sandbox: BwrapSandbox) -> None:
    """The self-test's workspace is gone right after it: nothing is warmed up for it."""
    await warm_sandbox.self_test()
    await asyncio.sleep(0.2)
    assert warm_sandbox.warm_waiting == 0


async def test_without_cgroups_there_are_no_warm_sandboxes(tmp_path: Path) -> None:
    """The cgroup keeps the launcher's start out of the command's usage: no cgroup, no warm."""
    sb = BwrapSandbox(cgroups="off", warm=2)
    try:
        ws = workspace(tmp_path)
        assert await sb.warm(request(ws, "true")) == 0
        result, out, _ = await run(sb, request(ws, "echo", "cold"))
        assert (result.warm, out) == (False, "cold\n")
    finally:
        sb.close()


def test_idle_set_up_only_where_the_priority_can_be_given_back() -> None:
    """SCHED_IDLE for warm sandboxes needs the way back: CAP_SYS_NICE or RLIMIT_NICE.

    As root (CAP_SYS_NICE) the probe succeeds; as an unprivileged user with
    RLIMIT_NICE 0 it fails, and warm sandboxes are then set up at the
    gateway's own priority.
    """
    assert os.geteuid() == 0, "the test suite runs as root"
    probe = "from gateway.sandbox import _idle_and_back; print(_idle_and_back(0))"
    as_root = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert as_root.stdout == "True\n"
    as_nobody = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert as_nobody.stdout == "False\n", as_nobody.stderr


async def test_waiting_sandboxes_only_use_idle_cores(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """While it waits (and while it sets up) a warm sandbox is SCHED_IDLE; taken, it is not."""
    ws = workspace(tmp_path)
    req = request(ws, "grep", "-E", "^policy ", "/proc/self/sched")
    assert await warm_sandbox.warm(req) == 1
    pids = sandbox_processes(ws)
    assert pids
    assert {os.sched_getscheduler(int(pid)) for pid in pids} == {os.SCHED_IDLE}
    result, out, _ = await run(warm_sandbox, req)
    assert result.warm, result
    assert out.split() == ["policy", ":", str(os.SCHED_OTHER)]


async def test_a_replaced_workspace_is_not_served_by_a_stale_sandbox(
    warm_sandbox: BwrapSandbox, tmp_path: Path
) -> None:
    """A warm sandbox binds the workspace directory it found; if another directory
    takes that path meanwhile, the sandbox is dropped and the command sees the new one."""
    ws = workspace(tmp_path, marker="old\n")
    req = request(ws, "cat", "/workspace/marker")
    assert await warm_sandbox.warm(req) == 1
    replace_dir(ws, tmp_path / "old-ws", {"marker": "new\n"})
    result, out, _ = await run(warm_sandbox, req)
    assert (result.warm, result.exit_code, out) == (False, 0, "new\n")
    assert warm_sandbox.warm_waiting == 0


def replace_dir(path: str, aside: Path, files: dict[str, str]) -> None:
    """Move ``path`` to ``aside`` and make a new directory with ``files`` at ``path``."""
    os.rename(path, aside)
    os.mkdir(path)
    for name, text in files.items():
        Path(path, name).write_text(text)


async def test_close_kills_warm_sandboxes_still_starting(tmp_path: Path) -> None:
    """Warm sandboxes whose start has not reached the pool die with close() too."""
    sb = BwrapSandbox(cgroup_parent=f"mcp-warm-inflight-{os.getpid()}", warm=2)
    ws = workspace(tmp_path)
    result = await sb.run(request(ws, "true"), lambda _s, _d: None, asyncio.Event())
    assert result.exit_code == 0
    sb.close()  # the two warm-ups the run started may still be on their way
    await until(lambda: not sandbox_processes(ws))
    assert sandbox_processes(ws) == []
    assert sb.warm_waiting == 0
