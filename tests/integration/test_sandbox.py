"""BwrapSandbox and cgroups for real: runs, limits, output, timeouts, cancellation, cleanup.

The pure helpers of :mod:`gateway.sandbox` and :mod:`gateway.cgroups` are
tested here too (marked ``unit``), next to the behaviour they decide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import cgroups as cg
from gateway import sandbox as sandbox_mod
from gateway.errors import InvalidArgument, Unavailable
from gateway.models import Limits, RunResult, SandboxRequest, Stream
from gateway.sandbox import (
    BwrapSandbox,
    OutputCap,
    _Cleaner,
    _parent_pid,
    _reap_late,
    _reap_pid1,
    become_subreaper,
    classify_bwrap_failure,
    decode_status,
    parse_info,
    plan_rlimits,
)
from tests.conftest import until

unit = pytest.mark.unit
integration = pytest.mark.integration

LIMITS = Limits(timeout_s=20.0)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[BwrapSandbox]:
    sb = BwrapSandbox(cgroup_parent=f"mcp-sandbox-test-{os.getpid()}")
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def rlimits_sandbox() -> Iterator[BwrapSandbox]:
    sb = BwrapSandbox(cgroups="off")
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def warm_sandbox() -> Iterator[BwrapSandbox]:
    """Runs commands in warm sandboxes: :func:`run` warms one up for each request first."""
    sb = BwrapSandbox(cgroup_parent=f"mcp-sandbox-warm-test-{os.getpid()}", warm=1)
    yield sb
    sb.close()


@pytest.fixture(params=["cgroups", "rlimits-only", "warm"])
def any_sandbox(
    request: pytest.FixtureRequest,
    sandbox: BwrapSandbox,
    rlimits_sandbox: BwrapSandbox,
    warm_sandbox: BwrapSandbox,
) -> BwrapSandbox:
    return {"cgroups": sandbox, "rlimits-only": rlimits_sandbox, "warm": warm_sandbox}[
        request.param
    ]


@pytest.fixture
def workspace(tmp_path: Path) -> str:
    path = tmp_path / "ws"
    path.mkdir()
    return str(path)


class Collected:
    """An on_output callback that keeps everything it is given."""

    def __init__(self) -> None:
        self.data: dict[Stream, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.calls = 0

    def __call__(self, stream: Stream, chunk: bytes) -> None:
        self.calls += 1
        self.data[stream].extend(chunk)

    @property
    def stdout(self) -> str:
        return self.data["stdout"].decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.data["stderr"].decode("utf-8", "replace")


async def run(
    sb: BwrapSandbox,
    workspace: str,
    *argv: str,
    cancel: asyncio.Event | None = None,
    out: Collected | None = None,
    expect_warm: bool = True,
    **fields: object,
) -> tuple[RunResult, Collected]:
    out = out or Collected()
    limits = fields.pop("limits", LIMITS)
    req = SandboxRequest(
        task_id="test-" + secrets.token_hex(4),
        argv=argv,
        workspace=workspace,
        limits=limits,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )
    # With warm sandboxes on, one is made to wait for exactly this request first.
    waiting = await sb.warm(req)
    result = await sb.run(req, out, cancel or asyncio.Event())
    if waiting and expect_warm:
        assert result.warm, result
    return result, out


def survivors(token: str) -> list[str]:
    """Host pids of processes whose command line holds ``token`` (which may start with -)."""
    return subprocess.run(
        ["pgrep", "-f", "--", token], capture_output=True, text=True, check=False
    ).stdout.split()


# -- pure decisions ---------------------------------------------------------------------------

STATUS_CASES = [
    ("exit 0", 0 << 8, (0, None)),
    ("exit 3", 3 << 8, (3, None)),
    ("exit 128", 128 << 8, (128, None)),
    ("bwrap reports SIGKILL", 137 << 8, (None, 9)),
    ("bwrap reports SIGSYS", 159 << 8, (None, 31)),
    ("beyond signals", 200 << 8, (200, None)),
    ("bwrap itself killed", 9, (None, 9)),
]


@unit
@pytest.mark.parametrize(
    ("name", "status", "expected"), STATUS_CASES, ids=[c[0] for c in STATUS_CASES]
)
def test_decode_status(name: str, status: int, expected: tuple[int | None, int | None]) -> None:
    """bwrap's 128+N convention is read as signal N; other codes are exit codes."""
    assert decode_status(status) == expected


FAILURE_CASES = [
    ("missing program", 1, b"bwrap: execvp nope: No such file or directory\n", 127),
    ("not executable", 1, b"bwrap: execvp ./x: Permission denied\n", 126),
    ("bad cwd", 1, b"bwrap: Can't chdir to /workspace/x: No such file or directory\n", 126),
    ("command failed", 1, b"grep: x: No such file\n", None),
    ("other status", 2, b"bwrap: execvp nope: No such file or directory\n", None),
    ("more than one line", 1, b"bwrap: x\nmore\n", None),
]


@unit
@pytest.mark.parametrize(
    ("name", "code", "stderr", "expected"), FAILURE_CASES, ids=[c[0] for c in FAILURE_CASES]
)
def test_classify_bwrap_failure(name: str, code: int, stderr: bytes, expected: int | None) -> None:
    """Only bwrap's own one-line setup errors count as sandbox failures (127/126)."""
    got = classify_bwrap_failure(code, stderr)
    assert (got[1] if got else None) == expected
    if got:
        assert got[0].startswith("sandbox: ")
        assert "bwrap" not in got[0]


@unit
def test_output_cap() -> None:
    """OutputCap delivers up to the cap, splitting the chunk that crosses it, and counts all."""
    cap = OutputCap(10)
    assert cap.take(b"12345") == b"12345"
    assert cap.take(b"6789AB") == b"6789A"
    assert cap.take(b"more") == b""
    assert (cap.delivered, cap.total, cap.truncated) == (10, 15, True)
    exact = OutputCap(3)
    assert exact.take(b"abc") == b"abc"
    assert not exact.truncated


