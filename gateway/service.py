"""The service layer every adapter (REST, gRPC, MCP, CLI) calls.

Order for every request: validate (done by the adapter via :mod:`gateway.schema`)
-> build the policy input -> decide -> audit the decision (fsync) -> act.
A deny, an engine error or an audit failure stops the request before anything
runs or any file is touched.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from gateway.audit import AuditSink
from gateway.config import Config, LimitsConfig
from gateway.errors import McpError, NotFound, PermissionDenied, Unavailable
from gateway.ha import TaskIds
from gateway.metrics import Metrics
from gateway.models import (
    CommandSpec,
    Decision,
    Limits,
    SandboxRequest,
    Stream,
    Subject,
    Transport,
)
from gateway.policy import PolicyEngine, build_policy_input
from gateway.reload import PolicyReloader
from gateway.sandbox import Prestarted, Sandbox
from gateway.store import TaskRecord
from gateway.tasks import OutputChunk, TaskManager
from gateway.tracing import Tracing
from gateway.workspace import FileEntry, Listing, Workspaces

log = structlog.get_logger("gateway.service")

# How long each readiness part is reused (keepalived asks every 0.5 s): the
# policy engine and the disk are cheap and decide a failover, so they are
# checked almost every time; the sandbox self-test spawns two sandboxes.
READY_CACHE_S = {"sandbox": 5.0, "policy": 0.25, "disk": 1.0}
MIN_FREE_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(slots=True)
class Walk:
    """The tree below a workspace directory (see :meth:`Gateway.walk`).

    ``entries`` pairs each workspace-relative path with its entry, parents
    before children, siblings by name; ``denied`` lists the directories the
    policy refused to list (their contents are absent); ``truncated`` is true
    when the walk stopped at the entry cap.
    """

    entries: list[tuple[str, FileEntry]] = dataclasses.field(default_factory=list)
    denied: list[str] = dataclasses.field(default_factory=list)
    truncated: bool = False


_PROBE_COMMAND = CommandSpec(name="true", args=(), cwd="/workspace")


def _join(parent: str, name: str) -> str:
    return name if parent in ("", ".") else f"{parent}/{name}"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestContext:
    """Where a request came from; goes into the policy input and audit."""

    transport: Transport
    source: str = ""
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


def grant_limits(defaults: LimitsConfig, spec: CommandSpec, granted: Mapping[str, Any]) -> Limits:
    """Combine config defaults, the request and the policy grant (pure).

    Policy limits can only lower the configured caps; network is on only
    when the request asked for it *and* the policy granted it.
    """

    def cap(name: str, default: float) -> float:
        value = granted.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return min(float(value), default)
        return default

    return Limits(
        timeout_s=cap("timeout_s", min(spec.timeout_s, defaults.max_timeout_s)),
        memory_bytes=int(cap("memory_bytes", defaults.memory_bytes)),
        pids=int(cap("pids", defaults.pids)),
        cpu_seconds=int(cap("cpu_seconds", defaults.cpu_seconds)),
        cpu_quota=cap("cpu_quota", defaults.cpu_quota),
        nofile=int(cap("nofile", defaults.nofile)),
        fsize_bytes=int(cap("fsize_bytes", defaults.fsize_bytes)),
        tmp_size_bytes=int(cap("tmp_size_bytes", defaults.tmp_size_bytes)),
        output_bytes=int(cap("output_bytes", defaults.output_bytes)),
        network=spec.network and granted.get("network") is True,
    )


class Gateway:
    """Authenticated subjects in, decided + audited + sandboxed actions out."""

    def __init__(
        self,
        config: Config,
        *,
        policy: PolicyEngine,
        sandbox: Sandbox,
        audit: AuditSink,
        tasks: TaskManager,
        workspaces: Workspaces,
        metrics: Metrics,
        reloader: PolicyReloader | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.tracing = tracing or Tracing()
        self.policy = policy
        self.sandbox = sandbox
        self.audit = audit
        self.tasks = tasks
        self.workspaces = workspaces
        self.metrics = metrics
        self.reloader = reloader
        self._clock = clock
        self._checked_at = dict.fromkeys(READY_CACHE_S, -math.inf)
        self._checks: dict[str, dict[str, Any]] = {}
        self.vrrp_role: Callable[[], str] | None = None
        self.task_ids = TaskIds(config.ha.node_name, config.ha.peers)
        self._ready_lock = asyncio.Lock()

    async def reload_policy(self, reason: str) -> bool:
        """Reload the policy (SIGHUP): the embedded engine recompiles; with OPA (which
        reloads itself) the recorded revision is recomputed."""
        if self.reloader is None:
            log.info("policy engine reloads on its own", engine=self.policy.name, reason=reason)
            return False
        return await self.reloader.reload(reason)

    # -- decisions -------------------------------------------------------------

    async def decide(
        self,
        action: str,
        subject: Subject,
        ctx: RequestContext,
        *,
        visibility: bool = False,
        **details: Any,
    ) -> Decision:
        """Decide and audit; raise PermissionDenied on deny, Unavailable if unaudited.

        ``visibility`` marks a question asked only to show the subject what it
        may do (:meth:`may`): audited with ``"visibility": true`` and left out
        of the allow/deny counter, so listing tools cannot look like probing.
        The decision record is durable when this returns.
        """
        decision, durable = await self._decide(action, subject, ctx, visibility, details)
        await self._until_durable(durable)
        if not decision.allow:
            raise _denied(decision)
        return decision

    async def _decide(
        self,
        action: str,
        subject: Subject,
        ctx: RequestContext,
        visibility: bool,
        details: Mapping[str, Any],
    ) -> tuple[Decision, asyncio.Future[None]]:
        """Decide and append the decision record; the future ends once it is durable."""
        doc = build_policy_input(
            action,
            subject,
            request_id=ctx.request_id,
            transport=ctx.transport,
            source=ctx.source,
            **details,
        )
        with self.tracing.span(
            "policy.decide",
            attributes={"mcp.policy.engine": self.policy.name, "mcp.policy.action": action},
        ) as span:
            started = time.perf_counter()
            try:
                decision = await self.policy.decide(doc)
            except Exception as exc:  # any engine failure denies (fail closed)
                log.warning("policy engine failed", error=str(exc), engine=self.policy.name)
                self.metrics.policy_errors.labels(engine=self.policy.name).inc()
                decision = Decision.deny(f"policy engine error: {exc}", engine=self.policy.name)
            self.metrics.policy_decision_seconds.labels(engine=self.policy.name).observe(
                time.perf_counter() - started
            )
            if not visibility:
                self.metrics.policy_decisions.labels(
                    action=action, result="allow" if decision.allow else "deny"
                ).inc()
            span.set_attribute("mcp.policy.allow", decision.allow)
            if decision.decision_id:
                span.set_attribute("mcp.policy.decision_id", decision.decision_id)
            if decision.revision:
                span.set_attribute("mcp.policy.revision", decision.revision)
            durable = await self._audit_decision(action, subject, ctx, doc, decision, visibility)
        return decision, durable

    async def _until_durable(self, durable: asyncio.Future[None]) -> None:
        try:
            await asyncio.shield(durable)
        except McpError as exc:
            raise Unavailable(_UNAUDITED) from exc

    async def may(self, action: str, subject: Subject, ctx: RequestContext) -> bool:
        """Whether the policy lets ``subject`` perform ``action`` at all (decided, audited).

        A representative request stands for the action: a file operation is a
        probe (``file.probe``: granted on any path), a task operation is on
        the subject's own tasks (task ``*``), a command is ``true`` in the
        workspace.  Nothing is done; used to show only callable MCP tools.
        """
        details: dict[str, Any] = {}
        if action.startswith("file."):
            details = {"file_path": "", "probe": True}
        elif action.startswith("task."):
            details = {"task_id": "*", "task_owner": subject.id}
        elif action == "command.execute":
            details = {"command": _PROBE_COMMAND}
        try:
            await self.decide(action, subject, ctx, visibility=True, **details)
        except PermissionDenied:
            return False
        return True

    async def _audit_decision(
        self,
        action: str,
        subject: Subject,
        ctx: RequestContext,
        doc: Mapping[str, Any],
        decision: Decision,
        visibility: bool = False,
    ) -> asyncio.Future[None]:
        record: dict[str, Any] = {
            "action": action,
            "subject": subject.id,
            "roles": list(subject.roles),
            "auth": subject.auth,
            "request_id": ctx.request_id,
            "transport": ctx.transport,
            "source": ctx.source,
            "allow": decision.allow,
            "deny_reasons": list(decision.deny_reasons),
            "warnings": list(decision.warnings),
            "engine": decision.engine,
            "decision_id": decision.decision_id,
            "policy_revision": decision.revision,
            "input": {k: v for k, v in doc.items() if k in ("command", "file", "task", "sandbox")},
        }
        if visibility:
            record["visibility"] = True
        try:
            _, durable = await self.audit.append("policy.decision", record)
        except Exception as exc:
            self._audit_failed(exc, "policy.decision")
            raise Unavailable(_UNAUDITED) from exc
        durable.add_done_callback(self._count_unsynced_decision)
        return durable

    def _audit_failed(self, exc: BaseException, event: str) -> None:
        self.metrics.audit_failures.inc()
        log.error("audit write failed", error=str(exc), audit_event=event)

    def _count_unsynced_decision(self, durable: asyncio.Future[None]) -> None:
        exc = None if durable.cancelled() else durable.exception()
        if exc is not None:
            self._audit_failed(exc, "policy.decision")

    async def _audit_or_unavailable(self, event: str, fields: Mapping[str, Any]) -> None:
        try:
            await self.audit.write(event, fields)
        except Exception as exc:
            self._audit_failed(exc, event)
            raise Unavailable(_UNAUDITED) from exc

    async def reject(self, subject: Subject | None, ctx: RequestContext, error: McpError) -> None:
        """Audit a request refused before any decision (bad input, auth, capacity)."""
        await self._audit_or_unavailable(
            "request.rejected",
            {
                "subject": subject.id if subject else None,
                "request_id": ctx.request_id,
                "transport": ctx.transport,
                "source": ctx.source,
                "code": str(error.code),
                "field": error.field,
                "message": error.message,
            },
        )

    # -- commands and tasks ----------------------------------------------------------

    async def execute(self, subject: Subject, spec: CommandSpec, ctx: RequestContext) -> TaskRecord:
        """Decide, audit, queue.  Returns the QUEUED task record.

        bwrap is forked while the policy decides (:meth:`TaskManager.prestart`:
        it stops before the command and is killed on a deny), the sandbox is
        set up while the decision record is fsynced, and the command starts
        only once that record is durable (the gate).
        """
        self.tasks.check_capacity()
        task_id = self.task_ids.new()
        workspace = self.workspaces.existing(subject.id)
        early = None if workspace is None else self._prestart(spec, task_id, workspace)
        try:
            durable, limits = await self._grant(subject, spec, ctx)
            if workspace is None:  # made only once the command is allowed
                workspace = self.workspaces.path_for(subject.id)
        except BaseException:
            self.tasks.discard(early)
            raise
        request = _sandbox_request(task_id, spec, str(workspace), limits)
        record = TaskRecord(
            id=task_id,
            owner=subject.id,
            argv=tuple(spec.argv),
            cwd=spec.cwd,
            request_id=ctx.request_id,
            transport=ctx.transport,
            timeout_s=limits.timeout_s,
        )
        return await self.tasks.submit(record, request, gate=durable, early=early)

    async def _grant(
        self, subject: Subject, spec: CommandSpec, ctx: RequestContext
    ) -> tuple[asyncio.Future[None], Limits]:
        """Decide ``spec``; the decision record's durability and the granted limits."""
        decision, durable = await self._decide(
            "command.execute", subject, ctx, False, {"command": spec}
        )
        if not decision.allow:
            await self._until_durable(durable)
            raise _denied(decision)
        return durable, grant_limits(self.config.sandbox.limits, spec, decision.limits)

    def _prestart(self, spec: CommandSpec, task_id: str, workspace: Path) -> Prestarted | None:
        """Fork bwrap for ``spec`` before it is decided, where nothing depends on the grant.

        Only into an existing ``workspace`` (a request must not create one
        before it is allowed), and not for a request that asks for the
        network (the grant decides bwrap's command line).  The run uses the
        fork only if the granted limits set bwrap up the same way.
        """
        if spec.network:
            return None
        limits = grant_limits(self.config.sandbox.limits, spec, {})
        return self.tasks.prestart(_sandbox_request(task_id, spec, str(workspace), limits))

    def _record(self, task_id: str) -> TaskRecord:
        """The task, or NOT_FOUND; a task another node started is reported LOST."""
        try:
            return self.tasks.get(task_id)
        except NotFound:
            node = self.task_ids.elsewhere(task_id)
            if node is None:
                raise
            raise self.task_ids.lost(task_id, node) from None

    async def task(self, subject: Subject, task_id: str, ctx: RequestContext) -> TaskRecord:
        record = self._record(task_id)
        await self.decide("task.read", subject, ctx, task_id=task_id, task_owner=record.owner)
        return record

    async def wait(
        self, subject: Subject, task_id: str, ctx: RequestContext, timeout: float | None = None
    ) -> TaskRecord:
        await self.task(subject, task_id, ctx)
        return await self.tasks.wait(task_id, timeout)

    async def output(
        self, subject: Subject, task_id: str, ctx: RequestContext
    ) -> AsyncIterator[OutputChunk]:
        """Authorize now; the returned iterator follows the output live."""
        await self.task(subject, task_id, ctx)
        return self._traced_stream(task_id)

    async def _traced_stream(self, task_id: str) -> AsyncIterator[OutputChunk]:
        # Not made current: a reader may abandon the iterator from anywhere,
        # and a span that is only started and ended cannot leak a context.
        span = self.tracing.tracer.start_span("output.stream", attributes={"mcp.task.id": task_id})
        chunks = sent = 0
        try:
            async for chunk in self.tasks.stream(task_id):
                chunks += 1
                sent += len(chunk.data)
                yield chunk
        finally:
            span.set_attribute("mcp.output.chunks", chunks)
            span.set_attribute("mcp.output.bytes", sent)
            span.end()

    async def read_output(
        self,
        subject: Subject,
        task_id: str,
        ctx: RequestContext,
        *,
        stream: Stream = "stdout",
        offset: int = 0,
        length: int,
    ) -> tuple[TaskRecord, bytes, int]:
        """Authorize, then ``length`` bytes of one stream from ``offset`` and its size so far."""
        record = await self.task(subject, task_id, ctx)
        data = self.tasks.output(task_id, stream)
        return record, data[offset : offset + length], len(data)

    async def list_tasks(
        self, subject: Subject, ctx: RequestContext, limit: int
    ) -> list[TaskRecord]:
        """The subject's own newest tasks: one ``task.read`` decision for task id ``*``
        owned by the subject (the policy's "own tasks" grant)."""
        await self.decide("task.read", subject, ctx, task_id="*", task_owner=subject.id)
        return self.tasks.owned(subject.id, limit)

    async def cancel(self, subject: Subject, task_id: str, ctx: RequestContext) -> TaskRecord:
        record = self._record(task_id)
        await self.decide("task.cancel", subject, ctx, task_id=task_id, task_owner=record.owner)
        return await self.tasks.cancel(task_id, reason=f"cancelled by {subject.id}")

    # -- files -----------------------------------------------------------------------

    async def read_file(
        self,
        subject: Subject,
        path: str,
        ctx: RequestContext,
        *,
        offset: int = 0,
        length: int | None = None,
    ) -> bytes:
        await self.decide("file.read", subject, ctx, file_path=path)
        return await asyncio.to_thread(
            self.workspaces.read, subject.id, path, offset=offset, length=length
        )

    async def stat_file(self, subject: Subject, path: str, ctx: RequestContext) -> FileEntry:
        await self.decide("file.read", subject, ctx, file_path=path)
        return await asyncio.to_thread(self.workspaces.stat, subject.id, path)

    async def list_files(self, subject: Subject, path: str, ctx: RequestContext) -> Listing:
        await self.decide("file.list", subject, ctx, file_path=path)
        return await asyncio.to_thread(self.workspaces.list, subject.id, path)

    async def walk(
        self,
        subject: Subject,
        path: str,
        ctx: RequestContext,
        *,
        skip: Callable[[str], bool] = lambda _: False,
    ) -> Walk:
        """Walk the tree below directory ``path``, one ``file.list`` decision per directory.

        A deny for ``path`` itself raises; a deny for a directory below it is
        recorded in :attr:`Walk.denied` and the walk goes on without it.
        ``skip(rel)`` drops an entry (and, for a directory, everything below
        it) before any decision.  Symlinks are reported, never followed.  At
        most ``files.max_list_entries`` entries in all.
        """
        cap = self.config.files.max_list_entries
        walk = Walk()
        pending = collections.deque([path])
        first = True
        while pending:
            current = pending.popleft()
            try:
                listing = await self.list_files(subject, current, ctx)
            except PermissionDenied:
                if first:
                    raise
                walk.denied.append(current)
                continue
            first = False
            walk.truncated |= listing.truncated
            for entry in listing:
                rel = _join(current, entry.name)
                if skip(rel):
                    continue
                if len(walk.entries) >= cap:
                    walk.truncated = True
                    pending.clear()
                    break
                walk.entries.append((rel, entry))
                if entry.type == "dir":
                    pending.append(rel)
        # Component-wise order puts every directory right before its contents.
        walk.entries.sort(key=lambda item: item[0].split("/"))
        return walk

    async def move_file(
        self, subject: Subject, source: str, destination: str, ctx: RequestContext
    ) -> None:
        """Rename within the workspace: a ``file.delete`` of the source and a
        ``file.write`` of the destination must both be allowed."""
        await self.decide("file.delete", subject, ctx, file_path=source)
        await self.decide("file.write", subject, ctx, file_path=destination)
        await asyncio.to_thread(self.workspaces.move, subject.id, source, destination)
        await self._audit_or_unavailable(
            "file.moved",
            {
                "subject": subject.id,
                "request_id": ctx.request_id,
                "path": source,
                "destination": destination,
            },
        )

    async def write_file(
        self,
        subject: Subject,
        path: str,
        data: bytes,
        ctx: RequestContext,
        *,
        mode: int = 0o644,
        create_dirs: bool = False,
    ) -> int:
        await self.decide("file.write", subject, ctx, file_path=path, file_mode=mode)
        written = await asyncio.to_thread(
            self.workspaces.write, subject.id, path, data, mode=mode, create_dirs=create_dirs
        )
        await self._audit_or_unavailable(
            "file.written",
            {"subject": subject.id, "request_id": ctx.request_id, "path": path, "bytes": written},
        )
        return written

    async def make_directory(self, subject: Subject, path: str, ctx: RequestContext) -> None:
        await self.decide("file.write", subject, ctx, file_path=path, file_mode=0o755)
        await asyncio.to_thread(self.workspaces.mkdir, subject.id, path)
        await self._audit_or_unavailable(
            "file.directory_created",
            {"subject": subject.id, "request_id": ctx.request_id, "path": path},
        )

    async def delete_file(
        self, subject: Subject, path: str, ctx: RequestContext, *, recursive: bool = False
    ) -> None:
        await self.decide("file.delete", subject, ctx, file_path=path, recursive=recursive)
        await asyncio.to_thread(self.workspaces.delete, subject.id, path, recursive=recursive)
        await self._audit_or_unavailable(
            "file.deleted",
            {
                "subject": subject.id,
                "request_id": ctx.request_id,
                "path": path,
                "recursive": recursive,
            },
        )

    # -- readiness -----------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Check sandbox, policy engine and disk, each part reused briefly (READY_CACHE_S)."""
        async with self._ready_lock:
            for name, probe in (
                ("sandbox", self.sandbox.self_test),
                ("policy", self.policy.check),
                ("disk", self._disk_check),
            ):
                if self._clock() - self._checked_at[name] < READY_CACHE_S[name]:
                    continue
                try:
                    self._checks[name] = {"ok": True, **(await probe())}
                except Exception as exc:
                    self._checks[name] = {"ok": False, "error": str(exc)}
                self._checked_at[name] = self._clock()
            parts = {name: bool(self._checks[name]["ok"]) for name in READY_CACHE_S}
            self.metrics.set_ready(parts)
            checks: dict[str, Any] = dict(self._checks)
            checks["tasks"] = {"running": self.tasks.running, "queued": self.tasks.queued}
            if self.vrrp_role is not None:
                checks["vrrp"] = {"role": self.vrrp_role()}
            return {"ready": all(parts.values()), "checks": checks}

    async def _disk_check(self) -> dict[str, Any]:
        state = self.config.state_dir
        usage = await asyncio.to_thread(shutil.disk_usage, state)
        if usage.free < MIN_FREE_BYTES:
            raise Unavailable(f"only {usage.free} bytes free under the state directory")
        if not os.access(self.config.audit_path, os.W_OK):
            raise Unavailable("the audit log is not writable")
        return {"free_bytes": usage.free}


_UNAUDITED = "the audit log cannot be written; nothing was done"


def _sandbox_request(
    task_id: str, spec: CommandSpec, workspace: str, limits: Limits
) -> SandboxRequest:
    return SandboxRequest(
        task_id=task_id,
        argv=tuple(spec.argv),
        workspace=workspace,
        cwd=spec.cwd,
        env=spec.env,
        stdin=spec.stdin,
        limits=limits,
    )


def _denied(decision: Decision) -> PermissionDenied:
    return PermissionDenied(
        "denied by policy: " + "; ".join(decision.deny_reasons or ("no reason given",)),
        reasons=list(decision.deny_reasons),
    )
