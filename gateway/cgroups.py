"""Per-task control groups: limits, placement, usage, kill, removal.

One *task cgroup* is created per sandboxed run, below a *base* cgroup the
gateway owns, and removed afterwards (or kept for a later run, where that
leaves nothing of this one: see :class:`CgroupPool`).  What "a cgroup" is
depends on the host:

``v2``
    Pure unified hierarchy (production: systemd with ``Delegate=yes``).  The
    base is ``<own cgroup>/<parent>`` (or an absolute ``parent`` inside the
    hierarchy).  Controllers ``memory``, ``pids`` and ``cpu`` are enabled in
    the ``cgroup.subtree_control`` files on the way down; because of the
    "no internal processes" rule that requires the gateway's own cgroup to
    hold no processes, so if it does, the gateway first moves itself into a
    leaf ``<own cgroup>/supervisor`` (what systemd's ``DelegateSubgroup=``
    does for newer units).  Kill is ``cgroup.kill`` (Linux 5.14+).
``v1``
    Legacy hierarchies: one directory per controller, ``<own cgroup in that
    hierarchy>/<parent>/<task>`` (or ``<mount>/<parent>/<task>`` for an
    absolute ``parent``).  Kill freezes the group (``freezer``) if available,
    SIGKILLs every member, thaws, and repeats until it is empty.
``hybrid``
    Both: the unified hierarchy is used for what it offers (``cgroup.kill``,
    ``cpu.stat``, any controllers bound to it) and v1 hierarchies for the
    missing controllers.
``unavailable``
    Nothing writable; the sandbox falls back to rlimits.

Detection (:meth:`CgroupManager.detect`) happens once, at start-up, and
creates the base directories; :meth:`CgroupManager.close` removes them again
if empty.  The pure helpers (``parse_*``, ``*_limit_files``, ``plan_*``) do
no I/O and are unit-tested on their own.

All methods do blocking but short file-system I/O on cgroupfs, except
:meth:`TaskCgroup.kill` and :meth:`TaskCgroup.remove`, which may poll for up
to their timeout; async callers should run those in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Collection, Mapping
from typing import Literal

from gateway.models import Limits

__all__ = [
    "CgroupManager",
    "CgroupMount",
    "CgroupPool",
    "CgroupUsage",
    "Mode",
    "TaskCgroup",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "v1_limit_files",
    "v2_limit_files",
]

Mode = Literal["v2", "v1", "hybrid", "unavailable"]
Requested = Literal["auto", "v2", "v1", "off"]

# The controllers limits are written to; cpuacct/freezer only help on v1.
LIMIT_CONTROLLERS = ("memory", "pids", "cpu")
_V1_HELPERS = ("cpuacct", "freezer")
CPU_PERIOD_US = 100_000
# bwrap's pid-1 reaper lives in the task cgroup (its monitor process stays outside).
BWRAP_PROCESSES = 1
SUPERVISOR_LEAF = "supervisor"

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupMount:
    """One mounted cgroup hierarchy from ``/proc/self/mountinfo``.

    ``root`` is the cgroup path the mount shows at ``mountpoint`` (``/``
    unless a cgroup namespace or a bind mount is involved); ``controllers``
    is empty for v2 (read ``cgroup.controllers`` instead).
    """

    mountpoint: str
    root: str
    version: Literal[1, 2]
    controllers: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupUsage:
    """What a task cgroup consumed; None where the host cannot tell."""

    cpu_time_s: float | None = None
    peak_memory_bytes: int | None = None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup (v1) and cgroup2 mounts listed in a mountinfo text (pure)."""
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or sep < 5:
            continue
        fstype = fields[sep + 1]
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(mountpoint, root, 2))
        elif fstype == "cgroup":
            opts = fields[sep + 3].split(",")
            ctrls = frozenset(o for o in opts if o in LIMIT_CONTROLLERS + _V1_HELPERS)
            if ctrls:
                mounts.append(CgroupMount(mountpoint, root, 1, ctrls))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map controller -> cgroup path from ``/proc/<pid>/cgroup`` (pure).

    The v2 entry (``0::/path``) is under the key ``""``; v1 entries appear
    once per controller (``4:cpu,cpuacct:/x`` gives ``cpu`` and ``cpuacct``).
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            paths[""] = path
        else:
            for ctrl in ctrls.split(","):
                paths[ctrl] = path
    return paths


