"""Plain data shared by the core: subjects, commands, decisions, tasks, results.

Nothing here does I/O; every adapter (REST, gRPC, MCP) and every seam
(policy, sandbox, audit, store) speaks in these types.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Literal

Transport = Literal["rest", "grpc", "mcp", "cli"]
Stream = Literal["stdout", "stderr"]


@dataclasses.dataclass(frozen=True, slots=True)
class Subject:
    """An authenticated caller."""

    id: str
    roles: tuple[str, ...]
    auth: Literal["token", "mtls", "jwt", "none"] = "token"


class TaskState(enum.StrEnum):
    """Task states, the same names as the original project's proto."""

    CREATED = "CREATED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for one sandboxed run (after policy has capped them)."""

    timeout_s: float = 30.0
    memory_bytes: int = 256 * 1024 * 1024
    pids: int = 64
    cpu_seconds: int = 30
    cpu_quota: float = 1.0  # fraction of one CPU (cgroup cpu.max)
    nofile: int = 256
    fsize_bytes: int = 64 * 1024 * 1024
    tmp_size_bytes: int = 64 * 1024 * 1024
    output_bytes: int = 1024 * 1024  # per stream
    network: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class CommandSpec:
    """What a caller asked to run (validated, not yet decided)."""

    name: str
    args: tuple[str, ...] = ()
    cwd: str = "/workspace"
    env: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 30.0
    stdin: bytes | None = None
    network: bool = False

    @property
    def argv(self) -> list[str]:
        return [self.name, *self.args]


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer (``data.mcp.decision``)."""

    allow: bool
    deny_reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    limits: dict[str, Any] = dataclasses.field(default_factory=dict)
    engine: str = ""
    decision_id: str | None = None
    revision: str | None = None

    @classmethod
    def deny(cls, reason: str, *, engine: str = "") -> Decision:
        return cls(allow=False, deny_reasons=(reason,), engine=engine)


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxRequest:
    """Everything the sandbox needs to run one command; built by the core."""

    task_id: str
    argv: tuple[str, ...]
    workspace: str  # host path of the subject's workspace, mounted at /workspace
    cwd: str = "/workspace"
    env: tuple[tuple[str, str], ...] = ()
    stdin: bytes | None = None
    limits: Limits = Limits()


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    """How a sandboxed run ended, measured for real."""

    exit_code: int | None  # None when killed by a signal
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    stdout_bytes: int = 0  # bytes the command produced (before capping)
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_time_s: float = 0.0
    max_rss_bytes: int = 0
    wall_time_s: float = 0.0
    error: str | None = None  # sandbox failure (bwrap could not start the command)
    spawn_s: float | None = None  # from run() to the command's release (None: never released)
    warm: bool = False  # run by a warm sandbox (set up before the request came)
