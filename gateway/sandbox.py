"""Running one command in a bubblewrap sandbox, and the seam the core talks to.

:class:`Sandbox` is the protocol; :class:`BwrapSandbox` the production
implementation.  What the sandbox *looks like* is decided by
:func:`gateway.bwrap.build_bwrap_argv` and :mod:`gateway.seccomp`; resource
control by :mod:`gateway.cgroups`.  This module does the process plumbing.

One run, step by step
---------------------
1. Validate the request (:func:`gateway.bwrap.validate_request`).
2. On a spawner thread (:class:`_Spawner`; steps 2 and 3 are one
   hand-over from the event loop), spawn bwrap with ``subprocess.Popen``:
   ``close_fds=True``, an empty
   environment, its own session, and ``pass_fds`` = exactly the fds bwrap
   consumes and closes before exec (seccomp program, synthetic passwd and
   group, ``--block-fd``, ``--info-fd``).  stdin is a sealed memfd holding
   ``req.stdin`` (or ``/dev/null``), so nothing has to be written to a pipe
   while the command runs; stdout and stderr are pipes.
3. While bwrap sets the sandbox up, the same thread creates the task cgroup
   with its limits.  bwrap writes the host pid of its pid-1 child to the
   info fd and the child blocks on the block fd *before forking the
   command*.  Until then the child is the only process of the sandbox, so
   moving it into the task cgroup and applying rlimits to it with
   ``prlimit(2)`` is race-free: everything the command ever forks inherits
   them.  (bwrap's own monitor process stays outside: it runs nothing of
   the caller's.)  Back on the event loop, the run's gate (the decision
   record's durability) is awaited, and only then is the block fd released.
4. stdout/stderr are read in ``chunk_bytes`` pieces with ``add_reader``;
   each stream delivers at most ``limits.output_bytes`` to ``on_output``,
   then keeps draining and only counts, so memory stays flat.
5. The run ends when bwrap exits (the command's status, ``128+N`` for
   signal N), the wall-clock timeout fires (SIGKILL the tree), or ``cancel``
   is set (SIGTERM to the command's processes, ``kill_grace_s``, SIGKILL).
   "The tree" is the cgroup (``cgroup.kill``/freezer); without cgroups it is
   bwrap's pid namespace: SIGKILL to its pid 1 (through a pidfd, so never a
   recycled pid) kills every process in the namespace, daemons included.

Reaping and measuring
---------------------
CPU time and peak memory come from the task cgroup (``cpu.stat`` or
``cpuacct.usage``; ``memory.peak`` or ``memory.max_usage_in_bytes``).

The process is reaped by the gateway itself, not by an asyncio child
watcher (those reap with ``waitpid`` and throw the resource usage away): a
``pidfd`` of the child is watched with ``loop.add_reader`` and, once
readable, ``os.wait4(pid, WNOHANG)`` returns status and rusage.
``Popen.returncode`` is set afterwards so ``Popen`` never reaps (or warns
about) the pid again.  A process-wide ``FastChildWatcher`` (``waitpid(-1)``)
would steal the status; the run then reports an error instead.

bwrap's own rusage is *not* the sandbox's: its monitor exits as soon as the
command does, without reaping its pid-1 child (so the command tree's usage
is lost to whoever inherits that orphan), and its ``ru_maxrss`` starts at
the gateway's RSS (an exec records the old address space's high-water
mark).  So when the cgroup cannot measure (no cgroups, or no memory
controller), bwrap is started through a small subreaper shim
(:data:`_SUBREAPER_SHIM`): it inherits bwrap's orphaned pid 1, reaps it
with ``wait4`` and reports the sum of CPU time and the pid 1's peak RSS,
which covers every process of the sandbox because all of them are reaped
inside the pid namespace.  That costs one short-lived interpreter per run,
only on hosts without usable cgroups.

bwrap's ``--die-with-parent`` uses ``PR_SET_PDEATHSIG``, which fires when the
*thread* that forked bwrap exits, so every bwrap is forked by a thread that
lives as long as the process: a dedicated spawner thread (:class:`_Spawner`),
never a pool worker that could retire while its sandboxes run, or the main
thread.

Warm sandboxes
--------------
With ``warm`` > 0, a run that has released its command starts sandboxes
like its own ahead of time (:meth:`BwrapSandbox._warm_up`, see
:mod:`gateway.warm`): bwrap runs ``/bin/sh`` reading a script from a pipe,
set up as SCHED_IDLE on ``sandbox-warm`` threads, its pid 1 moved into a
cgroup of its own before it forks the launcher.  A later request that fits
takes one (:meth:`BwrapSandbox._take_warm`, from :meth:`prestart` or
:meth:`run`): its cgroup gets the granted limits, the launcher the granted
rlimits, all three processes the gateway's priority; at the gate the
script (``exec`` of the command) is written instead of the block fd being
released.

Begun early
-----------
:meth:`BwrapSandbox.prestart` forks bwrap (step 2 alone) before the run is
decided, so bwrap's namespace and mount set-up overlaps the decision.  On
the main thread (the event loop's, in the gateway) it forks right there:
the fork is due before anything else the loop does for that request, and a
hand-over to a spawner thread would have to wait for the GIL the loop holds
while it decides.  The run that takes it over (``early=``) does step 3 with
its own, granted limits; a discarded one is killed while bwrap still waits
on its block fd, before the command exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import os
import queue
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

import structlog

from gateway import bwrap as bw
from gateway.cgroups import CgroupManager, CgroupPool, Requested, TaskCgroup
from gateway.errors import InvalidArgument, Unavailable
from gateway.models import Limits, RunResult, SandboxRequest, Stream
from gateway.seccomp import default_program, sealed_memfd, seccomp_fd
from gateway.tracing import Tracing
from gateway.warm import LAUNCHER, WarmPool, classify_launch_failure, launch_script, warm_key

__all__ = [
    "BwrapSandbox",
    "OutputCallback",
    "OutputCap",
    "Prestarted",
    "Sandbox",
    "check_bwrap",
    "classify_bwrap_failure",
    "decode_status",
    "parse_info",
    "plan_rlimits",
]

OutputCallback = Callable[[Stream, bytes], None]
_T = TypeVar("_T")
log = structlog.get_logger("gateway.sandbox")

# How much of stderr is kept to recognise bwrap's own error messages.
_STDERR_HEAD = 4096
# Generous: bwrap needs milliseconds to write its info; a stuck host needs a bound.
_SETUP_TIMEOUT_S = 30.0
# After bwrap exits, how long the output pipes may take to reach EOF.
_DRAIN_TIMEOUT_S = 5.0
# After bwrap exits, pipes that are not at EOF by then are held by a
# survivor (a daemonized child): the task cgroup is killed.
_QUIET_EOF_S = 0.02
# Without cgroups, bwrap is started through this subreaper shim (run by the
# gateway's own interpreter with -I -S).  bwrap's monitor exits as soon as
# the command does, without reaping its pid 1, so its rusage misses the
# whole sandbox; as a child subreaper the shim inherits that pid 1, reaps
# it with wait4 and reports the sum.  It dies with the gateway (PDEATHSIG),
# and bwrap's --die-with-parent then takes the sandbox down.
_SUBREAPER_SHIM = """\
import ctypes, json, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
parent = os.getppid()
libc.prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != parent:
    os._exit(125)
libc.prctl(36, 1, 0, 0, 0)
report = int(sys.argv[1])
os.set_inheritable(report, False)
argv = sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
# Only bwrap may hold the sandbox's fds: the pipes must reach EOF without us.
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.closerange(3, report)
os.closerange(report + 1, 1 << 16)
status, cpu, own_rss, rss = None, 0.0, 0, 0
while True:
    try:
        child, st, ru = os.wait4(-1, 0)
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    cpu += ru.ru_utime + ru.ru_stime
    if child == pid:
        status, own_rss = st, ru.ru_maxrss
    else:
        rss = max(rss, ru.ru_maxrss)
doc = {"status": status, "cpu_s": cpu, "maxrss_kib": rss or own_rss}
os.write(report, json.dumps(doc).encode())
"""

# Real signals are 1..64; bwrap reports death by signal N as exit 128 + N.
_MAX_SIGNAL = 64
_RLIMITS = (
    resource.RLIMIT_CORE,
    resource.RLIMIT_NOFILE,
    resource.RLIMIT_FSIZE,
    resource.RLIMIT_CPU,
    resource.RLIMIT_NPROC,
    resource.RLIMIT_AS,
)


class Sandbox(Protocol):
    """Runs one command in isolation; the core's only way to execute anything."""

    async def run(
        self,
        req: SandboxRequest,
        on_output: OutputCallback,
        cancel: asyncio.Event,
        *,
        gate: Awaitable[None] | None = None,
        early: Prestarted | None = None,
    ) -> RunResult:
        """Run ``req`` to completion, timeout or cancellation.

        ``gate``, when given, must end before the command starts (the
        sandbox may be set up meanwhile); if it raises, the command never
        runs and the result carries ``error``.  ``early`` is what
        :meth:`prestart` began for this run; the run takes it over (and
        discards it if it was started for a different request).

        ``on_output(stream, data)`` receives at most ``limits.output_bytes``
        per stream, in order, as it is produced.  A failing command is a
        normal result; a sandbox that could not start the command returns
        a result with ``error`` set.  Raises
        :class:`~gateway.errors.InvalidArgument` for a request that must not
        be run at all.  Every process the command started is gone when
        this returns.
        """
        ...

    def prestart(self, req: SandboxRequest) -> Prestarted | None:
        """Begin setting ``req``'s sandbox up before the run is decided, or None.

        Nothing of the command runs: what is begun waits before the
        command until :meth:`run` (given it as ``early``) has passed its
        gate, or is undone by :meth:`Prestarted.discard`.
        """
        ...

    async def self_test(self) -> dict[str, object]:
        """Prove the sandbox works (raises :class:`~gateway.errors.Unavailable`); return details."""
        ...