@unit
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{\n    "child-pid": 4242\n}\n', 4242),
        (b"", None),
        (b"{}", None),
        (b'{"child-pid": "1"}', None),
        (b'{"child-pid": 0}', None),
        (b"\xff", None),
        (b"[1]", None),
    ],
)
def test_parse_info(data: bytes, expected: int | None) -> None:
    """Only a positive integer child-pid from bwrap's info JSON is accepted."""
    assert parse_info(data) == expected


@unit
def test_plan_rlimits_with_and_without_cgroups() -> None:
    """rlimits always cap core/nofile/fsize/cpu; nproc and AS only stand in for missing cgroups."""
    inf = resource.RLIM_INFINITY
    limits = Limits(nofile=100, fsize_bytes=5000, cpu_seconds=7, pids=9, memory_bytes=1 << 30)
    full = dict(plan_rlimits(limits, {}, pids_cgroup=True, memory_cgroup=True))
    assert full == {
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NOFILE: (100, 100),
        resource.RLIMIT_FSIZE: (5000, 5000),
        resource.RLIMIT_CPU: (7, 8),
    }
    bare = dict(plan_rlimits(limits, {}, pids_cgroup=False, memory_cgroup=False))
    assert bare[resource.RLIMIT_NPROC] == (10, 10)
    assert bare[resource.RLIMIT_AS] == (1 << 30, 1 << 30)
    clamped = dict(
        plan_rlimits(
            limits,
            {resource.RLIMIT_NOFILE: (50, 64), resource.RLIMIT_CPU: (inf, inf)},
            pids_cgroup=True,
            memory_cgroup=True,
        )
    )
    assert clamped[resource.RLIMIT_NOFILE] == (64, 64)  # cannot raise a hard limit
    assert clamped[resource.RLIMIT_CPU] == (7, 8)


HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = (
    "29 23 0:26 /system.slice /sys/fs/cgroup\\040x rw,nosuid shared:4 - cgroup2 cgroup2 rw\n"
)


@unit
@unit
def test_parent_pid_survives_a_hostile_command_name(tmp_path: Path) -> None:
    """The parent is read past the command name, whatever parentheses and spaces it holds."""
    program = tmp_path / "x) 1 2 (y"
    shutil.copy("/bin/sleep", program)
    child = subprocess.Popen([str(program), "30"])
    try:
        assert _parent_pid(child.pid) == os.getpid()
    finally:
        child.kill()
        child.wait()
    with pytest.raises(OSError):  # gone: no such process
        _parent_pid(child.pid)


def test_parse_mountinfo() -> None:
    """cgroup v1 mounts list their limit/helper controllers; cgroup2 mounts are found too."""
    mounts = cg.parse_mountinfo(HYBRID_MOUNTINFO)
    by_point = {m.mountpoint: m for m in mounts}
    assert by_point["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert by_point["/sys/fs/cgroup/unified"].version == 2
    assert "/sys/fs/cgroup/systemd" not in by_point  # named hierarchy, no controllers
    (v2,) = cg.parse_mountinfo(V2_MOUNTINFO)
    assert (v2.mountpoint, v2.root, v2.version) == ("/sys/fs/cgroup x", "/system.slice", 2)


@unit
def test_parse_proc_cgroup() -> None:
    """/proc/self/cgroup maps each controller (and "" for v2) to its path."""
    text = "4:memory:/a/b\n2:cpu,cpuacct:/\n1:name=systemd:/x\n0::/user.slice/x.service\n"
    paths = cg.parse_proc_cgroup(text)
    assert paths["memory"] == "/a/b"
    assert paths["cpu"] == paths["cpuacct"] == "/"
    assert paths[""] == "/user.slice/x.service"


@unit
@pytest.mark.parametrize(
    ("root", "own", "parent", "expected"),
    [
        ("/", "/", "mcp-gateway", "/m/mcp-gateway"),
        ("/", "/svc.service", "mcp-gateway", "/m/svc.service/mcp-gateway"),
        ("/", "/svc.service", "/gw.slice/sandboxes", "/m/gw.slice/sandboxes"),
        ("/system.slice", "/system.slice/gw.service", "x", "/m/gw.service/x"),
        ("/system.slice", "/other/gw.service", "x", None),  # own cgroup not visible
        ("/", "/", "../escape", None),
        ("/", "/", "", None),
    ],
)
def test_base_dir(root: str, own: str, parent: str, expected: str | None) -> None:
    """A relative parent hangs below our own cgroup, an absolute one is hierarchy-absolute."""
    mount = cg.CgroupMount("/m", root, 2)
    assert cg.base_dir(mount, own, parent) == expected


@unit
def test_limit_files() -> None:
    """Limits become the v2/v1 control-file writes, bwrap's pid 1 added to pids."""
    limits = Limits(memory_bytes=1 << 26, pids=10, cpu_quota=0.5)
    v2 = {f: v for f, v, _ in cg.v2_limit_files(limits, {"memory", "pids", "cpu"})}
    assert v2 == {
        "memory.max": str(1 << 26),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "11",
        "cpu.max": "50000 100000",
    }
    assert cg.v2_limit_files(limits, set()) == []
    memory = [f for f, _, _ in cg.v1_limit_files(limits, "memory")]
    assert memory.index("memory.limit_in_bytes") < memory.index("memory.memsw.limit_in_bytes")
    assert {f: v for f, v, _ in cg.v1_limit_files(limits, "cpu")} == {
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "50000",
    }
    assert cg.v1_limit_files(limits, "freezer") == []


@unit
@pytest.mark.parametrize(
    ("task_id", "safe"),
    [("abc123", "abc123"), ("../../x", "task"), (".hidden", "task"), ("a" * 80, "task")],
)
def test_task_dir_name(task_id: str, safe: str) -> None:
    """Task ids become cgroup names only when harmless; a nonce keeps reruns apart."""
    assert cg.task_dir_name(task_id, "n0") == f"task-{safe}-n0"


# -- construction and self-test --------------------------------------------------------------------


@integration
async def test_self_test_reports_details(sandbox: BwrapSandbox) -> None:
    """The self-test passes and reports bwrap, seccomp and the cgroup mode."""
    details = await sandbox.self_test()
    assert details["seccomp"] == "ok"
    assert str(details["bwrap_version"]).startswith("bubblewrap")
    assert details["cgroups"] == sandbox.cgroups.mode
    assert details["bwrap_setuid"] is False


@integration
async def test_self_test_without_cgroups(rlimits_sandbox: BwrapSandbox) -> None:
    """With no cgroup the sandbox still works and says ``cgroups: unavailable``."""
    details = await rlimits_sandbox.self_test()
    assert details["cgroups"] == "unavailable"
    assert "nproc" in str(details["rlimits"])


@integration
def test_refuses_missing_bwrap(tmp_path: Path) -> None:
    """No bwrap at the configured path: construction fails closed."""
    with pytest.raises(Unavailable):
        BwrapSandbox(bwrap_path=str(tmp_path / "bwrap"), cgroups="off")


@integration
async def test_refuses_setuid_bwrap(tmp_path: Path) -> None:
    """A setuid bwrap is refused at construction and by the self-test."""
    copy = tmp_path / "bwrap"
    shutil.copy2("/usr/bin/bwrap", copy)
    sb = BwrapSandbox(bwrap_path=str(copy), cgroups="off")
    try:
        copy.chmod(0o4755)
        with pytest.raises(Unavailable, match="setuid"):
            await sb.self_test()
        with pytest.raises(Unavailable, match="setuid"):
            BwrapSandbox(bwrap_path=str(copy), cgroups="off")
    finally:
        sb.close()


# -- ordinary runs ----------------------------------------------------------------------------


@integration
async def test_exit_code_and_streams(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """stdout and stderr arrive separately and the exit code is the command's."""
    result, out = await run(any_sandbox, workspace, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.signal, result.error) == (3, None, None)
    assert (out.stdout, out.stderr) == ("out\n", "err\n")
    assert (result.stdout_bytes, result.stderr_bytes) == (4, 4)
    assert not result.timed_out
    assert not result.cancelled


@integration
async def test_gate_holds_the_command_until_it_ends(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """The sandbox is set up while the gate is pending; the command starts only after it."""
    opened = asyncio.get_running_loop().create_future()
    marker = os.path.join(workspace, "ran")

    async def gate() -> None:
        await asyncio.sleep(0.3)
        # Still held: the command (which creates the marker) has not run.
        opened.set_result(os.path.exists(marker))  # noqa: ASYNC240

    req = SandboxRequest(
        task_id="test-" + secrets.token_hex(4),
        argv=("touch", "/workspace/ran"),
        workspace=workspace,
        limits=LIMITS,
    )
    result = await any_sandbox.run(req, Collected(), asyncio.Event(), gate=gate())
    assert (result.exit_code, result.error) == (0, None)
    assert opened.result() is False
    assert os.path.exists(marker)  # noqa: ASYNC240


@integration
async def test_failed_gate_means_the_command_never_runs(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """A gate that raises (the decision record could not be made durable): nothing runs."""

    async def gate() -> None:
        raise Unavailable("the audit log cannot be written")

    token = secrets.token_hex(6)
    req = SandboxRequest(
        task_id="test-" + secrets.token_hex(4),
        argv=("sh", "-c", f"touch /workspace/{token}; sleep 30 # {token}"),
        workspace=workspace,
        limits=LIMITS,
    )
    result = await any_sandbox.run(req, Collected(), asyncio.Event(), gate=gate())
    assert result.error is not None
    assert "not started" in result.error
    assert "audit log" in result.error
    assert not os.path.exists(os.path.join(workspace, token))  # noqa: ASYNC240
    assert survivors(token) == []


# -- begun early (prestart) ------------------------------------------------------------------


def request_for(workspace: str, *argv: str, limits: Limits = LIMITS) -> SandboxRequest:
    return SandboxRequest(
        task_id="test-" + secrets.token_hex(4), argv=argv, workspace=workspace, limits=limits
    )


async def run_gated(
    sandbox: BwrapSandbox, workspace: str, begun_early: bool, error: Exception | None
) -> tuple[RunResult, list[bool], str]:
    """Run ``touch TOKEN`` behind a gate made as the service makes it (a future).

    (With ``sleep 30`` after it when the gate fails.)  The gate ends 0.3 s
    in (with ``error``, if given), once the sandbox is set up.  Returns the
    result, whether the marker file existed when the gate ended, and the
    token.
    """
    token = secrets.token_hex(6)
    marker = os.path.join(workspace, token)
    script = f"touch /workspace/{token}; sleep {30 if error else 0} # {token}"
    req = request_for(workspace, "sh", "-c", script)
    early = sandbox.prestart(req) if begun_early else None
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    seen: list[bool] = []

    def end() -> None:
        seen.append(os.path.exists(marker))
        if error is None:
            gate.set_result(None)
        else:
            gate.set_exception(error)

    loop.call_later(0.3, end)
    result = await sandbox.run(req, Collected(), asyncio.Event(), gate=gate, early=early)
    return result, seen, token


@integration
@pytest.mark.parametrize("begun_early", [False, True], ids=["spawned", "begun-early"])
async def test_pending_gate_future_holds_the_command(
    sandbox: BwrapSandbox, workspace: str, begun_early: bool
) -> None:
    """A gate still pending when the sandbox is ready: the command waits for it."""
    result, seen, token = await run_gated(sandbox, workspace, begun_early, None)
    assert (result.exit_code, result.error) == (0, None)
    assert seen == [False]
    assert os.path.exists(os.path.join(workspace, token))  # noqa: ASYNC240
    assert result.spawn_s is not None
    assert result.spawn_s >= 0.3


@integration
@pytest.mark.parametrize("begun_early", [False, True], ids=["spawned", "begun-early"])
async def test_gate_future_that_fails_never_releases_the_command(
    sandbox: BwrapSandbox, workspace: str, begun_early: bool
) -> None:
    """The gate fails while the confined sandbox waits for it: the command never exists."""
    error = Unavailable("the audit log cannot be written")
    result, seen, token = await run_gated(sandbox, workspace, begun_early, error)
    assert result.error is not None
    assert "not started" in result.error
    assert seen == [False]
    assert not os.path.exists(os.path.join(workspace, token))  # noqa: ASYNC240
    assert survivors(token) == []


@integration
@pytest.mark.parametrize("begun_early", [False, True], ids=["spawned", "begun-early"])
async def test_gate_future_passed_before_the_sandbox_is_ready(
    sandbox: BwrapSandbox, workspace: str, begun_early: bool
) -> None:
    """The usual case: the gate passed during set-up, the command runs with its limits."""
    req = request_for(
        workspace,
        "sh",
        "-c",
        "ulimit -n; cat /proc/self/cgroup",
        limits=dataclasses.replace(LIMITS, nofile=77),
    )
    early = sandbox.prestart(req) if begun_early else None
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gate.set_result(None)
    out = Collected()
    result = await sandbox.run(req, out, asyncio.Event(), gate=gate, early=early)
    assert (result.exit_code, result.error) == (0, None), out.stderr
    assert out.stdout.splitlines()[0] == "77"
    if sandbox.cgroups.available:
        assert f"/task-{req.task_id}" in out.stdout


@integration
async def test_begun_early_runs_with_the_runs_own_limits(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """A prestarted bwrap taken over by its run: same output, the run's rlimits and cgroup."""
    begun = request_for(workspace, "sh", "-c", "ulimit -n; cat /proc/self/cgroup")
    early = any_sandbox.prestart(begun)
    assert early is not None
    # The decision lowered a limit that is applied after the fork: still the same sandbox.
    final = dataclasses.replace(begun, limits=dataclasses.replace(LIMITS, nofile=77))
    assert early.matches(final)
    out = Collected()
    result = await any_sandbox.run(final, out, asyncio.Event(), early=early)
    assert (result.exit_code, result.error) == (0, None), out.stderr
    assert out.stdout.splitlines()[0] == "77"
    if any_sandbox.cgroups.available:
        assert f"/task-{begun.task_id}" in out.stdout


@integration
async def test_begun_early_and_discarded_never_runs(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """A prestart that is discarded (the command was denied) is killed before the command."""
    token = secrets.token_hex(6)
    early = any_sandbox.prestart(
        request_for(workspace, "sh", "-c", f"touch /workspace/{token}; sleep 30 # {token}")
    )
    assert early is not None
    await asyncio.sleep(0.3)  # bwrap is set up and waits on its block fd
    early.discard()
    early.discard()  # idempotent
    await asyncio.sleep(0.3)
    assert not os.path.exists(os.path.join(workspace, token))  # noqa: ASYNC240
    assert survivors(token) == []


@integration
async def test_begun_early_for_another_sandbox_is_not_used(
    sandbox: BwrapSandbox, workspace: str
) -> None:
    """A run whose request would set bwrap up differently discards the early fork."""
    token = secrets.token_hex(6)
    begun = request_for(workspace, "sh", "-c", f"touch /workspace/{token}; sleep 30 # {token}")
    early = sandbox.prestart(begun)
    assert early is not None
    bigger_tmp = dataclasses.replace(LIMITS, tmp_size_bytes=LIMITS.tmp_size_bytes * 2)
    assert not early.matches(dataclasses.replace(begun, limits=bigger_tmp))
    assert not early.matches(dataclasses.replace(begun, argv=("true",)))
    other = request_for(workspace, "echo", "other")
    out = Collected()
    result = await sandbox.run(other, out, asyncio.Event(), early=early)
    assert (result.exit_code, out.stdout) == (0, "other\n")
    await asyncio.sleep(0.3)
    assert not os.path.exists(os.path.join(workspace, token))  # noqa: ASYNC240
    assert survivors(token) == []


@integration
async def test_begun_early_waits_for_a_failed_gate(sandbox: BwrapSandbox, workspace: str) -> None:
    """A prestarted run whose gate fails (decision not durable) never runs the command."""

    async def gate() -> None:
        raise Unavailable("the audit log cannot be written")

    token = secrets.token_hex(6)
    req = request_for(workspace, "sh", "-c", f"touch /workspace/{token}; sleep 30 # {token}")
    early = sandbox.prestart(req)
    result = await sandbox.run(req, Collected(), asyncio.Event(), gate=gate(), early=early)
    assert result.error is not None
    assert "not started" in result.error
    assert not os.path.exists(os.path.join(workspace, token))  # noqa: ASYNC240
    assert survivors(token) == []


@integration
async def test_invalid_request_is_not_begun_early(sandbox: BwrapSandbox, workspace: str) -> None:
    """What run() would refuse is not forked early either."""
    assert sandbox.prestart(request_for(workspace, "")) is None


@integration
async def test_stdin_is_delivered(sandbox: BwrapSandbox, workspace: str) -> None:
    """req.stdin is the command's stdin; without it stdin is empty."""
    data = bytes(range(256)) * 1000
    result, out = await run(sandbox, workspace, "sha256sum", stdin=data)
    assert result.exit_code == 0
    import hashlib

    assert out.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    result, out = await run(sandbox, workspace, "wc", "-c")
    assert result.exit_code == 0
    assert out.stdout.strip() == "0"


@integration
async def test_environment_is_exactly_the_allowlist(sandbox: BwrapSandbox, workspace: str) -> None:
    """The command sees PATH/HOME/LANG, bwrap's PWD and req.env, nothing of the gateway."""
    result, out = await run(sandbox, workspace, "env", env=(("FOO", "bar baz"),))
    assert result.exit_code == 0
    env = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/workspace",
        "LANG": "C.UTF-8",
        "PWD": "/workspace",
        "FOO": "bar baz",
    }


@integration
async def test_cwd_and_workspace(sandbox: BwrapSandbox, workspace: str) -> None:
    """The workspace is writable at /workspace and cwd is honoured."""
    os.mkdir(os.path.join(workspace, "sub"))
    result, out = await run(
        sandbox, workspace, "sh", "-c", "pwd; echo hi > f", cwd="/workspace/sub"
    )
    assert result.exit_code == 0
    assert out.stdout == "/workspace/sub\n"
    assert Path(workspace, "sub", "f").read_text() == "hi\n"  # noqa: ASYNC240


@integration
async def test_missing_program_is_a_sandbox_error(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """A program that does not exist gives exit 127 and an error, not an exception."""
    result, _ = await run(any_sandbox, workspace, "no-such-program-xyz")
    assert result.exit_code == 127
    assert result.error is not None
    assert "no-such-program-xyz" in result.error


@integration
async def test_bad_cwd_is_a_sandbox_error(sandbox: BwrapSandbox, workspace: str) -> None:
    """A cwd missing inside the workspace gives exit 126 and an error."""
    result, _ = await run(sandbox, workspace, "true", cwd="/workspace/missing")
    assert result.exit_code == 126
    assert result.error is not None
    assert "/workspace/missing" in result.error


@integration
async def test_failing_command_is_not_an_error(sandbox: BwrapSandbox, workspace: str) -> None:
    """A command that fails on its own is a normal result."""
    result, _ = await run(sandbox, workspace, "false")
    assert (result.exit_code, result.error) == (1, None)


@integration
async def test_signal_is_reported(sandbox: BwrapSandbox, workspace: str) -> None:
    """A command killed by a signal has no exit code and reports the signal."""
    result, _ = await run(sandbox, workspace, "sh", "-c", "kill -USR1 $$")
    assert (result.exit_code, result.signal) == (None, 10)


@integration
async def test_invalid_request_raises(sandbox: BwrapSandbox, workspace: str) -> None:
    """A request the validator refuses never reaches bwrap."""
    with pytest.raises(InvalidArgument) as info:
        await run(sandbox, workspace, "true", cwd="/etc")
    assert info.value.field == "cwd"


@integration
async def test_network_only_when_granted(sandbox: BwrapSandbox, workspace: str) -> None:
    """limits.network shares the host network (a host listener is reachable); default: not."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    code = (
        "import socket, sys\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "print('connected', open('/etc/resolv.conf').read() is not None)\n"
    )
    try:
        denied, out = await run(sandbox, workspace, "python3", "-c", code)
        assert denied.exit_code == 1
        assert "ConnectionRefusedError" in out.stderr
        granted, out = await run(
            sandbox, workspace, "python3", "-c", code, limits=Limits(network=True)
        )
        assert granted.exit_code == 0, out.stderr
        assert out.stdout == "connected True\n"
    finally:
        listener.close()


@integration
async def test_no_fd_reaches_the_command(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """Only 0-2 reach the command, even with inheritable fds open in the gateway."""
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    os.set_inheritable(leak_w, True)
    try:
        result, out = await run(any_sandbox, workspace, "ls", "-l", "/proc/self/fd")
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert result.exit_code == 0
    fds = {line.split()[-3] for line in out.stdout.splitlines()[1:]}
    assert fds == {"0", "1", "2", "3"}, out.stdout  # 3: the directory ls is reading


@integration
async def test_commands_run_with_the_normal_scheduling_policy(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """The threads that start sandboxes are SCHED_BATCH (woken, they do not preempt the
    event loop); the bwraps they fork, and so every command, have the normal policy."""
    result, out = await run(any_sandbox, workspace, "sh", "-c", "cut -d' ' -f41 /proc/self/stat")
    assert result.exit_code == 0, out.stderr
    assert out.stdout.strip() == str(os.SCHED_OTHER)
    helpers = [
        t for t in threading.enumerate() if t.name.startswith(("sandbox-spawn-", "sandbox-warm-"))
    ]
    assert helpers
    for thread in helpers:
        assert thread.native_id is not None
        assert os.sched_getscheduler(thread.native_id) == os.SCHED_BATCH, thread.name


async def test_concurrent_runs_do_not_mix(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """Runs in parallel each get their own output and status."""
    results = await asyncio.gather(
        *(
            run(any_sandbox, workspace, "sh", "-c", f"echo {i}; exit {i}", expect_warm=False)
            for i in range(6)
        )
    )
    for i, (result, out) in enumerate(results):
        assert (result.exit_code, out.stdout) == (i, f"{i}\n")


# -- placement and measurement ----------------------------------------------------------------


@integration
async def test_command_starts_inside_its_cgroup(sandbox: BwrapSandbox, workspace: str) -> None:
    """The command is in the task cgroup from its first instruction (block-fd placement)."""
    if not sandbox.cgroups.available:
        pytest.skip("no writable cgroup hierarchy on this host")
    result, out = await run(sandbox, workspace, "cat", "/proc/self/cgroup")
    assert result.exit_code == 0
    paths = cg.parse_proc_cgroup(out.stdout)
    for controller in [*sandbox.cgroups.v1_bases, *([""] if sandbox.cgroups.v2_base else [])]:
        # Reused directories are named after the task they were made for.
        assert "/task-" in paths[controller], (controller, out.stdout)
    if "memory" in sandbox.cgroups.v1_bases:  # made anew for every task
        assert "/task-test-" in paths["memory"], out.stdout


def _task_dirs(manager: cg.CgroupManager) -> set[str]:
    bases = [*manager.v1_bases.values(), *filter(None, [manager.v2_base])]
    return {
        os.path.join(base, name)
        for base in bases
        if os.path.isdir(base)
        for name in os.listdir(base)
        if name.startswith("task-")
    }


@integration
async def test_finished_task_cgroups_are_removed_or_kept_empty(workspace: str) -> None:
    """After the runs (in the background; settle() waits), a task's memory cgroup is gone
    and the rest is removed or kept, empty, for a later task, which then counts only its
    own CPU time; close() removes what is kept."""
    sandbox = BwrapSandbox(cgroup_parent=f"mcp-sandbox-keep-test-{os.getpid()}")
    try:
        if not sandbox.cgroups.available:
            pytest.skip("no writable cgroup hierarchy on this host")
        pool = sandbox._cgroup_pool
        burn = (
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
        )
        results = await asyncio.gather(
            *(run(sandbox, workspace, "python3", "-c", burn) for _ in range(4))
        )
        assert all(r.exit_code == 0 and r.cpu_time_s >= 0.25 for r, _ in results)
        await sandbox.settle()
        left = await asyncio.to_thread(_task_dirs, sandbox.cgroups)
        assert left == pool.kept_dirs
        memory = sandbox.cgroups.v1_bases.get("memory")
        assert not any(memory and d.startswith(memory + "/") for d in left), left
        assert await asyncio.to_thread(cg.TaskCgroup(None, {d: d for d in left}).procs) == []
        reusable = sandbox.cgroups.reusable(
            cg.TaskCgroup(sandbox.cgroups.v2_base, sandbox.cgroups.v1_bases)
        )
        if reusable is None:
            assert not left
            return
        assert pool.kept == 4
        # The next run takes kept directories, and counts its own CPU time only.
        result, out = await run(sandbox, workspace, "cat", "/proc/self/cgroup")
        assert result.exit_code == 0
        assert result.cpu_time_s < 0.1
        assert pool.kept == 3
        paths = cg.parse_proc_cgroup(out.stdout)
        taken = {d for d in left if any(d.endswith(p) for p in paths.values())}
        assert taken
        assert taken == left - pool.kept_dirs
        if memory:
            assert not any(d.startswith(memory + "/") for d in taken)
            assert "/task-test-" in paths["memory"]
    finally:
        await sandbox.settle()
        sandbox.close()
    assert not await asyncio.to_thread(_task_dirs, sandbox.cgroups)


@integration
async def test_usage_is_measured(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """CPU time and peak memory of the command tree are measured, not guessed."""
    code = (
        "import time\nb = b'x' * (96 << 20)\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3:\n    pass\n"
    )
    result, out = await run(any_sandbox, workspace, "python3", "-c", code)
    assert result.exit_code == 0, out.stderr
    assert result.cpu_time_s >= 0.25
    assert 96 << 20 <= result.max_rss_bytes < 512 << 20
    assert result.wall_time_s >= 0.3


@integration
async def test_output_is_capped_and_memory_stays_flat(
    sandbox: BwrapSandbox, workspace: str
) -> None:
    """1 GiB of output: 1 MiB delivered, all counted, the gateway's RSS barely moves."""

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    peak = before
    delivered = 0

    def sink(stream: Stream, chunk: bytes) -> None:
        nonlocal peak, delivered
        delivered += len(chunk)
        peak = max(peak, rss())

    limits = Limits(timeout_s=60, output_bytes=1 << 20)
    req = SandboxRequest(
        task_id="bomb", argv=("head", "-c", "1G", "/dev/zero"), workspace=workspace, limits=limits
    )
    result = await sandbox.run(req, sink, asyncio.Event())
    peak = max(peak, rss())
    assert result.exit_code == 0
    assert result.stdout_bytes == 1 << 30
    assert result.stdout_truncated
    assert delivered == 1 << 20
    assert peak - before < 32 << 20


@integration
async def test_yes_is_capped_until_timeout(sandbox: BwrapSandbox, workspace: str) -> None:
    """An endless writer is truncated at the cap and stopped by the timeout."""
    limits = Limits(timeout_s=1.0, output_bytes=1 << 20)
    result, out = await run(sandbox, workspace, "yes", limits=limits)
    assert result.timed_out
    assert result.stdout_truncated
    assert len(out.data["stdout"]) == 1 << 20
    assert result.stdout_bytes > 1 << 20


# -- timeouts and cancellation ----------------------------------------------------------------


@integration
async def test_timeout_kills_daemonized_children(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """After a timeout no process of the run survives, double-forked daemons included."""
    token = "tmo-" + secrets.token_hex(6)
    script = (
        f"setsid sh -c 'sleep 1000; : {token}' & "
        f"sh -c '(setsid sh -c \"sleep 1000; : {token}\" &)'; "
        f"sleep 1000; : {token}"
    )
    started = time.monotonic()
    result, _ = await run(any_sandbox, workspace, "sh", "-c", script, limits=Limits(timeout_s=1.0))
    assert result.timed_out
    assert result.exit_code is None
    assert result.signal == 9
    assert 1.0 <= time.monotonic() - started < 5.0
    assert survivors(token) == []


@integration
async def test_daemons_die_with_the_command(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """A command that exits normally takes its background processes with it."""
    token = "bg-" + secrets.token_hex(6)
    result, _ = await run(
        any_sandbox, workspace, "sh", "-c", f"setsid sh -c 'sleep 1000; : {token}' &"
    )
    assert result.exit_code == 0
    assert not result.timed_out
    assert survivors(token) == []


@integration
async def test_cancel_terminates_gracefully(any_sandbox: BwrapSandbox, workspace: str) -> None:
    """Cancel sends SIGTERM first: a handler runs, the run ends cancelled, nothing survives."""
    token = "cnl-" + secrets.token_hex(6)
    cancel = asyncio.Event()
    out = Collected()
    script = f"trap 'echo got TERM; exit 0' TERM; (sleep 1000; : {token}) & echo ready; wait"

    def on_output(stream: Stream, chunk: bytes) -> None:
        out(stream, chunk)
        if b"ready" in chunk:
            cancel.set()

    req = SandboxRequest(
        task_id="cancel", argv=("sh", "-c", script), workspace=workspace, limits=LIMITS
    )
    started = time.monotonic()
    result = await any_sandbox.run(req, on_output, cancel)
    assert result.cancelled
    assert not result.timed_out
    assert "got TERM" in out.stdout
    assert time.monotonic() - started < any_sandbox.kill_grace_s
    assert survivors(token) == []


@integration
async def test_cancel_kills_after_grace(workspace: str) -> None:
    """A command ignoring SIGTERM is SIGKILLed after the grace period."""
    sb = BwrapSandbox(cgroup_parent=f"mcp-grace-test-{os.getpid()}", kill_grace_s=0.3)
    try:
        token = "grace-" + secrets.token_hex(6)
        cancel = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, cancel.set)
        started = time.monotonic()
        result, _ = await run(
            sb, workspace, "sh", "-c", f"trap '' TERM; sleep 1000; : {token}", cancel=cancel
        )
        assert result.cancelled
        assert result.signal == 9
        assert 0.55 <= time.monotonic() - started < 3.0
        assert survivors(token) == []
    finally:
        sb.close()


@integration
async def test_cancel_before_start(sandbox: BwrapSandbox, workspace: str) -> None:
    """An already-set cancel event runs nothing."""
    cancel = asyncio.Event()
    cancel.set()
    result, out = await run(sandbox, workspace, "touch", "/workspace/ran", cancel=cancel)
    assert result.cancelled
    assert out.calls == 0
    assert not os.path.exists(os.path.join(workspace, "ran"))  # noqa: ASYNC240


@integration
async def test_cancelling_the_coroutine_cleans_up(
    any_sandbox: BwrapSandbox, workspace: str
) -> None:
    """If the caller's task is cancelled, the run still kills everything it started."""
    token = "task-" + secrets.token_hex(6)
    task = asyncio.ensure_future(
        run(any_sandbox, workspace, "sh", "-c", f"(sleep 1000; : {token}) & sleep 1000; : {token}")
    )
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert survivors(token) == []


@integration
async def test_callback_error_propagates_after_cleanup(
    sandbox: BwrapSandbox, workspace: str
) -> None:
    """An exception from on_output is re-raised once the run is over and cleaned up."""
    token = "cb-" + secrets.token_hex(6)

    def broken(stream: Stream, chunk: bytes) -> None:
        raise RuntimeError("consumer broke")

    req = SandboxRequest(
        task_id="cb",
        argv=("sh", "-c", f"echo hi; sleep 0.2; : {token}"),
        workspace=workspace,
        limits=LIMITS,
    )
    with pytest.raises(RuntimeError, match="consumer broke"):
        await sandbox.run(req, broken, asyncio.Event())
    assert survivors(token) == []


# -- cgroups on this host ---------------------------------------------------------------------


def _requested_modes() -> list[cg.Requested]:
    return ["v1", "v2"]


@integration
@pytest.mark.parametrize("requested", _requested_modes())
def test_cgroup_lifecycle(requested: cg.Requested) -> None:
    """A task cgroup gets its limits, holds a process, measures it, kills it and goes away."""
    manager = cg.CgroupManager.detect(f"mcp-cg-test-{os.getpid()}", requested)
    if not manager.available:
        pytest.skip(f"no writable cgroup {requested} hierarchy here: {manager.notes}")
    try:
        limits = Limits(memory_bytes=64 << 20, pids=7, cpu_quota=0.5)
        task = manager.create("lifecycle", limits)
        if "memory" in task.v1_dirs:
            path = os.path.join(task.v1_dirs["memory"], "memory.limit_in_bytes")
            assert Path(path).read_text().strip() == str(64 << 20)
        if "pids" in task.v1_dirs:
            assert Path(task.v1_dirs["pids"], "pids.max").read_text().strip() == "8"
        if "pids" in manager.v2_controllers and task.v2_dir:
            assert Path(task.v2_dir, "pids.max").read_text().strip() == "8"
        sleeper = subprocess.Popen(["sleep", "1000"])
        try:
            task.attach(sleeper.pid)
            assert task.procs() == [sleeper.pid]
            usage = task.usage()
            assert usage.cpu_time_s is not None
            assert usage.cpu_time_s >= 0
            assert task.kill(timeout_s=5)
            assert sleeper.wait(timeout=5) == -9
        finally:
            sleeper.kill()
            sleeper.wait()
        task.remove()
        assert not any(os.path.exists(d) for d in task.dirs)
    finally:
        manager.close()
    assert not any(os.path.exists(d) for d in manager.created)


@integration
def test_cgroup_kill_catches_forks(tmp_path: Path) -> None:
    """kill() empties a cgroup whose members keep forking."""
    manager = cg.CgroupManager.detect(f"mcp-cg-fork-{os.getpid()}")
    if not manager.available:
        pytest.skip("no writable cgroup hierarchy here")
    try:
        task = manager.create("forker", Limits(pids=200))
        forker = subprocess.Popen(["sh", "-c", "while :; do sleep 1000 & done"])
        try:
            task.attach(forker.pid)
            time.sleep(0.2)
            assert len(task.procs()) > 1
            assert task.kill(timeout_s=5)
            assert task.procs() == []
        finally:
            forker.kill()
            forker.wait()
        task.remove()
    finally:
        manager.close()


def _limit_values(task: cg.TaskCgroup, manager: cg.CgroupManager) -> dict[str, str]:
    files = {}
    for ctrl, d in task.v1_dirs.items():
        for name, _, _ in cg.v1_limit_files(Limits(), ctrl):
            if os.path.exists(os.path.join(d, name)):
                files[name] = Path(d, name).read_text().strip()
    if task.v2_dir is not None:
        for name, _, _ in cg.v2_limit_files(Limits(), manager.v2_controllers):
            if os.path.exists(os.path.join(task.v2_dir, name)):
                files[name] = Path(task.v2_dir, name).read_text().strip()
    return files


@integration
@pytest.mark.parametrize("requested", _requested_modes())
def test_cgroup_pool(requested: cg.Requested) -> None:
    """Empty task cgroups are kept for the next task (all but memory), which gets its own
    limits and CPU count; one with a process left is killed and removed instead."""
    manager = cg.CgroupManager.detect(f"mcp-cg-pool-{os.getpid()}", requested)
    if not manager.available:
        pytest.skip(f"no writable cgroup {requested} hierarchy here: {manager.notes}")
    pool = cg.CgroupPool(manager, keep=1)
    try:
        first = pool.create("first", Limits(pids=7, cpu_quota=0.5, memory_bytes=64 << 20))
        burner = subprocess.Popen(
            [
                "python3",
                "-c",
                "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass",
            ]
        )
        first.attach(burner.pid)
        assert burner.wait(timeout=10) == 0
        first_cpu = first.usage().cpu_time_s
        assert first_cpu is not None
        assert first_cpu >= 0.15
        part = manager.reusable(first)
        pool.release(first)
        if part is None:  # pure v2 with the memory controller: nothing is kept
            assert pool.kept == 0
            assert not any(os.path.exists(d) for d in first.dirs)
            return
        assert pool.kept == 1
        assert pool.kept_dirs == set(part.dirs)
        assert not any(os.path.exists(d) for d in set(first.dirs) - set(part.dirs))

        # Other limits: written; the same limits: still right.
        for limits in (
            Limits(pids=9, cpu_quota=0.25, memory_bytes=32 << 20),
            Limits(pids=9, cpu_quota=0.25, memory_bytes=32 << 20),
        ):
            task = pool.create("next", limits)
            assert set(part.dirs) <= set(task.dirs)
            assert pool.kept == 0
            fresh = manager.create("fresh", limits)
            assert _limit_values(task, manager) == _limit_values(fresh, manager)
            fresh.remove()
            usage = task.usage().cpu_time_s
            assert usage is not None
            assert 0 <= usage < 0.05
            pool.release(task)
            assert pool.kept == 1

        # Kept directories removed behind the pool's back: the task gets new ones.
        pool.release(pool.create("gone", Limits()))
        assert pool.kept == 1
        for d in pool.kept_dirs:
            os.rmdir(d)
        task = pool.create("fresh", Limits())
        assert all(os.path.isdir(d) for d in task.dirs)
        assert pool.kept == 0
        task.discard()

        # A process left behind: the whole cgroup is killed and removed.
        task = pool.create("left", Limits())
        sleeper = subprocess.Popen(["sleep", "1000"])
        try:
            task.attach(sleeper.pid)
            pool.release(task)
            assert sleeper.wait(timeout=5) == -9
        finally:
            sleeper.kill()
            sleeper.wait()
        assert pool.kept == 0
        assert not any(os.path.exists(d) for d in task.dirs)

        # A zombie (not listed in cgroup.procs, still counted): not kept either.
        task = pool.create("zombie", Limits())
        zombie = subprocess.Popen(["sleep", "1000"])
        try:
            task.attach(zombie.pid)
            os.kill(zombie.pid, signal.SIGKILL)  # not reaped until wait()
            deadline = time.monotonic() + 5
            while task.procs() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert task.procs() == []
            pids_counted = "pids" in task.v1_dirs or "pids" in manager.v2_controllers
            pool.release(task)
            assert pool.kept == (0 if pids_counted else 1)
        finally:
            zombie.wait()
        if not pids_counted:
            pool.create("again", Limits()).discard()

        # Beyond ``keep``, and after close, cgroups are removed.
        a, b = pool.create("a", Limits()), pool.create("b", Limits())
        pool.release(a)
        pool.release(b)
        assert pool.kept == 1
        assert not any(os.path.exists(d) for d in b.dirs)
        pool.close()
        assert pool.kept == 0
        assert not any(os.path.exists(d) for d in a.dirs)
    finally:
        pool.close()
        manager.close()
    assert not any(os.path.exists(d) for d in manager.created)


@integration
def test_orphaned_pid1_is_reaped_by_the_gateway() -> None:
    """As a subreaper, the gateway gets the orphan bwrap leaves (its pid 1) and reaps it."""
    assert become_subreaper()
    # sh forks a child and exits at once, as bwrap's monitor leaves pid 1.
    parent = subprocess.run(
        ["sh", "-c", "sleep 0.2 & echo $!"], capture_output=True, text=True, check=True
    )
    orphan = int(parent.stdout)
    pidfd = os.pidfd_open(orphan)
    assert _parent_pid(orphan) == os.getpid()
    _reap_pid1(pidfd, timeout_s=5)
    assert not os.path.exists(f"/proc/{orphan}")


def _orphan(seconds: float) -> int:
    """A process adopted by this one (a subreaper now) that exits after ``seconds``."""
    assert become_subreaper()
    # Its output goes elsewhere: run() must not wait for it to close the pipes.
    parent = subprocess.run(
        ["sh", "-c", f"sleep {seconds} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(parent.stdout)


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@integration
def test_a_pid1_slower_than_the_wait_is_reaped_later() -> None:
    """A pid 1 still exiting when _reap_pid1 stops waiting does not stay a zombie for good."""
    orphan = _orphan(0.3)
    pidfd = os.pidfd_open(orphan)
    _reap_pid1(pidfd, timeout_s=0.01)
    assert _parent_pid(orphan) == os.getpid()  # still running: kept, not given up
    assert _reap_late() >= 1
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    assert poller.poll(5000), "the orphan did not exit"
    assert _parent_pid(orphan) == os.getpid()  # a zombie now, until someone reaps it
    assert _reap_late() == 0
    assert _gone(orphan)


@integration
async def test_the_cleaner_reaps_a_late_pid1_while_no_run_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clean-up thread's idle wait wakes up for late pid 1s: no later run is needed."""
    manager = cg.CgroupManager.detect(f"mcp-cg-late-{os.getpid()}")
    if not manager.available:
        pytest.skip(f"no writable cgroup hierarchy here: {manager.notes}")
    monkeypatch.setattr(sandbox_mod, "_LATE_RETRY_S", 0.05)
    orphan = _orphan(0.5)
    _reap_pid1(os.pidfd_open(orphan), timeout_s=0.01)
    pool = cg.CgroupPool(manager)
    try:
        cleaner = _Cleaner(pool)
        cleaner.remove(pool.create("last", Limits()))  # the last run ends; none comes after
        cleaner.join()
        assert _parent_pid(orphan) == os.getpid()  # still sleeping, and still ours
        await until(lambda: _gone(orphan))
        assert _gone(orphan)
    finally:
        pool.close()
        manager.close()


@integration
def test_cgroups_off_and_unusable_hosts() -> None:
    """Disabled or absent cgroups give mode ``unavailable`` with a reason, never an error."""
    off = cg.CgroupManager.detect(requested="off")
    assert off.mode == "unavailable"
    assert off.notes
    none = cg.CgroupManager.detect(
        mountinfo="1 0 0:1 / / rw - ext4 /dev/x rw\n", proc_cgroup="0::/\n"
    )
    assert none.mode == "unavailable"
    assert none.kill_method == "none"
    with pytest.raises(OSError):
        none.create("x", Limits())


@integration
def test_permissions_of_private_dev_nodes(sandbox: BwrapSandbox) -> None:
    """As root the sandbox's device nodes are private copies owned by nobody."""
    if sandbox.dev_dir is None:
        pytest.skip("the gateway is not root: host device nodes are not owned by the sandbox")
    assert stat.S_IMODE(os.stat(sandbox.dev_dir).st_mode) == 0o700
    null = os.stat(os.path.join(sandbox.dev_dir, "null"))
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_uid == 65534
    assert null.st_rdev == os.stat("/dev/null").st_rdev