def cgroup_dir(mount: CgroupMount, path: str) -> str | None:
    """Where cgroup ``path`` appears under ``mount``, or None if outside it (pure)."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    rel = path[len(root) :].strip("/")
    return os.path.join(mount.mountpoint, rel) if rel else mount.mountpoint


def base_dir(mount: CgroupMount, own_path: str, parent: str) -> str | None:
    """The base directory for ``parent`` in ``mount`` (pure).

    A relative ``parent`` is a child of the gateway's own cgroup; an
    absolute one is a path inside the hierarchy.  None if the path is not
    visible through this mount or ``parent`` is unusable.
    """
    parts = [p for p in parent.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return None
    if parent.startswith("/"):
        return cgroup_dir(mount, "/" + "/".join(parts))
    own = cgroup_dir(mount, own_path)
    return None if own is None else os.path.join(own, *parts)


def task_dir_name(task_id: str, nonce: str) -> str:
    """A cgroup directory name for ``task_id``: safe characters only, unique by ``nonce``."""
    safe = task_id if _SAFE_NAME.fullmatch(task_id) and task_id[0] != "." else "task"
    return f"task-{safe}-{nonce}"


def cpu_quota_us(limits: Limits) -> int:
    """``cpu_quota`` (fraction of one CPU) as a quota per :data:`CPU_PERIOD_US` (>= 1 ms)."""
    return max(1000, round(limits.cpu_quota * CPU_PERIOD_US))


def v2_limit_files(limits: Limits, controllers: Collection[str]) -> list[tuple[str, str, bool]]:
    """``(file, value, required)`` writes that apply ``limits`` on cgroup v2 (pure).

    Optional files (swap accounting, ``memory.oom.group``) may be missing.
    """
    writes: list[tuple[str, str, bool]] = []
    if "memory" in controllers:
        writes += [
            ("memory.max", str(limits.memory_bytes), True),
            ("memory.swap.max", "0", False),
            # An OOM kill takes the whole task, not one random process of it.
            ("memory.oom.group", "1", False),
        ]
    if "pids" in controllers:
        writes.append(("pids.max", str(limits.pids + BWRAP_PROCESSES), True))
    if "cpu" in controllers:
        writes.append(("cpu.max", f"{cpu_quota_us(limits)} {CPU_PERIOD_US}", True))
    return writes


def v1_limit_files(limits: Limits, controller: str) -> list[tuple[str, str, bool]]:
    """``(file, value, required)`` writes for one v1 ``controller`` (pure).

    The memory limit must be written before the memory+swap limit (the
    kernel refuses memsw < limit); memsw exists only with swap accounting.
    """
    if controller == "memory":
        return [
            ("memory.limit_in_bytes", str(limits.memory_bytes), True),
            ("memory.memsw.limit_in_bytes", str(limits.memory_bytes), False),
            ("memory.swappiness", "0", False),
        ]
    if controller == "pids":
        return [("pids.max", str(limits.pids + BWRAP_PROCESSES), True)]
    if controller == "cpu":
        return [
            ("cpu.cfs_period_us", str(CPU_PERIOD_US), True),
            ("cpu.cfs_quota_us", str(cpu_quota_us(limits)), True),
        ]
    return []


def parse_keyed(text: str) -> dict[str, int]:
    """Parse a flat-keyed cgroup file (``key value`` per line) into ints (pure)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


# -- I/O helpers ---------------------------------------------------------------------


def _read(path: str) -> str:
    # Three system calls (open() would add fstat, ioctl and lseek): the
    # usage read is on every run's path.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _write(path: str, value: str) -> None:
    # O_WRONLY without O_CREAT/O_TRUNC: cgroupfs files exist; one write per value.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _procs(directory: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _apply(
    directory: str,
    writes: list[tuple[str, str, bool]],
    written: dict[str, str] | None = None,
) -> None:
    """Make the writes; with ``written`` (file -> value so far), skip those already made."""
    for name, value, required in writes:
        if written is not None and written.get(name) == value:
            continue
        try:
            _write(os.path.join(directory, name), value)
        except OSError as exc:
            if written is not None:
                written.pop(name, None)  # unknown now
            if required or exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
                raise OSError(exc.errno, f"cannot set {name}={value}: {exc.strerror}") from exc
        else:
            if written is not None:
                written[name] = value


@dataclasses.dataclass(frozen=True, slots=True)
class TaskCgroup:
    """The cgroup directories of one task (one v2 dir and/or one per v1 hierarchy).

    ``cpu_base`` is the CPU time the directories had counted before the task
    (reused ones, see :class:`CgroupPool`): :meth:`usage` reports the rest.
    ``written`` remembers the limit files written per directory, so writing
    the same value again is skipped.
    """

    v2_dir: str | None
    v1_dirs: Mapping[str, str]  # controller -> directory (co-mounted ones share it)
    v2_controllers: frozenset[str] = frozenset()
    cpu_base: float = 0.0
    written: dict[str, dict[str, str]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def _apply(self, directory: str, writes: list[tuple[str, str, bool]]) -> None:
        _apply(directory, writes, self.written.setdefault(directory, {}))

    @property
    def dirs(self) -> tuple[str, ...]:
        """Every distinct directory, v2 first."""
        out: list[str] = [] if self.v2_dir is None else [self.v2_dir]
        for d in self.v1_dirs.values():
            if d not in out:
                out.append(d)
        return tuple(out)

    def set_limits(self, limits: Limits) -> None:
        """Write ``limits`` again (they replace those :meth:`CgroupManager.create` wrote)."""
        if self.v2_dir is not None:
            self._apply(self.v2_dir, v2_limit_files(limits, self.v2_controllers))
        for ctrl, directory in self.v1_dirs.items():
            writes = v1_limit_files(limits, ctrl)
            if ctrl == "memory":
                current = _read_int(os.path.join(directory, "memory.limit_in_bytes"))
                if current is not None and current < limits.memory_bytes:
                    # Raising: memory+swap first, the kernel refuses memsw < limit.
                    writes[0], writes[1] = writes[1], writes[0]
            self._apply(directory, writes)

    def reset_peak(self) -> None:
        """Restart the memory high-water mark from the current usage, where the kernel can.

        cgroup v1 resets ``memory.max_usage_in_bytes`` on a write of 0.  On
        v2, ``memory.peak`` resets only for reads through the writing file
        descriptor (Linux 6.12 on): not done, the peak keeps what came before.
        """
        mem = self.v1_dirs.get("memory")
        if mem is not None and "memory" not in self.v2_controllers:  # what usage() reads
            with contextlib.suppress(OSError):
                _write(os.path.join(mem, "memory.max_usage_in_bytes"), "0")

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into every directory of this task."""
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        """Host pids of the processes currently in the task (may include zombies)."""
        seen: set[int] = set()
        for d in self.dirs:
            seen.update(_procs(d))
        return sorted(seen)

    def pids_charged(self) -> int:
        """Processes the pids controller still counts: listed ones and zombies not yet reaped."""
        dirs = [self.v1_dirs["pids"]] if "pids" in self.v1_dirs else []
        if self.v2_dir is not None and "pids" in self.v2_controllers:
            dirs.append(self.v2_dir)
        return sum(_read_int(os.path.join(d, "pids.current")) or 0 for d in dirs)

    def signal_all(self, sig: int, exclude: Collection[int] = ()) -> int:
        """Send ``sig`` to every member except ``exclude``; return how many were signalled."""
        sent = 0
        for pid in self.procs():
            if pid in exclude:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                sent += 1
        return sent

    def kill(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the task, including ones forked meanwhile.

        Uses ``cgroup.kill`` when the v2 directory has it (atomic), else the
        v1 freezer (frozen processes cannot fork or exit, so the pid list is
        stable while it is signalled), else repeated SIGKILL of the listed
        pids.  Returns True once the cgroup is empty, False on timeout.
        """
        deadline = time.monotonic() + timeout_s
        kill_file = None if self.v2_dir is None else os.path.join(self.v2_dir, "cgroup.kill")
        freezer = self.v1_dirs.get("freezer")
        while True:
            if not self.procs():
                return True
            if kill_file is not None and os.path.exists(kill_file):
                with contextlib.suppress(FileNotFoundError):
                    _write(kill_file, "1")
            elif freezer is not None:
                self._freeze_and_kill(freezer, deadline)
            else:
                self.signal_all(signal.SIGKILL)
            if time.monotonic() >= deadline:
                return not self.procs()
            time.sleep(0.005)

    def _freeze_and_kill(self, freezer: str, deadline: float) -> None:
        state = os.path.join(freezer, "freezer.state")
        try:
            _write(state, "FROZEN")
            while _read(state).strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.002)
            self.signal_all(signal.SIGKILL)
        finally:
            with contextlib.suppress(OSError):
                _write(state, "THAWED")

    def usage(self) -> CgroupUsage:
        """CPU time and memory high-water mark of the task so far."""
        cpu: float | None = None
        peak: int | None = None
        if self.v2_dir is not None:
            with contextlib.suppress(OSError):
                stat = parse_keyed(_read(os.path.join(self.v2_dir, "cpu.stat")))
                if "usage_usec" in stat:
                    cpu = stat["usage_usec"] / 1e6 - self.cpu_base
            if "memory" in self.v2_controllers:
                peak = _read_int(os.path.join(self.v2_dir, "memory.peak"))
        acct = self.v1_dirs.get("cpuacct")
        if cpu is None and acct is not None:
            ns = _read_int(os.path.join(acct, "cpuacct.usage"))
            cpu = None if ns is None else ns / 1e9 - self.cpu_base
        mem = self.v1_dirs.get("memory")
        if peak is None and mem is not None:
            peak = _read_int(os.path.join(mem, "memory.max_usage_in_bytes"))
        return CgroupUsage(cpu, peak)

    def remove(self, timeout_s: float = 2.0) -> None:
        """rmdir every directory, retrying while dying members still pin it (EBUSY)."""
        deadline = time.monotonic() + timeout_s
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.005)

    def discard(self) -> None:
        """Remove the directories, killing whatever is still in them first (blocking)."""
        try:
            self.remove(timeout_s=0.0)  # usually empty by now; the kernel refuses otherwise
        except OSError:
            self.kill()
            self.remove()


@dataclasses.dataclass(frozen=True, slots=True)
class CgroupManager:
    """Creates task cgroups below the base directories found at start-up."""

    mode: Mode
    v2_base: str | None = None
    v2_controllers: frozenset[str] = frozenset()
    v1_bases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    created: tuple[str, ...] = ()  # base dirs detect() made (removed by close())

    @property
    def available(self) -> bool:
        return self.mode != "unavailable"

    @property
    def controllers(self) -> frozenset[str]:
        """Limit controllers a task cgroup gets (memory, pids, cpu)."""
        return self.v2_controllers | frozenset(c for c in self.v1_bases if c in LIMIT_CONTROLLERS)

    @property
    def measures_usage(self) -> bool:
        """True if task cgroups report both CPU time and peak memory."""
        cpu = self.v2_base is not None or "cpuacct" in self.v1_bases
        memory = "memory" in self.v2_controllers or "memory" in self.v1_bases
        return cpu and memory

    @property
    def kill_method(self) -> str:
        if self.v2_base is not None and os.path.exists(os.path.join(self.v2_base, "cgroup.kill")):
            return "cgroup.kill"
        if "freezer" in self.v1_bases:
            return "freezer"
        return "signal" if self.available else "none"

    def describe(self) -> dict[str, object]:
        """Details for the sandbox self-test."""
        return {
            "mode": self.mode,
            "controllers": ",".join(sorted(self.controllers)) or "none",
            "kill": self.kill_method,
            "v2_base": self.v2_base or "",
            "v1_bases": ",".join(f"{c}={d}" for c, d in sorted(self.v1_bases.items())),
            "notes": "; ".join(self.notes),
        }

    @classmethod
    def unavailable(cls, *notes: str) -> CgroupManager:
        return cls(mode="unavailable", notes=tuple(notes))

    @classmethod
    def detect(
        cls,
        parent: str = "mcp-gateway",
        requested: Requested = "auto",
        *,
        mountinfo: str | None = None,
        proc_cgroup: str | None = None,
        move_self: bool = True,
    ) -> CgroupManager:
        """Find writable hierarchies and create the base directories for ``parent``.

        ``requested`` restricts the modes tried (``off`` disables cgroups).
        ``mountinfo``/``proc_cgroup`` default to this process's files.  With
        ``move_self`` the gateway may move itself into ``supervisor`` (v2,
        see the module docstring).  Never raises for an unusable host: the
        result then has mode ``unavailable`` and says why in ``notes``.
        """
        if requested == "off":
            return cls.unavailable("disabled by configuration")
        try:
            mounts = parse_mountinfo(mountinfo or _read("/proc/self/mountinfo"))
            own = parse_proc_cgroup(proc_cgroup or _read("/proc/self/cgroup"))
        except OSError as exc:
            return cls.unavailable(f"cannot read /proc: {exc.strerror}")
        notes: list[str] = []
        created: list[str] = []
        v2_base: str | None = None
        v2_ctrls: frozenset[str] = frozenset()
        if requested in ("auto", "v2"):
            v2_base, v2_ctrls = _setup_v2(mounts, own, parent, move_self, notes, created)
        v1_bases: dict[str, str] = {}
        if requested in ("auto", "v1"):
            wanted = [c for c in LIMIT_CONTROLLERS if c not in v2_ctrls]
            if v2_base is None:
                wanted += list(_V1_HELPERS)
            elif not os.path.exists(os.path.join(v2_base, "cgroup.kill")):
                wanted.append("freezer")
            v1_bases = _setup_v1(mounts, own, parent, wanted, notes, created)
        for base in {*v1_bases.values(), *([v2_base] if v2_base else [])}:
            _remove_stale_tasks(base)
        mode: Mode
        if v2_base is not None and v1_bases:
            mode = "hybrid"
        elif v2_base is not None:
            mode = "v2"
        elif v1_bases:
            mode = "v1"
        else:
            mode = "unavailable"
        return cls(mode, v2_base, v2_ctrls, v1_bases, tuple(notes), tuple(created))

    def create(self, task_id: str, limits: Limits, reuse: TaskCgroup | None = None) -> TaskCgroup:
        """Make the task's directories and write its limits; raises OSError on failure.

        Directories of ``reuse`` (a :meth:`reusable` part of an earlier task
        cgroup, empty) are taken instead of new ones where it has them.  A
        failure removes whatever was already created, ``reuse``'s included.
        """
        if not self.available:
            raise OSError(errno.ENOTSUP, "cgroups are unavailable")
        # The creator's pid is part of the name: a starting gateway sweeps only
        # the directories of gateways that are gone (see _remove_stale_tasks).
        name = task_dir_name(task_id, f"{os.getpid()}-{secrets.token_hex(4)}")
        old = reuse or TaskCgroup(None, {})
        for d in old.dirs:
            if not os.path.isdir(d):  # its limits may be written already: nothing else would notice
                with contextlib.suppress(OSError):
                    old.remove(timeout_s=0.0)
                raise OSError(errno.ENOENT, f"kept cgroup directory is gone: {d}")
        v2_dir: str | None = None
        v1_dirs: dict[str, str] = {}
        task = dataclasses.replace(old, v2_controllers=self.v2_controllers)
        try:
            if self.v2_base is not None:
                v2_dir = old.v2_dir
                if v2_dir is None:
                    v2_dir = os.path.join(self.v2_base, name)
                    os.mkdir(v2_dir)
                task = dataclasses.replace(task, v2_dir=v2_dir)
                task._apply(v2_dir, v2_limit_files(limits, self.v2_controllers))
            by_base: dict[str, str] = {}
            for ctrl, base in self.v1_bases.items():
                if ctrl in old.v1_dirs:
                    by_base[base] = old.v1_dirs[ctrl]
                elif base not in by_base:
                    by_base[base] = os.path.join(base, name)
                    os.mkdir(by_base[base])
                v1_dirs[ctrl] = by_base[base]
                task = dataclasses.replace(task, v1_dirs={**old.v1_dirs, **v1_dirs})
                task._apply(v1_dirs[ctrl], v1_limit_files(limits, ctrl))
        except OSError:
            with contextlib.suppress(OSError):
                task.remove(timeout_s=0.5)
            raise
        return task

    def reusable(self, task: TaskCgroup) -> TaskCgroup | None:
        """The part of ``task`` a later task may use once it is empty, or None (pure).

        Every directory without the memory controller: once its processes
        are gone, what such a directory keeps of them is counters (CPU time,
        taken as the next task's :attr:`TaskCgroup.cpu_base`).  A memory
        directory keeps charges (page cache, kernel objects) and a
        high-water mark after its processes are gone, so it is never reused.
        """
        v2_dir = task.v2_dir if "memory" not in self.v2_controllers else None
        memory_dir = task.v1_dirs.get("memory")
        v1_dirs = {c: d for c, d in task.v1_dirs.items() if d != memory_dir}
        if v2_dir is None and not v1_dirs:
            return None
        written = {d: dict(task.written.get(d, {})) for d in (v2_dir, *v1_dirs.values()) if d}
        return TaskCgroup(v2_dir, v1_dirs, self.v2_controllers, task.cpu_base, written)

    def close(self) -> None:
        """Remove the base directories detect() created, if they are empty."""
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(d)


class CgroupPool:
    """Task cgroups made through a :class:`CgroupManager`, their reusable parts kept.

    Making and removing a cgroup directory is kernel work (about 0.1 ms
    each), once per hierarchy: four per task on a hybrid host.  A finished
    task's directories without the memory controller (see
    :meth:`CgroupManager.reusable`) are therefore kept, up to ``keep`` sets,
    for the next task, if nothing is left in them (no process, not even a
    zombie: the pids controller counts those until they are reaped); limits already written
    with the same value are not written again.  The memory directory is made
    anew for every task.  Thread-safe: tasks are made on spawner threads and
    released on the cleaner's.
    """

    def __init__(self, manager: CgroupManager, keep: int = 32) -> None:
        self.manager = manager
        self._keep = keep
        self._kept: list[TaskCgroup] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def kept(self) -> int:
        """How many sets of directories wait for a task."""
        return len(self._kept)

    @property
    def kept_dirs(self) -> set[str]:
        """The directories that wait for a task."""
        with self._lock:
            return {d for part in self._kept for d in part.dirs}

    def create(self, task_id: str, limits: Limits) -> TaskCgroup:
        """:meth:`CgroupManager.create`, with kept directories where there are some.

        Kept directories that cannot be used (removed behind the gateway's
        back, say) are dropped and the task gets new ones.
        """
        with self._lock:
            reuse = self._kept.pop() if self._kept else None
        if reuse is not None:
            try:
                return self.manager.create(task_id, limits, reuse)
            except OSError:
                pass  # create() removed what was left of them
        return self.manager.create(task_id, limits)

    def release(self, task: TaskCgroup) -> None:
        """Keep ``task``'s reusable directories if it is empty, else kill and remove it.

        Blocking (it may wait for the last processes to be killed): call it
        off the event loop.  Raises OSError if the directories cannot be removed.
        """
        part = self.manager.reusable(task)
        with self._lock:
            room = not self._closed and len(self._kept) < self._keep
        # A zombie is no longer listed, but still counted until it is reaped.
        if part is None or not room or task.procs() or part.pids_charged():
            task.discard()
            return
        rest = TaskCgroup(
            None if task.v2_dir == part.v2_dir else task.v2_dir,
            {c: d for c, d in task.v1_dirs.items() if d not in part.v1_dirs.values()},
        )
        try:
            rest.remove(timeout_s=0.0)
        except OSError:
            # Something of the task is still dying in there: no reuse.
            task.discard()
            return
        counted = dataclasses.replace(part, cpu_base=0.0).usage().cpu_time_s
        part = dataclasses.replace(part, cpu_base=counted or 0.0)
        with self._lock:
            if not self._closed:
                self._kept.append(part)
                return
        part.discard()

    def close(self) -> None:
        """Remove the kept directories; later releases remove theirs."""
        with self._lock:
            self._closed = True
            kept, self._kept = self._kept, []
        for part in kept:
            with contextlib.suppress(OSError):
                part.discard()


def _creator_alive(name: str) -> bool:
    """Whether the gateway that made task directory ``name`` (``...-<pid>-<hex>``) still runs."""
    parts = name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False  # a name without a pid: made by an older gateway, long gone
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tasks(base: str) -> None:
    # Left by a gateway that died mid-run; its sandboxes died with it
    # (--die-with-parent), so only empty directories remain: rmdir refuses
    # anything still populated.  A directory of a gateway that still runs
    # (another instance sharing the base) may be empty for an instant, between
    # its mkdir and the attach: it is never touched.
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            if name.startswith("task-") and not _creator_alive(name):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(base, name))


def _mkdir(path: str, created: list[str]) -> None:
    try:
        os.mkdir(path)
        created.append(path)
    except FileExistsError:
        pass


def _setup_v2(
    mounts: list[CgroupMount],
    own: Mapping[str, str],
    parent: str,
    move_self: bool,
    notes: list[str],
    created: list[str],
) -> tuple[str | None, frozenset[str]]:
    mount = next((m for m in mounts if m.version == 2), None)
    if mount is None or "" not in own:
        notes.append("no cgroup2 hierarchy")
        return None, frozenset()
    base = base_dir(mount, own[""], parent)
    own_dir = cgroup_dir(mount, own[""])
    if base is None or own_dir is None:
        notes.append("v2: own cgroup not visible in the mounted hierarchy")
        return None, frozenset()
    task_ctrls: list[str] = []
    try:
        container = os.path.dirname(base)
        available = set(_read(os.path.join(container, "cgroup.controllers")).split())
        enabled = set(_read(os.path.join(container, "cgroup.subtree_control")).split())
        vacated = False
        for ctrl in (c for c in LIMIT_CONTROLLERS if c in available and c not in enabled):
            error = _try_enable(container, ctrl)
            if error == errno.EBUSY and move_self and container == own_dir and not vacated:
                # Our own cgroup holds processes (us): move into a leaf, once.
                _vacate(own_dir, created)
                vacated = True
                error = _try_enable(container, ctrl)
            if error is not None:
                notes.append(f"v2: cannot enable {ctrl}: {os.strerror(error)}")
        _mkdir(base, created)
        base_available = set(_read(os.path.join(base, "cgroup.controllers")).split())
        for ctrl in (c for c in LIMIT_CONTROLLERS if c in base_available):
            try:
                _enable(base, ctrl)
                task_ctrls.append(ctrl)
            except OSError as exc:
                notes.append(f"v2: cannot enable {ctrl} below {base}: {exc.strerror or exc}")
        if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
            raise PermissionError(errno.EACCES, "cgroup.procs not writable")
    except OSError as exc:
        notes.append(f"v2: {base}: {exc.strerror or exc}")
        with contextlib.suppress(OSError):
            if base in created:
                os.rmdir(base)
                created.remove(base)
        return None, frozenset()
    ctrls = frozenset(task_ctrls)
    absent = [c for c in LIMIT_CONTROLLERS if c not in ctrls]
    if absent:
        notes.append("v2: controllers not available: " + ",".join(absent))
    return base, ctrls


def _enable(directory: str, controller: str) -> None:
    _write(os.path.join(directory, "cgroup.subtree_control"), "+" + controller)


def _try_enable(directory: str, controller: str) -> int | None:
    """Enable ``controller`` for the children of ``directory``; the errno on failure."""
    try:
        _enable(directory, controller)
    except OSError as exc:
        return exc.errno or errno.EIO
    return None


def _vacate(own_dir: str, created: list[str]) -> None:
    # Only this process moves: other members of our cgroup are not ours to move.
    leaf = os.path.join(own_dir, SUPERVISOR_LEAF)
    _mkdir(leaf, created)
    _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))


def _setup_v1(
    mounts: list[CgroupMount],
    own: Mapping[str, str],
    parent: str,
    wanted: list[str],
    notes: list[str],
    created: list[str],
) -> dict[str, str]:
    bases: dict[str, str] = {}
    for ctrl in wanted:
        mount = next((m for m in mounts if m.version == 1 and ctrl in m.controllers), None)
        if mount is None or ctrl not in own:
            continue
        base = base_dir(mount, own[ctrl], parent)
        if base is None:
            notes.append(f"v1 {ctrl}: own cgroup not visible")
            continue
        try:
            _mkdir(base, created)
            if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
                raise PermissionError(errno.EACCES, "cgroup.procs not writable")
        except OSError as exc:
            notes.append(f"v1 {ctrl}: {base}: {exc.strerror or exc}")
            continue
        bases[ctrl] = base
    absent = [c for c in LIMIT_CONTROLLERS if c in wanted and c not in bases]
    if absent and bases:
        notes.append("v1: controllers not available: " + ",".join(absent))
    return bases