class Prestarted(Protocol):
    """A sandbox begun by :meth:`Sandbox.prestart`: taken over by one run, or discarded."""

    def matches(self, req: SandboxRequest) -> bool:
        """Whether it was begun for a request that sets the sandbox up like ``req``."""
        ...

    def discard(self) -> None:
        """Undo it (idempotent; a no-op once a run has taken it over)."""
        ...


# -- pure decisions --------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class OutputCap:
    """Per-stream output accounting: deliver up to ``cap`` bytes, count everything."""

    cap: int
    delivered: int = 0
    total: int = 0

    def take(self, chunk: bytes) -> bytes:
        """Count ``chunk``; return the part of it that may still be delivered."""
        self.total += len(chunk)
        room = self.cap - self.delivered
        if room <= 0:
            return b""
        part = chunk[:room]
        self.delivered += len(part)
        return part

    @property
    def truncated(self) -> bool:
        return self.total > self.delivered


def decode_status(status: int) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` from bwrap's wait status (exactly one is not None).

    bwrap exits with the command's code, or ``128 + N`` when the command was
    killed by signal N (like a shell); such codes are reported as signal N.
    A command that itself exits with 129..192 is therefore indistinguishable
    from one killed by a signal.
    """
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255
    if 128 < code <= 128 + _MAX_SIGNAL:
        return None, code - 128
    return code, None


def classify_bwrap_failure(exit_code: int | None, stderr_head: bytes) -> tuple[str, int] | None:
    """``(error, exit_code)`` if bwrap itself failed to start the command, else None.

    bwrap reports setup failures (bad cwd, missing program, mount errors) as
    exit status 1 with a single ``bwrap: ...`` line on stderr.  A missing
    program maps to 127 and anything else to 126, as a shell would.  A
    command that prints exactly such a line and exits 1 is misreported as a
    sandbox failure of its own run; nothing else is affected.
    """
    if exit_code != 1 or not stderr_head.startswith(b"bwrap: "):
        return None
    text = stderr_head.decode("utf-8", "replace").strip()
    if "\n" in text:
        return None
    message = "sandbox: " + text.removeprefix("bwrap: ")
    if text.startswith("bwrap: execvp ") and text.endswith("No such file or directory"):
        return message, 127
    return message, 126


def parse_info(data: bytes) -> int | None:
    """The ``child-pid`` from bwrap's ``--info-fd`` JSON, or None."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    pid = doc.get("child-pid") if isinstance(doc, dict) else None
    return pid if isinstance(pid, int) and pid > 0 else None


def plan_rlimits(
    limits: Limits,
    current: Mapping[int, tuple[int, int]],
    *,
    pids_cgroup: bool,
    memory_cgroup: bool,
) -> list[tuple[int, tuple[int, int]]]:
    """``(resource, (soft, hard))`` to apply to the sandbox's pid 1 (pure).

    Always: no core dumps, ``nofile``, ``fsize`` and ``cpu_seconds`` (SIGXCPU
    at the soft limit, SIGKILL one second later).  Without a pids cgroup,
    RLIMIT_NPROC = ``pids`` (since Linux 5.14 it counts per user namespace,
    so it bounds this sandbox only); without a memory cgroup, RLIMIT_AS =
    ``memory_bytes`` (per process, coarser than the cgroup).  Values are
    clamped to the current hard limits, which an unprivileged gateway
    cannot raise; ``current`` maps resource -> (soft, hard).
    """
    inf = resource.RLIM_INFINITY
    wanted: list[tuple[int, int, int]] = [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, limits.nofile, limits.nofile),
        (resource.RLIMIT_FSIZE, limits.fsize_bytes, limits.fsize_bytes),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
    ]
    if not pids_cgroup:
        # bwrap's pid 1 counts too.
        wanted.append((resource.RLIMIT_NPROC, limits.pids + 1, limits.pids + 1))
    if not memory_cgroup:
        wanted.append((resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))
    plan: list[tuple[int, tuple[int, int]]] = []
    for res, soft, hard in wanted:
        cur_hard = current.get(res, (inf, inf))[1]
        if cur_hard != inf:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        plan.append((res, (soft, hard)))
    return plan


# -- I/O helpers -----------------------------------------------------------------------


def _memfd(name: str, data: bytes) -> int:
    """A read-only fd on a sealed memfd holding ``data``, at offset 0."""
    fd = sealed_memfd(name, data)
    try:
        return _reopen(fd)
    finally:
        os.close(fd)


def _reopen(sealed: int) -> int:
    """A fresh read-only open file description of the sealed memfd ``sealed``.

    The reader cannot write (seals) or even hold a writable fd, and has an
    offset of its own at 0: one sealed memfd serves any number of spawns.
    """
    return os.open(f"/proc/self/fd/{sealed}", os.O_RDONLY | os.O_CLOEXEC)


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _children(pid: int, tid: int) -> list[int]:
    """The children forked by thread ``tid`` of process ``pid``; raises OSError or ValueError."""
    with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
        return [int(k) for k in fh.read().split()]


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (best effort, via /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = _children(current, int(tid))
            except (OSError, ValueError):
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


def _parent_pid(pid: int) -> int:
    # /proc/PID/stat is "pid (comm) state ppid ...", comm may hold anything but
    # ends at the last ")"; far cheaper for the kernel to render than status.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        return int(fields[1])
    except (IndexError, ValueError):
        raise ProcessLookupError(errno.ESRCH, f"no parent pid for {pid}") from None


def _bwrap_pid(spawned: int, child: int, *, shim: bool) -> int:
    """bwrap's pid: the parent of ``child``, which must be our child ``spawned`` (or the shim's).

    Checked, because if bwrap had died meanwhile ``child`` would have been
    reparented (to the shim, or to the host's init), and that process must
    never be moved into a task cgroup.
    """
    parent = _parent_pid(child)
    ok = (parent != spawned and _parent_pid(parent) == spawned) if shim else parent == spawned
    if not ok:
        raise ProcessLookupError(errno.ESRCH, "bwrap exited during setup")
    return parent


def check_bwrap(path: str) -> os.stat_result:
    """Fail closed unless ``path`` is an executable, non-setuid, non-setgid bwrap."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Unavailable(f"bubblewrap not found at {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise Unavailable(f"{path} is not an executable file")
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        # A setuid bwrap runs its setup as root on behalf of the caller and
        # changes the threat model this sandbox was built and tested for.
        raise Unavailable(f"{path} is setuid/setgid; refusing to use it")
    return st


def _make_dev_dir(parent: str | None) -> str:
    """A private directory of :data:`~gateway.bwrap.DEV_NODES` owned by nobody.

    Needed only when the gateway runs as root: the sandbox user then maps
    to host uid 0, which owns the host's device nodes and could chmod them
    through the binds bwrap's ``--dev`` makes.  These copies (same device
    numbers, owner 65534, in a 0700 directory) are mounted over them.
    """
    path = tempfile.mkdtemp(prefix="mcp-gateway-dev-", dir=parent)
    if os.statvfs(path).f_flag & os.ST_NODEV:
        shutil.rmtree(path, ignore_errors=True)
        raise Unavailable(f"{path} is on a nodev file system; device nodes would not work there")
    try:
        for node in bw.DEV_NODES:
            host = os.stat(f"/dev/{node}")
            target = os.path.join(path, node)
            os.mknod(target, stat.S_IFCHR | 0o666, host.st_rdev)
            # Same mode as the host nodes, whatever the umask.
            os.chmod(target, 0o666)  # noqa: S103
            os.chown(target, 65534, 65534)
    except OSError as exc:
        shutil.rmtree(path, ignore_errors=True)
        raise Unavailable(f"cannot create private device nodes in {path}: {exc}") from exc
    return path


def _self_test_argvs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(true, seccomp probe)`` command lines available on this host (I/O: stat)."""
    true = next((p for p in ("/usr/bin/true", "/bin/true") if os.path.exists(p)), None)
    if true is None:
        raise Unavailable("self-test: no 'true' program on this host")
    if os.path.exists("/usr/bin/unshare"):
        return (true,), ("/usr/bin/unshare", "-U", true)
    if os.path.exists("/usr/bin/python3"):
        return (true,), (
            "/usr/bin/python3",
            "-c",
            "import ctypes,os,sys\n"
            "libc=ctypes.CDLL(None,use_errno=True)\n"
            "r=libc.unshare(0x10000000)\n"
            "sys.stderr.write(os.strerror(ctypes.get_errno()) if r else 'unshare worked')\n"
            "sys.exit(1 if r else 0)\n",
        )
    raise Unavailable("self-test: neither unshare nor python3 to probe seccomp")


class _Pump:
    """Reads one output pipe on the event loop and hands capped chunks on."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        stream: Stream,
        cap: OutputCap,
        on_output: OutputCallback,
        chunk_bytes: int,
        keep_head: int = 0,
    ) -> None:
        self.loop = loop
        self.fd = fd
        self.stream: Stream = stream
        self.cap = cap
        self.on_output = on_output
        self.chunk_bytes = chunk_bytes
        self.keep_head = keep_head
        self.head = bytearray()
        self.done: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None
        self._open = True
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, self.chunk_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if len(self.head) < self.keep_head:
            self.head += data[: self.keep_head - len(self.head)]
        part = self.cap.take(data)
        if part and self.error is None:
            try:
                self.on_output(self.stream, part)
            except Exception as exc:  # reported by run(); the pipe must keep draining
                self.error = exc

    def close(self) -> None:
        if self._open:
            self._open = False
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
        if not self.done.done():
            self.done.set_result(None)


@dataclasses.dataclass(slots=True)
class _Exit:
    """bwrap's wait status and the resources of everything it ran."""

    status: int | None  # None: lost (reaped by someone else, or no shim report)
    cpu_s: float = 0.0
    maxrss_bytes: int = 0


class _Reaper:
    """Waits for one child through a pidfd and reaps it with ``wait4`` (keeps rusage)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes]) -> None:
        self.loop = loop
        self.proc = proc
        self.pidfd = os.pidfd_open(proc.pid)
        self.exited: asyncio.Future[_Exit] = loop.create_future()
        loop.add_reader(self.pidfd, self._ready)

    def _ready(self) -> None:
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            self._finish(_Exit(None))
            return
        if pid == 0:
            return
        self._finish(_Exit(status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024))

    def _finish(self, result: _Exit) -> None:
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        # Popen must not wait for (or warn about) a pid that is already reaped.
        self.proc.returncode = (
            -1 if result.status is None else os.waitstatus_to_exitcode(result.status)
        )
        if not self.exited.done():
            self.exited.set_result(result)

    def close(self) -> None:
        if self.pidfd >= 0:
            self.loop.remove_reader(self.pidfd)
            _close(self.pidfd)
            self.pidfd = -1


_PR_SET_CHILD_SUBREAPER = 36
# How long pid 1 may take to exit after bwrap has (it is SIGKILLed by then).
_PID1_EXIT_S = 2.0


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; whether it worked.

    bwrap's monitor exits as soon as the command does, without reaping the
    sandbox's pid 1.  That zombie goes to the nearest subreaper, else to the
    host's init, which may take its time (seconds, on some hosts) while the
    zombie still counts in its cgroup's ``pids.current``.  As a subreaper
    the gateway gets it and reaps it itself (:func:`_reap_pid1`).

    The flag is the whole process's, for good: it adopts every orphan of
    its descendants, and reaps only sandboxes' pid 1.  The gateway forks
    nothing else that leaves orphans; a program that embeds the sandbox
    and starts other process trees (a bare ``bwrap``, a daemon) gets their
    orphans as zombies, each holding its pid namespace.  On the benchmark
    VM, about 2,900 of them made a bare bwrap loop 43% slower.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def _reap_pid1(pidfd: int, timeout_s: float = _PID1_EXIT_S) -> None:
    """Reap the sandbox's pid 1 through its pidfd, once it has exited; close the pidfd.

    Blocking (up to ``timeout_s`` for the exit): call it off the event loop,
    after bwrap itself is reaped.  Nothing happens if the process is not
    (or no longer) this process's child: no subreaper, or reaped already.
    A pid 1 still exiting after ``timeout_s`` (a big address space to free,
    say) is kept for :func:`_reap_late`: given up, it would stay a zombie
    of the gateway for good.
    """
    if pidfd < 0:
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(timeout_s * 1000)
    except BaseException:
        _close(pidfd)
        raise
    if not _reaped(pidfd):
        with _LATE_LOCK:
            _LATE.append(pidfd)


def _reaped(pidfd: int) -> bool:
    """Reap the process of ``pidfd`` if it has exited (never blocks); True, with
    the pidfd closed, once there is nothing left to wait for.

    Nothing is left either when it is not (or no longer) our child, or when
    the kernel refuses to wait on it at all.
    """
    try:
        if os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is None:
            return False
    except OSError:
        pass
    _close(pidfd)
    return True


# pid 1s that outlived _reap_pid1's wait: their pidfds, until they are reaped.
_LATE: list[int] = []
_LATE_LOCK = threading.Lock()


def _reap_late() -> int:
    """Reap the late pid 1s that have exited by now (never blocks); how many still wait."""
    with _LATE_LOCK:
        pending, _LATE[:] = list(_LATE), []
    waiting = [pidfd for pidfd in pending if not _reaped(pidfd)]
    with _LATE_LOCK:
        _LATE.extend(waiting)
        return len(_LATE)


@dataclasses.dataclass(slots=True)
class _Spawned:
    """What the spawner thread hands back: bwrap and the parent-side fds."""

    popen: subprocess.Popen[bytes]
    block_w: int
    info_r: int
    out_r: int
    err_r: int
    report_r: int
    cgroup: TaskCgroup | None = None
    child_pid: int | None = None  # bwrap's child: pid 1 of the sandbox
    child_pidfd: int = -1
    bwrap_pid: int | None = None
    error: str | None = None  # why the command must not run
    # A warm sandbox (see gateway.warm): its launcher, pid 1's only child,
    # waits for the script the gateway writes into ``launcher_w``.
    launcher_w: int = -1
    launcher_pid: int | None = None
    confined: Limits | None = None  # the limits a warm sandbox is confined with
    # The workspace directory a warm sandbox binds: (path, (st_dev, st_ino)).
    workspace: tuple[str, tuple[int, int]] | None = None
    discarded: bool = False


_DISCARD_LOCK = threading.Lock()


def _discard_spawned(pending: asyncio.Future[_Spawned]) -> None:
    """A start whose run was cancelled meanwhile: undo it."""
    if not pending.cancelled() and pending.exception() is None:
        _discard(pending.result())


def _discard(spawned: _Spawned) -> None:
    """Kill a bwrap that never ran its command (still blocked) and release what it had.

    Idempotent: a warm sandbox may be discarded both by :meth:`BwrapSandbox.close`
    and by the pool it was on its way to.
    """
    with _DISCARD_LOCK:
        if spawned.discarded:
            return
        spawned.discarded = True
    with contextlib.suppress(OSError):
        os.killpg(spawned.popen.pid, signal.SIGKILL)
    if spawned.child_pidfd >= 0:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(spawned.child_pidfd, signal.SIGKILL)
    _close(
        spawned.block_w,
        spawned.info_r,
        spawned.out_r,
        spawned.err_r,
        spawned.report_r,
        spawned.launcher_w,
    )
    pidfd, spawned.child_pidfd = spawned.child_pidfd, -1
    _reap_later(spawned.popen, pidfd, cgroup=spawned.cgroup)


def _reap_later(
    popen: subprocess.Popen[bytes],
    pid1_fd: int,
    *,
    wait: bool = True,
    cgroup: TaskCgroup | None = None,
) -> None:
    """On a thread of its own: wait for bwrap (``wait``), reap its pid 1, discard ``cgroup``.

    :func:`_join_reapers` waits for these threads (a sandbox's close, so
    that its base cgroup directories are empty by the time it removes them).
    """

    def reap() -> None:
        try:
            if wait:
                popen.wait()
            _reap_pid1(pid1_fd)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.discard()
        finally:
            with _REAPERS_LOCK:
                _REAPERS.discard(threading.current_thread())

    thread = threading.Thread(target=reap, name="bwrap-reap", daemon=True)
    with _REAPERS_LOCK:
        _REAPERS.add(thread)
    thread.start()


# How long a sandbox's close waits for discarded sandboxes to be cleaned up.
_CLOSE_REAP_S = 5.0
_REAPERS: set[threading.Thread] = set()
_REAPERS_LOCK = threading.Lock()


def _join_reapers(timeout_s: float) -> None:
    """Wait, at most ``timeout_s`` in all, for the reaping threads started so far."""
    deadline = time.monotonic() + timeout_s
    with _REAPERS_LOCK:
        pending = list(_REAPERS)
    for thread in pending:
        thread.join(max(0.0, deadline - time.monotonic()))


def _undo(forked: asyncio.Future[_Spawned] | None) -> None:
    """Discard a fork whose run will not take it, now or once it is done."""
    if forked is None:
        return
    if forked.done():
        _discard_spawned(forked)
    else:
        forked.add_done_callback(_discard_spawned)


async def _claim(pending: asyncio.Future[_Spawned]) -> _Spawned:
    """Wait for a start; if the waiter is cancelled, the start is undone once it ends."""
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        _undo(pending)
        raise


def _setup_key(req: SandboxRequest) -> tuple[object, ...]:
    """What bwrap is forked with: its command line and fds (limits apply later)."""
    lim = req.limits
    return (
        req.task_id,
        req.argv,
        req.workspace,
        req.cwd,
        req.env,
        req.stdin,
        lim.network,
        lim.tmp_size_bytes,
    )


class _Early:
    """A bwrap forked by :meth:`BwrapSandbox.prestart`: blocked before the command.

    Its first run with a matching request takes it over; otherwise
    :meth:`discard` kills it.  Only the fork happens early: the cgroup,
    the rlimits and the gate are the run's, with the run's own limits.
    """

    __slots__ = ("_forked", "_key")

    def __init__(self, key: tuple[object, ...], forked: asyncio.Future[_Spawned]) -> None:
        self._key = key
        self._forked: asyncio.Future[_Spawned] | None = forked

    def matches(self, req: SandboxRequest) -> bool:
        return self._forked is not None and _setup_key(req) == self._key

    def take(self, req: SandboxRequest) -> asyncio.Future[_Spawned] | None:
        """The fork, for a run of ``req``; None (and discarded) if it does not match."""
        forked = self._forked if self.matches(req) else None
        if forked is None:
            self.discard()
        self._forked = None
        return forked

    def discard(self) -> None:
        forked, self._forked = self._forked, None
        _undo(forked)


def _take(early: Prestarted | None, req: SandboxRequest) -> asyncio.Future[_Spawned] | None:
    if early is None:
        return None
    if isinstance(early, _Early):
        return early.take(req)
    early.discard()  # another sandbox's: not ours to run
    return None


def _read_info(fd: int, timeout_s: float) -> bytes | None:
    """bwrap's info document from ``fd`` (blocking, bounded), or None on timeout.

    bwrap's parent writes the whole JSON object right after it cloned the
    child, while the child is still setting the sandbox up; reading up to
    EOF would also wait for the child to close its copy of the fd, at the
    end of its setup.  Returning on the first complete object lets the
    cgroup placement overlap that setup.  At EOF, whatever came is returned.
    """
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk or len(data) >= 65536:
            return bytes(data)
        data.extend(chunk)
        if data.rstrip().endswith(b"}") and parse_info(bytes(data)) is not None:
            return bytes(data)


def _launcher_of(pid1: int) -> int | None:
    """The host pid of a warm sandbox's launcher (pid 1's only child), None if not forked yet."""
    kids = _children(pid1, pid1)
    if len(kids) > 1:
        raise OSError(errno.EPROTO, f"expected one child of the sandbox's pid 1, found {len(kids)}")
    return kids[0] if kids else None


_WarmKey = tuple[str, str, bool, int]
_WarmPool = WarmPool[_WarmKey, _Spawned, "asyncio.Future[_Spawned]"]
# How often a taken warm sandbox that is still setting up is looked at.
_LAUNCHER_POLL_S = 0.0005


def _idle_and_back(nice: int) -> bool:
    """Whether a thread of this process may become SCHED_IDLE and then ``nice`` again.

    Tried on a thread of its own, which ends either way.  Going back needs
    CAP_SYS_NICE or an RLIMIT_NICE that allows ``nice`` (systemd's
    ``LimitNICE=``); a seccomp filter may refuse both calls.
    """
    works: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            works.append(False)
        else:
            works.append(True)

    thread = threading.Thread(target=probe, name="sandbox-sched-probe")
    thread.start()
    thread.join()
    return works == [True]


def _pending_output(fd: int) -> bytes:
    """What can be read from ``fd`` now without waiting (at most 4 KiB)."""
    try:
        ready, _, _ = select.select([fd], [], [], 0)
        return os.read(fd, 4096) if ready else b""
    except OSError:
        return b""


def _dir_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _alive(spawned: _Spawned) -> bool:
    """Whether a warm sandbox's bwrap and pid 1 still run (its launcher is checked when taken)
    and its workspace path still names the directory it binds (not one put there since)."""
    if spawned.popen.poll() is not None or spawned.child_pid is None:
        return False
    if spawned.workspace is not None:
        path, bound = spawned.workspace
        try:
            if _dir_id(path) != bound:
                return False
        except OSError:
            return False
    try:
        signal.pidfd_send_signal(spawned.child_pidfd, 0)
        # Still bwrap's: a pid 1 whose bwrap died is an orphan on its way out.
        return _parent_pid(spawned.child_pid) == spawned.popen.pid
    except OSError:
        return False


def _launch(run: _Run, fd: int) -> bool:
    """Write ``run``'s script to a warm sandbox's launcher; False with ``run.error``."""
    script = launch_script(run.req)
    if script is None:  # taken for a request it cannot run: never happens (see _take_warm)
        run.error = "sandbox: the request cannot be run by a launcher"
        return False
    try:
        # At most PIPE_BUF into an empty pipe: one atomic write that never blocks.
        written = os.write(fd, script)
    except OSError as exc:
        written = -1
        run.error = f"sandbox: cannot hand the command to the sandbox: {exc.strerror or exc}"
    if 0 <= written < len(script):
        run.error = "sandbox: cannot hand the command to the sandbox: short write"
    return written == len(script)


async def _passed(run: _Run, gate: Awaitable[None] | None) -> bool:
    """Whether the gate (if any) ended well; ``run.error`` says why not."""
    if gate is None:
        return True
    try:
        await gate
    except Exception as exc:
        run.error = f"sandbox: not started: {exc}"
        return False
    return True


_BATCH = threading.local()


def _no_wakeup_preemption() -> None:
    """Make the calling helper thread SCHED_BATCH: woken, it waits for a free CPU.

    A woken thread of the normal policy often preempts its waker, here the
    event loop (measured: 0.3 ms of stall on average per hand-over on the
    benchmark VM), only to wait for the interpreter lock the loop holds.
    SCHED_BATCH keeps the same weight but never preempts on wake-up.  What
    such a thread forks would inherit it: see :func:`_normal_policy`.
    Best effort: a seccomp filter may refuse it.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return
    _BATCH.on = True


@contextlib.contextmanager
def _normal_policy() -> Iterator[None]:
    """The normal policy for the calling thread meanwhile (for a fork: bwrap inherits it)."""
    if not getattr(_BATCH, "on", False):
        yield
        return
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class _Spawner:
    """The threads that start every bwrap, each for the whole life of the process.

    bwrap's ``--die-with-parent`` is ``PR_SET_PDEATHSIG``, which fires when
    the *thread* that forked bwrap exits; these threads never exit before
    the process does, so a sandbox dies exactly when the gateway does.  (A
    pool worker could retire while its sandboxes still run.)  A start
    blocks its thread until bwrap reports its child, so there are
    :data:`_SPAWN_THREADS` of them, started as needed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, loop: asyncio.AbstractEventLoop, job: Callable[[], _T]) -> asyncio.Future[_T]:
        done: asyncio.Future[_T] = loop.create_future()
        with self._lock:
            if self._idle == 0 and self._threads < _SPAWN_THREADS:
                self._threads += 1
                self._idle += 1
                threading.Thread(
                    target=self._serve, name=f"{self.name}-{self._threads}", daemon=True
                ).start()
        self._jobs.put((loop, done, job))
        return done

    def _serve(self) -> None:
        _no_wakeup_preemption()
        while True:
            loop, done, job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            try:
                outcome: tuple[Any, BaseException | None] = (job(), None)
            except BaseException as exc:  # handed to the waiting coroutine
                outcome = (None, exc)
            with self._lock:
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_settle, done, outcome)
            except RuntimeError:  # that loop is closed: nobody waits
                if isinstance(outcome[0], _Spawned):
                    _discard(outcome[0])


# Concurrent starts (each waits, bounded, for its bwrap to clone its child).
_SPAWN_THREADS = 16


def _settle(done: asyncio.Future[Any], outcome: tuple[Any, BaseException | None]) -> None:
    if done.cancelled():
        return
    result, error = outcome
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


# One per process: see _Spawner.  Warm sandboxes are started by their own
# threads, so that a start never waits behind one (see BwrapSandbox._warm_up).
_SPAWNER = _Spawner("sandbox-spawn")
_WARMER = _Spawner("sandbox-warm")


@dataclasses.dataclass(slots=True)
class _Proc:
    """The spawned bwrap and the parent-side ends of its fds."""

    popen: subprocess.Popen[bytes]
    reaper: _Reaper
    pumps: tuple[_Pump, _Pump]  # stdout, stderr
    block_w: int
    report_r: int = -1  # the subreaper shim's report (only without cgroups)
    launcher_w: int = -1  # a warm sandbox's launcher script pipe


@dataclasses.dataclass(slots=True)
class _Run:
    """Mutable bookkeeping of one run (local to :meth:`BwrapSandbox.run`)."""

    req: SandboxRequest
    started: float
    cgroup: TaskCgroup | None = None  # made by the start, on the spawner thread
    proc: _Proc | None = None
    child_pid: int | None = None  # bwrap's child: pid 1 of the sandbox
    child_pidfd: int = -1
    bwrap_pid: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None
    released_s: float | None = None  # run() start to the command's release
    warm: bool = False  # run by a warm sandbox's launcher
    warm_up: bool = True  # start warm sandboxes like this one once it is released


class BwrapSandbox:
    """The production :class:`Sandbox`: bubblewrap + seccomp + cgroups + rlimits.

    Construction checks bwrap (present, executable, not setuid/setgid:
    fail closed with :class:`~gateway.errors.Unavailable`), compiles the
    seccomp filter, probes the host layout and detects cgroups (never
    fatal: without cgroups the sandbox uses rlimits only and says so in
    :meth:`self_test`).  When the gateway runs as root it also creates
    private device nodes (see :func:`_make_dev_dir`).  Call :meth:`close`
    to remove what construction created.
    """

    def __init__(
        self,
        *,
        bwrap_path: str = "/usr/bin/bwrap",
        cgroup_parent: str = "mcp-gateway",
        cgroups: Requested = "auto",
        kill_grace_s: float = 2.0,
        chunk_bytes: int = 64 * 1024,
        dev_dir_parent: str | None = None,
        cgroup_manager: CgroupManager | None = None,
        tracing: Tracing | None = None,
        warm: int = 0,
        warm_total: int = 16,
        warm_idle_s: float = 120.0,
    ) -> None:
        check_bwrap(bwrap_path)
        self.tracing = tracing or Tracing()
        self.bwrap_path = bwrap_path
        self.kill_grace_s = kill_grace_s
        self.chunk_bytes = chunk_bytes
        self.program = default_program()
        self.layout = bw.HostLayout.probe()
        self.cgroups = cgroup_manager or CgroupManager.detect(cgroup_parent, cgroups)
        self.dev_dir = _make_dev_dir(dev_dir_parent) if os.geteuid() == 0 else None
        self._spawner = _SPAWNER
        self._own_rlimits = {res: resource.getrlimit(res) for res in _RLIMITS}
        self._cgroup_pool = CgroupPool(self.cgroups)
        # Without cgroups the subreaper shim reaps pid 1 (and reports its usage).
        self._subreaper = self.cgroups.measures_usage and become_subreaper()
        self._cleaner = _Cleaner(self._cgroup_pool)
        # Made once, sealed: every spawn reads them through a fresh descriptor.
        self._sealed = {
            "seccomp": seccomp_fd(self.program),
            "passwd": sealed_memfd("passwd", bw.synthetic_passwd()),
            "group": sealed_memfd("group", bw.synthetic_group()),
        }
        # Warm sandboxes (see gateway.warm) need the cgroup to measure the
        # command alone: the launcher's start-up is charged where it ran.
        self._warm: _WarmPool | None = None
        if warm > 0 and self.cgroups.measures_usage:
            self._warm = WarmPool(
                per_key=warm, total=warm_total, idle_s=warm_idle_s, discard=_discard
            )
        # Warm up only while fewer runs than cores are going: under load a
        # warm sandbox saves no time, and starting one takes a core's time.
        self._warm_below = os.cpu_count() or 1
        self._active = 0
        # Warm sandboxes on their way (until their start ends): bwrap once forked.
        self._warming: dict[asyncio.Future[_Spawned], list[_Spawned]] = {}
        self._warm_lock = threading.Lock()
        self._closed = False
        # Warm sandboxes are set up as SCHED_IDLE (they must not slow the runs
        # going on: they get a core only when nothing else wants it) and given
        # the gateway's own policy and nice value back when taken; only if
        # the gateway may do that (SCHED_IDLE to SCHED_OTHER needs CAP_SYS_NICE
        # or RLIMIT_NICE), else at the gateway's priority.
        self._nice = os.getpriority(os.PRIO_PROCESS, 0)
        self._chrt = shutil.which("chrt", path="/usr/bin:/bin")
        self._warm_idle = (
            warm > 0
            and self._chrt is not None
            and os.sched_getscheduler(0) == os.SCHED_OTHER
            and _idle_and_back(self._nice)
        )
        # Also at garbage collection / interpreter exit, for owners that never call close().
        self._finalizer = weakref.finalize(
            self,
            _release,
            self.dev_dir,
            self.cgroups,
            self._cleaner,
            tuple(self._sealed.values()),
            self._warm,
        )

    def close(self) -> None:
        """Kill the warm sandboxes; remove the private device nodes and the (empty)
        cgroup base directories.

        Idempotent; runs by itself at garbage collection or interpreter exit.
        Warm sandboxes still starting are killed too, even if the event loop
        that wanted them has stopped.
        """
        with self._warm_lock:
            self._closed = True
            stranded = [spawned for forked in self._warming.values() for spawned in forked]
        for spawned in stranded:
            _discard(spawned)
        self._finalizer()

    # -- running -------------------------------------------------------------------------

    async def run(
        self,
        req: SandboxRequest,
        on_output: OutputCallback,
        cancel: asyncio.Event,
        *,
        gate: Awaitable[None] | None = None,
        early: Prestarted | None = None,
        warm_up: bool = True,
    ) -> RunResult:
        """See :meth:`Sandbox.run`; ``warm_up=False`` starts no warm sandboxes after it."""
        forked = _take(early, req)
        try:
            bw.validate_request(req)
        except BaseException:
            _undo(forked)
            raise
        started = time.monotonic()
        if cancel.is_set():
            _undo(forked)
            return RunResult(exit_code=None, cancelled=True)
        if forked is None:
            forked = self._take_warm(req)
        run = _Run(req, started, warm_up=warm_up)
        self._active += 1
        try:
            return await self._run(run, on_output, cancel, gate, forked)
        finally:
            await self._cleanup(run)
            self._active -= 1

    def prestart(self, req: SandboxRequest) -> Prestarted | None:
        """See :meth:`Sandbox.prestart`: take a warm sandbox for ``req`` if one
        fits, else fork bwrap now (on this thread if it is the main thread,
        else on a spawner thread).

        The fork and bwrap's own set-up (namespaces, mounts) then overlap
        the decision; bwrap stops before the command, on its block fd (a
        warm sandbox's launcher waits for its script), whatever happens
        next.  None for a request :meth:`run` would refuse.
        """
        try:
            bw.validate_request(req)
        except InvalidArgument:
            return None
        # A warm sandbox is confined now, with the limits asked for: the cgroup
        # and rlimits overlap the decision; a run granted others rewrites them.
        warm = self._take_warm(req)
        if warm is not None:
            return _Early(_setup_key(req), warm)
        loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return _Early(_setup_key(req), self._spawner.submit(loop, lambda: self._popen(req)))
        # The main thread lives as long as the process (see _Spawner), and
        # forking here starts bwrap's set-up before the loop decides.
        forked: asyncio.Future[_Spawned] = loop.create_future()
        try:
            forked.set_result(self._popen(req))
        except OSError as exc:
            forked.set_exception(exc)
        return _Early(_setup_key(req), forked)

    # -- warm sandboxes ------------------------------------------------------------------

    @property
    def warm_waiting(self) -> int:
        """How many warm sandboxes wait for a command now."""
        return 0 if self._warm is None else len(self._warm)

    async def warm(self, req: SandboxRequest) -> int:
        """Start warm sandboxes for requests like ``req`` now and wait until they are.

        What a finished run does by itself (under the same bounds), for a
        caller that knows which requests come next.  Returns how many are
        waiting for such requests afterwards.
        """
        pool = self._warm
        if pool is None or launch_script(req) is None:
            return 0
        starts = self._warm_up(req, force=True)
        await asyncio.gather(*starts, return_exceptions=True)
        return pool.waiting(warm_key(req))

    def _take_warm(self, req: SandboxRequest) -> asyncio.Future[_Spawned] | None:
        """A warm sandbox for ``req`` being confined with its limits, if ``req`` fits
        and one waits or is starting."""
        if self._warm is None or launch_script(req) is None:
            return None
        member, starting = self._warm.take(warm_key(req), _alive)
        if member is None and starting is None:
            return None
        return asyncio.ensure_future(self._confine_taken(req, member, starting))

    async def _confine_taken(
        self,
        req: SandboxRequest,
        member: _Spawned | None,
        starting: asyncio.Future[_Spawned] | None,
    ) -> _Spawned:
        """A warm sandbox (waiting, or ``starting``), confined for ``req``.

        A start that fails is replaced by a sandbox started for ``req``.
        """
        if member is None:
            assert starting is not None  # noqa: S101 - _take_warm's contract
            # Wanted now: the rest of its set-up is no longer for idle cores.
            self._hurry(self._warming.get(starting, []))
            try:
                member = await asyncio.shield(starting)
            except OSError:
                loop = asyncio.get_running_loop()
                return await _claim(self._spawner.submit(loop, lambda: self._popen(req)))
            except asyncio.CancelledError:
                _undo(starting)
                raise
        try:
            return await self._confine_warm(req, member)
        except asyncio.CancelledError:
            _discard(member)
            raise

    def _warm_up(
        self, req: SandboxRequest, *, force: bool = False
    ) -> list[asyncio.Future[_Spawned]]:
        """Start warm sandboxes set up like ``req``'s, up to the pool's bounds.

        Called once a run has released its command (the loop mostly waits
        for it then), so the next request of the same kind finds one; not
        while as many other runs as cores are going (unless ``force``).
        """
        pool = self._warm
        if pool is None or (not force and self._active - 1 >= self._warm_below):
            return []
        key = warm_key(req)
        wanted = pool.want(key)
        if not wanted:
            return []
        template = dataclasses.replace(
            req,
            task_id=os.urandom(16).hex(),
            argv=LAUNCHER,
            env=(),
            stdin=None,
            limits=Limits(network=req.limits.network, tmp_size_bytes=req.limits.tmp_size_bytes),
        )
        loop = asyncio.get_running_loop()
        starts = []
        for _ in range(wanted):
            forked: list[_Spawned] = []
            started = _WARMER.submit(loop, functools.partial(self._warm_start, template, forked))
            with self._warm_lock:
                self._warming[started] = forked
            started.add_done_callback(self._landed)
            pool.starting(key, started)
            started.add_done_callback(functools.partial(self._warmed, pool, key))
            starts.append(started)
        return starts

    def _landed(self, started: asyncio.Future[_Spawned]) -> None:
        """A warm sandbox's start ended (for the pool, a taker, or failed):
        close() no longer answers for it."""
        with self._warm_lock:
            self._warming.pop(started, None)

    def _warmed(self, pool: _WarmPool, key: _WarmKey, started: asyncio.Future[_Spawned]) -> None:
        member = None
        if not started.cancelled():
            exc = started.exception()
            if exc is None:
                member = started.result()
            else:
                log.warning("sandbox.warm_failed", error=str(exc))
        if pool.started(key, started, member) and member is not None:
            # Dropped on time even if no run comes to look.
            asyncio.get_running_loop().call_later(pool.idle_s, pool.expire)

    async def _run(
        self,
        run: _Run,
        on_output: OutputCallback,
        cancel: asyncio.Event,
        gate: Awaitable[None] | None,
        forked: asyncio.Future[_Spawned] | None,
    ) -> RunResult:
        lim = run.req.limits
        caps: dict[Stream, OutputCap] = {
            "stdout": OutputCap(lim.output_bytes),
            "stderr": OutputCap(lim.output_bytes),
        }
        with self.tracing.span("sandbox.spawn") as span:
            proc = await self._spawn(run, asyncio.get_running_loop(), caps, on_output, forked)
            if proc is None:
                span.set_attribute("mcp.sandbox.error", run.error or "")
                return self._result(run, caps, None)
            run.proc = proc
            if run.child_pid is None or run.error is not None or not await _passed(run, gate):
                # bwrap failed (or is stuck) before reporting its child, or the
                # child could not be confined: it must never run the command.
                self._kill_now(run)
                if run.child_pid is None and run.error is None:
                    run.error = "sandbox: bwrap failed before starting the sandbox"
                span.set_attribute("mcp.sandbox.error", run.error or "")
            elif proc.launcher_w >= 0 and not _launch(run, proc.launcher_w):
                self._kill_now(run)
                span.set_attribute("mcp.sandbox.error", run.error or "")
            else:
                run.released_s = time.monotonic() - run.started
            span.set_attribute("mcp.sandbox.cgroups", self.cgroups.mode)
            span.set_attribute("mcp.sandbox.warm", run.warm)
            # Release the block fd (bwrap forks and execs the command now) or
            # close the launcher's script pipe (it has its script, or EOF).
            _close(proc.block_w, proc.launcher_w)
            proc.block_w = proc.launcher_w = -1
        # While the command runs, the loop mostly waits: start the next ones.
        if run.warm_up:
            self._warm_up(run.req)

        with self.tracing.span("command.run") as span:
            end = await self._supervise(run, proc, cancel)
            span.set_attribute("mcp.task.timed_out", run.timed_out)
            span.set_attribute("mcp.task.cancelled", run.cancelled)
            if end.status is not None:
                code, sig = decode_status(end.status)
                if code is not None:
                    span.set_attribute("process.exit.code", code)
                if sig is not None:
                    span.set_attribute("mcp.task.signal", sig)

        # bwrap is gone and its pid 1 dies with it (--die-with-parent); kill
        # whatever is left in the cgroup so that the pipes reach EOF.
        self._kill_now(run)
        if run.cgroup is not None and not await self._drained(proc, _QUIET_EOF_S):
            # Something still holds the pipes (a daemonized child): kill the tree.
            await asyncio.to_thread(run.cgroup.kill)
        await self._drain(proc)
        for pump in proc.pumps:
            if pump.error is not None:
                raise pump.error
        return self._result(run, caps, end)

    async def _supervise(self, run: _Run, proc: _Proc, cancel: asyncio.Event) -> _Exit:
        """Wait for bwrap to exit, killing the tree on timeout or cancel."""
        exited = proc.reaper.exited
        deadline = run.started + run.req.limits.timeout_s
        cancel_wait = asyncio.ensure_future(cancel.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {exited, cancel_wait}
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not exited.done():
                if cancel_wait in done:
                    run.cancelled = True
                    await self._terminate(run, proc)
                else:
                    run.timed_out = True
                    await self._kill_tree(run)
            return _shim_report(proc, await exited)
        finally:
            # Ends on the loop's next turn; nothing needs to wait for that.
            cancel_wait.cancel()

    async def _spawn(
        self,
        run: _Run,
        loop: asyncio.AbstractEventLoop,
        caps: dict[Stream, OutputCap],
        on_output: OutputCallback,
        forked: asyncio.Future[_Spawned] | None,
    ) -> _Proc | None:
        """Start bwrap (blocked before the command); None with ``run.error`` on failure.

        The fds are made and bwrap is forked on the spawner thread (a fork
        and exec block their caller until bwrap runs: not the event loop's
        business); its output pumps and reaper are then set up here.  A
        bwrap ``forked`` by :meth:`prestart` only needs its cgroup and
        confinement.
        """
        try:
            if forked is None:
                spawned = await _claim(self._spawner.submit(loop, lambda: self._start(run.req)))
            else:
                bwrap = await _claim(forked)
                if bwrap.launcher_w >= 0:
                    # A warm sandbox, confined while deciding (or failed to be).
                    spawned = bwrap
                    if spawned.error is None and spawned.confined != run.req.limits:
                        await self._confine_warm(run.req, spawned)
                else:
                    spawned = await _claim(
                        self._spawner.submit(loop, lambda: self._setup(run.req, bwrap))
                    )
        except OSError as exc:
            run.error = f"sandbox: cannot start bwrap: {exc.strerror or exc}"
            return None
        try:
            reaper = _Reaper(loop, spawned.popen)
        except OSError as exc:
            # Without a reaper we cannot supervise it: undo the start (bwrap
            # is still blocked before the command).
            _discard(spawned)
            run.error = f"sandbox: cannot supervise bwrap: {exc.strerror or exc}"
            return None
        run.cgroup = spawned.cgroup
        run.child_pid = spawned.child_pid
        run.child_pidfd = spawned.child_pidfd
        run.bwrap_pid = spawned.bwrap_pid
        run.error = spawned.error
        run.warm = spawned.launcher_w >= 0
        return _Proc(
            popen=spawned.popen,
            reaper=reaper,
            pumps=(
                _Pump(loop, spawned.out_r, "stdout", caps["stdout"], on_output, self.chunk_bytes),
                _Pump(
                    loop,
                    spawned.err_r,
                    "stderr",
                    caps["stderr"],
                    on_output,
                    self.chunk_bytes,
                    keep_head=_STDERR_HEAD,
                ),
            ),
            block_w=spawned.block_w,
            report_r=spawned.report_r,
            launcher_w=spawned.launcher_w,
        )

    def _popen(self, req: SandboxRequest, *, launcher: bool = False) -> _Spawned:
        """Make bwrap's fds and fork it (spawner thread); raises OSError, leaking nothing.

        A ``launcher`` (warm sandbox) gets a pipe as stdin instead of the
        request's, the pipe's write end in ``launcher_w``, and runs as
        SCHED_IDLE if the gateway may undo that.
        """
        child_fds: list[int] = []
        parent_fds: list[int] = []
        launcher_w = -1
        try:
            sec = _reopen(self._sealed["seccomp"])
            child_fds.append(sec)
            passwd = _reopen(self._sealed["passwd"])
            child_fds.append(passwd)
            group = _reopen(self._sealed["group"])
            child_fds.append(group)
            if launcher:
                stdin, launcher_w = os.pipe()
                parent_fds.append(launcher_w)
            elif req.stdin is not None:
                stdin = _memfd("stdin", req.stdin)
            else:
                stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            child_fds.append(stdin)
            block_r, block_w = os.pipe()
            child_fds.append(block_r)
            parent_fds.append(block_w)
            info_r, info_w = os.pipe()
            child_fds.append(info_w)
            parent_fds.append(info_r)
            out_r, out_w = os.pipe()
            child_fds.append(out_w)
            parent_fds.append(out_r)
            err_r, err_w = os.pipe()
            child_fds.append(err_w)
            parent_fds.append(err_r)
            argv = bw.build_bwrap_argv(
                req,
                bwrap_path=self.bwrap_path,
                seccomp_fd=sec,
                passwd_fd=passwd,
                group_fd=group,
                block_fd=block_r,
                info_fd=info_w,
                layout=self.layout,
                dev_dir=self.dev_dir,
            )
            pass_fds = [sec, passwd, group, block_r, info_w]
            if launcher and self._warm_idle and self._chrt is not None:
                argv = [self._chrt, "--idle", "0", *argv]
            report_r = -1
            if not self.cgroups.measures_usage:
                report_r, report_w = os.pipe()
                child_fds.append(report_w)
                parent_fds.append(report_r)
                pass_fds.append(report_w)
                argv = [sys.executable, "-I", "-S", "-c", _SUBREAPER_SHIM, str(report_w), *argv]
            with _normal_policy():
                popen = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=out_w,
                    stderr=err_w,
                    pass_fds=pass_fds,
                    close_fds=True,
                    start_new_session=True,
                    env={},
                    cwd="/",
                )
        except OSError:
            _close(*parent_fds)
            raise
        finally:
            # bwrap holds its own copies now; ours would keep pipes from reaching EOF.
            _close(*child_fds)
        return _Spawned(popen, block_w, info_r, out_r, err_r, report_r, launcher_w=launcher_w)

    def _start(self, req: SandboxRequest) -> _Spawned:
        """Spawn bwrap, make the task cgroup, wait for bwrap's child and confine it.

        Runs on a spawner thread, so a whole start costs the event loop one
        hand-over.  An OSError before bwrap exists propagates.
        """
        return self._setup(req, self._popen(req))

    def _setup(self, req: SandboxRequest, spawned: _Spawned, *, rlimits: bool = True) -> _Spawned:
        """Make the task cgroup, wait for bwrap's child and confine it (spawner thread).

        The cgroup is made while bwrap sets the sandbox up.  Problems that
        must keep the command from running are reported in ``error`` (the
        caller kills bwrap).  Nothing leaks if anything else goes wrong.
        Without ``rlimits``, the child keeps the gateway's own.
        """
        try:
            if self.cgroups.available:
                try:
                    spawned.cgroup = self._cgroup_pool.create(req.task_id, req.limits)
                except OSError as exc:
                    # Fail closed: limits that were promised must apply.
                    spawned.error = f"sandbox: cannot create cgroup: {exc}"
            timeout = min(_SETUP_TIMEOUT_S, req.limits.timeout_s)
            info = _read_info(spawned.info_r, timeout)
            _close(spawned.info_r)
            spawned.info_r = -1
            if info is None:
                spawned.error = spawned.error or "sandbox: bwrap did not report its child in time"
                return spawned
            spawned.child_pid = parse_info(info)
            if spawned.child_pid is not None and spawned.error is None:
                spawned.error = self._confine(req, spawned, spawned.child_pid, rlimits=rlimits)
        except BaseException:
            _discard(spawned)
            raise
        return spawned

    def _confine(
        self, req: SandboxRequest, spawned: _Spawned, child: int, *, rlimits: bool = True
    ) -> str | None:
        """Move bwrap's blocked child into the cgroup and rlimit it; an error, or None.

        The child is the sandbox's pid 1 and every process of the command
        descends from it; bwrap's own monitor process stays outside (it
        runs nothing of the caller's and exits with the child).
        """
        cg = spawned.cgroup
        try:
            # While the child is blocked it cannot exit, so its pid is its own
            # and its parent is bwrap (not the subreaper shim, if one is used).
            spawned.child_pidfd = os.pidfd_open(child)
            spawned.bwrap_pid = _bwrap_pid(spawned.popen.pid, child, shim=spawned.report_r >= 0)
            if cg is not None:
                cg.attach(child)
            if rlimits:
                self._rlimit(child, req.limits, cg)
        except OSError as exc:
            return f"sandbox: cannot confine the sandbox: {exc.strerror or exc}"
        return None

    def _rlimit(self, pid: int, limits: Limits, cgroup: TaskCgroup | None) -> None:
        """Set ``limits``' rlimits on ``pid`` (those ``cgroup`` does not stand for).

        ``pid`` inherited the gateway's own (bwrap sets none): no need to ask.
        """
        ctrls = self.cgroups.controllers if cgroup is not None else frozenset()
        for res, value in plan_rlimits(
            limits,
            self._own_rlimits,
            pids_cgroup="pids" in ctrls,
            memory_cgroup="memory" in ctrls,
        ):
            resource.prlimit(pid, res, value)

    async def _confine_warm(self, req: SandboxRequest, spawned: _Spawned) -> _Spawned:
        """Give a warm sandbox ``req``'s limits and the gateway's priority (event loop).

        Its processes are in their cgroup since pid 1 was started (see
        :meth:`_warm_start`); the launcher waits in ``read`` for its script
        and pid 1 for its only child, so neither forks before the script is
        written, after this: the cgroup limits and the launcher's rlimits
        apply to everything the command does.  A sandbox still setting up
        is waited for (at its new priority).  The first time, the cgroup's
        CPU time so far is noted (the launcher's start is not the command's)
        and its memory peak reset where the kernel can.  Called again if the
        run is granted other limits than the request asked for.  Failures
        go to ``error`` (the command must not run).
        """
        cg, pid1 = spawned.cgroup, spawned.child_pid
        first = spawned.confined is None
        try:
            if cg is None or pid1 is None:
                raise ProcessLookupError(errno.ESRCH, "the warm sandbox is not ready")
            if first:
                if self._warm_idle:
                    for pid in (spawned.popen.pid, pid1):
                        self._restore_priority(pid)
                spawned.launcher_pid = await self._await_launcher(spawned, pid1)
                if self._warm_idle:
                    self._restore_priority(spawned.launcher_pid)
            launcher = spawned.launcher_pid
            if launcher is None:
                raise ProcessLookupError(errno.ESRCH, "the warm sandbox is not ready")
            cg.set_limits(req.limits)
            self._rlimit(launcher, req.limits, cg)
            if first:
                # The launcher's CPU time so far becomes part of the cgroup's
                # baseline: usage() then counts the command's alone.
                cg = spawned.cgroup = dataclasses.replace(
                    cg, cpu_base=cg.cpu_base + (cg.usage().cpu_time_s or 0.0)
                )
                cg.reset_peak()
                # pid 1 alive (its pidfd) and still the launcher's parent: the
                # launcher's pid was not recycled by something else meanwhile.
                signal.pidfd_send_signal(spawned.child_pidfd, 0)
                if _parent_pid(launcher) != pid1:
                    raise ProcessLookupError(errno.ESRCH, "the launcher is gone")
        except OSError as exc:
            spawned.error = f"sandbox: cannot confine the sandbox: {exc.strerror or exc}"
        else:
            spawned.confined = req.limits
        return spawned

    def _restore_priority(self, pid: int) -> None:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, pid, self._nice)

    @staticmethod
    async def _await_launcher(spawned: _Spawned, pid1: int) -> int:
        """The launcher's pid once pid 1 has forked it (polled: it is normally there)."""
        deadline = time.monotonic() + _SETUP_TIMEOUT_S
        while True:
            launcher = _launcher_of(pid1)
            if launcher is not None:
                return launcher
            if not _alive(spawned):
                raise ProcessLookupError(errno.ESRCH, "the warm sandbox is gone")
            if time.monotonic() >= deadline:
                raise OSError(errno.ETIMEDOUT, "the warm sandbox did not finish its set-up")
            await asyncio.sleep(_LAUNCHER_POLL_S)

    def _hurry(self, forked: list[_Spawned]) -> None:
        """Give a warm sandbox still setting up (bwrap and what it forked) the gateway's priority.

        Best effort: bwrap may not run yet (then it is not hurried) or be
        gone (then its start fails and the taker starts a sandbox itself).
        """
        if not self._warm_idle or not forked:
            return
        bwrap = forked[0].popen.pid
        with contextlib.suppress(OSError):
            for pid in (bwrap, *_descendants(bwrap)):
                self._restore_priority(pid)

    def _warm_start(self, template: SandboxRequest, forked: list[_Spawned]) -> _Spawned:
        """Start a warm sandbox and put its pid 1 into a cgroup (warm thread).

        A start for a run (:meth:`_setup`), with the launcher for a command
        and ``template``'s default limits, except that pid 1 keeps the
        gateway's rlimits (the run's are set on the launcher when it is
        taken: lowered here, they could not be raised again) and is released
        at once: it forks the launcher, which inherits the cgroup, when its
        set-up is done.  A process's first move into a cgroup waits for the
        kernel (an RCU grace period); here that is off any run's path.  With
        SCHED_IDLE allowed, bwrap runs through ``chrt --idle`` and so sets
        up only on otherwise idle cores.  ``forked`` receives bwrap as soon
        as it runs (for :meth:`_hurry` and :meth:`close`).
        """
        bound = _dir_id(template.workspace)  # bwrap binds it by path, next
        spawned = self._popen(template, launcher=True)
        spawned.workspace = (template.workspace, bound)
        with self._warm_lock:
            closed = self._closed
            if not closed:
                forked.append(spawned)
        if closed:
            _discard(spawned)
            raise OSError(errno.ECANCELED, "the sandbox is closed")
        self._setup(template, spawned, rlimits=False)  # discards bwrap if it raises
        if spawned.error is not None or spawned.child_pid is None:
            said = _pending_output(spawned.err_r)
            _discard(spawned)
            raise OSError(errno.EIO, f"{spawned.error or 'bwrap reported no child'}: {said!r}")
        _close(spawned.block_w)
        spawned.block_w = -1
        return spawned

    def _kill_now(self, run: _Run) -> None:
        """SIGKILL bwrap's pid 1 (so the whole pid namespace) and bwrap's process group.

        Until its ``--new-session`` setsid, bwrap's child is in bwrap's
        process group, so the group kill also reaches a child whose pid was
        never reported.  The group id is bwrap's pid, which cannot be reused
        while bwrap is unreaped (reaping happens on this same thread).
        """
        if run.child_pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(run.child_pidfd, signal.SIGKILL)
            if run.proc is not None and run.proc.report_r >= 0:
                # bwrap exits once its child is dead; the subreaper shim must
                # survive to reap both and report their usage.
                return
        proc = run.proc
        if proc is not None and not proc.reaper.exited.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)

    async def _kill_tree(self, run: _Run) -> None:
        self._kill_now(run)
        if run.cgroup is not None:
            await asyncio.to_thread(run.cgroup.kill)

    async def _terminate(self, run: _Run, proc: _Proc) -> None:
        """SIGTERM the command's processes, wait ``kill_grace_s``, then kill the tree."""
        # bwrap's own two processes are left alone: they exit with the command.
        bwrap_pids = {run.bwrap_pid or -1, run.child_pid or -1}
        if run.cgroup is not None:
            await asyncio.to_thread(run.cgroup.signal_all, signal.SIGTERM, bwrap_pids)
        elif run.child_pid is not None:
            for pid in await asyncio.to_thread(_descendants, run.child_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.reaper.exited), self.kill_grace_s)
        await self._kill_tree(run)

    async def _drained(self, proc: _Proc, timeout_s: float) -> bool:
        """Whether both output pipes reach EOF within ``timeout_s``."""
        pending = [p.done for p in proc.pumps if not p.done.done()]
        if not pending:
            return True
        done, _ = await asyncio.wait(pending, timeout=timeout_s)
        return len(done) == len(pending)

    async def _drain(self, proc: _Proc) -> None:
        if not all(p.done.done() for p in proc.pumps):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(p.done for p in proc.pumps)), _DRAIN_TIMEOUT_S
                )
        for pump in proc.pumps:
            pump.close()

    def _result(self, run: _Run, caps: dict[Stream, OutputCap], end: _Exit | None) -> RunResult:
        wall = time.monotonic() - run.started
        exit_code: int | None = None
        sig: int | None = None
        error = run.error
        if end is None:
            exit_code = 127  # bwrap never ran
        elif end.status is None:
            error = error or "sandbox: bwrap's exit status was lost (reaped elsewhere)"
        else:
            exit_code, sig = decode_status(end.status)
        head = bytes(run.proc.pumps[1].head) if run.proc is not None else b""
        if error is None and not (run.timed_out or run.cancelled):
            failure = classify_bwrap_failure(exit_code, head)
            if failure is None and run.warm:
                failure = classify_launch_failure(exit_code, head, run.req.argv[0])
            if failure is not None:
                error, exit_code = failure
        elif run.proc is not None and run.child_pid is None:
            # bwrap died in its own setup; its message (if any) says why.
            line = head.decode("utf-8", "replace").strip().splitlines()[:1]
            if line and line[0].startswith("bwrap: "):
                error = "sandbox: " + line[0].removeprefix("bwrap: ")
            exit_code, sig = 126, None
        cpu = 0.0 if end is None else end.cpu_s
        rss = 0 if end is None else end.maxrss_bytes
        if run.cgroup is not None:
            usage = run.cgroup.usage()
            cpu = usage.cpu_time_s if usage.cpu_time_s is not None else cpu
            rss = usage.peak_memory_bytes if usage.peak_memory_bytes is not None else rss
        return RunResult(
            exit_code=exit_code,
            signal=sig,
            timed_out=run.timed_out,
            cancelled=run.cancelled,
            stdout_bytes=caps["stdout"].total,
            stderr_bytes=caps["stderr"].total,
            stdout_truncated=caps["stdout"].truncated,
            stderr_truncated=caps["stderr"].truncated,
            cpu_time_s=cpu,
            max_rss_bytes=rss,
            wall_time_s=wall,
            spawn_s=run.released_s,
            error=error,
            warm=run.warm,
        )

    async def _cleanup(self, run: _Run) -> None:
        """Whatever happened (even cancellation of run()): nothing survives, nothing leaks."""
        proc = run.proc
        if proc is not None:
            _close(proc.block_w, proc.report_r, proc.launcher_w)
            proc.block_w = proc.report_r = proc.launcher_w = -1
            if not proc.reaper.exited.done():
                self._kill_now(run)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.reaper.exited), _DRAIN_TIMEOUT_S)
            for pump in proc.pumps:
                pump.close()
            proc.reaper.close()
        pidfd, run.child_pidfd = run.child_pidfd, -1
        if not self._subreaper:  # the subreaper shim or the host's init reaps pid 1
            _close(pidfd)
            pidfd = -1
        bwrap_gone = proc is not None and proc.reaper.exited.done()
        if run.cgroup is not None and bwrap_gone:
            # The usual end: bwrap is gone, the result is ready; reaping pid 1
            # and removing the (normally empty) cgroup need not delay it.
            self._cleaner.remove(run.cgroup, pidfd)
            return
        if run.cgroup is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(run.cgroup.discard)
        if pidfd >= 0 and proc is not None:
            _reap_later(proc.popen, pidfd, wait=not bwrap_gone)

    async def settle(self) -> None:
        """Wait until the task cgroups of finished runs are removed."""
        await asyncio.to_thread(self._cleaner.join)

    # -- self-test -----------------------------------------------------------------------

    async def self_test(self) -> dict[str, object]:
        """Run ``true`` with the full flags and prove the seccomp filter is active.

        The seccomp probe runs ``unshare -U true`` (or a raw ``unshare``
        through python3 if util-linux is missing): it must fail with EPERM,
        the filter's answer; without the filter ``--disable-userns`` would
        fail it with ENOSPC instead.
        """
        st = check_bwrap(self.bwrap_path)
        version = await _bwrap_version(self.bwrap_path)
        true, probe = await asyncio.to_thread(_self_test_argvs)
        workspace = tempfile.mkdtemp(prefix="mcp-gateway-selftest-")
        try:
            limits = Limits(timeout_s=20.0)
            first = await self._probe("self-test", true, workspace, limits)
            if first[0].error is not None or first[0].exit_code != 0:
                raise Unavailable(
                    f"self-test: sandboxed true failed: {first[0].error or first[0]} "
                    f"{first[1].decode('utf-8', 'replace')[:500]}"
                )
            second = await self._probe("self-test-seccomp", probe, workspace, limits)
            if second[0].exit_code == 0 or b"Operation not permitted" not in second[1]:
                raise Unavailable(
                    "self-test: the seccomp filter is not active (probe "
                    f"exit {second[0].exit_code}, signal {second[0].signal}, "
                    f"error {second[0].error!r}, "
                    f"stderr {second[1].decode('utf-8', 'replace')[:200]!r})"
                )
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        details: dict[str, object] = {
            "bwrap": self.bwrap_path,
            "bwrap_version": version,
            "bwrap_setuid": bool(st.st_mode & stat.S_ISUID),
            "seccomp": "ok",
            "seccomp_rules": self.program.rules,
            "seccomp_skipped": ",".join(self.program.skipped) or "none",
            "cgroups": self.cgroups.mode,
            "cgroup_controllers": self.cgroups.describe()["controllers"],
            "cgroup_kill": self.cgroups.kill_method,
            "rlimits": "core,nofile,fsize,cpu"
            + ("" if "pids" in self.cgroups.controllers else ",nproc")
            + ("" if "memory" in self.cgroups.controllers else ",as"),
            "host_uid": os.geteuid(),
            "private_dev": self.dev_dir is not None,
            "wall_ms": round(first[0].wall_time_s * 1000, 1),
        }
        if self.cgroups.notes:
            details["cgroup_notes"] = "; ".join(self.cgroups.notes)
        return details

    async def _probe(
        self, task_id: str, argv: tuple[str, ...], workspace: str, limits: Limits
    ) -> tuple[RunResult, bytes]:
        stderr = bytearray()

        def keep(stream: Stream, data: bytes) -> None:
            if stream == "stderr":
                stderr.extend(data)

        req = SandboxRequest(task_id=task_id, argv=argv, workspace=workspace, limits=limits)
        # Its workspace is gone right after: no warm sandboxes for it.
        result = await self.run(req, keep, asyncio.Event(), warm_up=False)
        return result, bytes(stderr)


def _shim_report(proc: _Proc, end: _Exit) -> _Exit:
    """bwrap's status and usage from the subreaper shim's report (if one was used)."""
    if proc.report_r < 0:
        return end
    try:
        os.set_blocking(proc.report_r, False)
        data = os.read(proc.report_r, 65536)
    except OSError:
        data = b""
    finally:
        _close(proc.report_r)
        proc.report_r = -1
    try:
        doc = json.loads(data)
        status = doc["status"]
        return _Exit(
            status if isinstance(status, int) else None,
            float(doc["cpu_s"]),
            int(doc["maxrss_kib"]) * 1024,
        )
    except (ValueError, KeyError, TypeError):
        # No report: the shim itself was killed (setup failure path).
        return _Exit(end.status, end.cpu_s, end.maxrss_bytes)


def _release(
    dev_dir: str | None,
    cgroups: CgroupManager,
    cleaner: _Cleaner,
    sealed: tuple[int, ...],
    warm: _WarmPool | None,
) -> None:
    if warm is not None:
        warm.close()
    cleaner.join()
    # Discarded sandboxes (the warm ones just now) remove their cgroups on
    # threads of their own, once bwrap is gone.
    _join_reapers(_CLOSE_REAP_S)
    _reap_late()
    cleaner.pool.close()
    _close(*sealed)
    if dev_dir is not None:
        shutil.rmtree(dev_dir, ignore_errors=True)
    cgroups.close()


class _Cleaner:
    """A thread that releases the task cgroups of finished runs to ``pool``, off their path.

    Independent of any event loop, so a run's result never waits for its
    rmdir and nothing is dropped when a loop ends; :meth:`join` waits for
    what is queued (at close).
    """

    def __init__(self, pool: CgroupPool) -> None:
        self.pool = pool
        self._jobs: queue.Queue[tuple[TaskCgroup, int]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def remove(self, cg: TaskCgroup, pid1_fd: int = -1) -> None:
        """Reap the sandbox's pid 1 (``pid1_fd``, closed here), then release ``cg``."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="cgroup-clean", daemon=True
                )
                self._thread.start()
        self._jobs.put((cg, pid1_fd))

    def join(self) -> None:
        self._jobs.join()

    def _serve(self) -> None:
        _no_wakeup_preemption()
        while True:
            # Late pid 1s (see _reap_pid1) are looked at again with every
            # batch, and every few seconds while no run ends.
            try:
                batch = [self._jobs.get(timeout=_LATE_RETRY_S if _reap_late() else None)]
            except queue.Empty:
                continue
            # Let finished runs gather (one wake-up for many under load) and
            # their last processes finish exiting (so the first rmdir works).
            time.sleep(_CLEAN_BATCH_S)
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._jobs.get_nowait())
            for cg, pid1_fd in batch:
                try:
                    _reap_pid1(pid1_fd)
                    self.pool.release(cg)
                except OSError as exc:
                    log.warning("task cgroup not removed", error=str(exc))
                finally:
                    self._jobs.task_done()


# How long the cleaner lets finished task cgroups gather before removing them.
_CLEAN_BATCH_S = 0.02
# How often the cleaner looks at late pid 1s while no run ends.
_LATE_RETRY_S = 5.0


async def _bwrap_version(path: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        path,
        "--version",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    if proc.returncode != 0:
        raise Unavailable(f"{path} --version failed with status {proc.returncode}")
    return out.decode("utf-8", "replace").strip()


# -- orphans of a gateway that died ----------------------------------------------------


def is_orphan_sandbox(cmdline: list[str], bwrap_path: str, workspace_root: str) -> bool:
    """Whether ``cmdline`` is our bwrap bound to a workspace under ``workspace_root`` (pure)."""
    if not cmdline or cmdline[0] != bwrap_path:
        return False
    prefix = workspace_root.rstrip("/") + "/"
    return any(
        cmdline[i] == "--bind"
        and cmdline[i + 1].startswith(prefix)
        and cmdline[i + 2] == bw.WORKSPACE
        for i in range(len(cmdline) - 2)
    )


def kill_orphans(bwrap_path: str, workspace_root: str) -> list[int]:
    """SIGKILL every sandbox left by a gateway that died; return their pids.

    Call at start-up, once this process owns the state directory (the audit
    log's lock): any bwrap bound to one of its workspaces then belongs to a
    dead gateway.  ``--die-with-parent`` normally takes them down, but a
    gateway killed while bwrap waits on ``--block-fd`` leaves bwrap's
    sandbox init without a parent-death signal and it then runs the command
    (bwrap 0.8 arms that signal only after the wait); killing the init takes
    the whole pid namespace with it.
    """
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        if is_orphan_sandbox(cmdline, bwrap_path, workspace_root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed
