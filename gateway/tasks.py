"""The task manager: bounded concurrency, a bounded queue, states, live output.

A task is submitted only after its policy decision is on disk.  It waits in
the queue (QUEUED) for one of ``max_concurrent`` slots, runs in the sandbox
(RUNNING) and ends COMPLETED (the command exited, whatever its code),
FAILED (the sandbox could not run it, a signal killed it, or the gateway died),
CANCELLED or TIMED_OUT.  Every transition is persisted and audited.

Output is kept in memory only while a task lives, and only up to the
sandbox's per-stream cap; any number of readers follow it live.  Once a task
ends its output lives in the store until the task expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from gateway.audit import AuditSink
from gateway.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from gateway.metrics import Metrics
from gateway.models import RunResult, SandboxRequest, Stream, TaskState
from gateway.sandbox import Prestarted, Sandbox
from gateway.store import TaskRecord, TaskStore
from gateway.tracing import Tracing

log = structlog.get_logger("gateway.tasks")

ORPHAN_REASON = "the gateway stopped while the task was running"
SHUTDOWN_REASON = "the gateway shut down before the task finished"


@dataclasses.dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: Stream
    data: bytes
    offset: int  # offset of ``data`` within its stream


@dataclasses.dataclass(slots=True)
class _Live:
    record: TaskRecord
    request: SandboxRequest
    chunks: list[OutputChunk] = dataclasses.field(default_factory=list)
    sizes: dict[str, int] = dataclasses.field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancel: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancel_reason: str = ""
    queue_wait_s: float = 0.0
    gate: Awaitable[None] | None = None  # the decision record's durability
    early: Prestarted | None = None  # the sandbox begun while deciding

    def append(self, stream: Stream, data: bytes) -> None:
        self.chunks.append(OutputChunk(stream, data, self.sizes[stream]))
        self.sizes[stream] += len(data)
        self.wake()

    def wake(self) -> None:
        # Readers wait on the current event; replacing it re-arms the next wait.
        self.changed.set()
        self.changed = asyncio.Event()


class TaskManager:
    """Runs sandboxed tasks with bounded concurrency and queue."""

    def __init__(
        self,
        sandbox: Sandbox,
        store: TaskStore,
        audit: AuditSink,
        *,
        max_concurrent: int,
        max_queue: int,
        retention_s: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
    ) -> None:
        self._sandbox = sandbox
        self._tracing = tracing or Tracing()
        self._store = store
        self._audit = audit
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._retention_s = retention_s
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._slots = asyncio.Semaphore(max_concurrent)
        self._metrics.tasks_capacity.labels(kind="concurrent").set(max_concurrent)
        self._metrics.tasks_capacity.labels(kind="queue").set(max_queue)
        self._live: dict[str, _Live] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self._queued = 0
        self._running = 0
        self._early = 0  # prestarted sandboxes not yet submitted or discarded
        self._accepting = True
        self._expirer: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Account for tasks a previous process left running, start expiry."""
        for record in self._store.fail_orphans(ORPHAN_REASON, self._clock()):
            await self._audit.write(
                "task.failed",
                {"task_id": record.id, "owner": record.owner, "reason": ORPHAN_REASON},
            )
            log.warning("orphan task marked failed", task_id=record.id)
        self._store.expire(self._clock())
        self._expirer = asyncio.create_task(self._expire_loop())

    async def close(self, grace_s: float) -> None:
        """Stop accepting, give running tasks ``grace_s``, then cancel the rest."""
        self._accepting = False
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
        if self._runners:
            _, pending = await asyncio.wait(set(self._runners), timeout=grace_s)
            if pending:
                for live in list(self._live.values()):
                    live.cancel_reason = SHUTDOWN_REASON
                    live.cancel.set()
                await asyncio.wait(pending)

    async def _expire_loop(self) -> None:
        interval = min(max(self._retention_s / 10, 1.0), 60.0)
        while True:
            await asyncio.sleep(interval)
            removed = self._store.expire(self._clock())
            if removed:
                log.info("expired finished tasks", count=removed)

    # -- queries ---------------------------------------------------------------

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._queued

    def get(self, task_id: str) -> TaskRecord:
        live = self._live.get(task_id)
        if live is not None:
            return live.record
        record = self._store.get(task_id)
        if record is None:
            raise NotFound(f"task {task_id!r} not found (unknown, or expired)", field="task_id")
        return record

    # -- submission --------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise RESOURCE_EXHAUSTED if a new task would not fit in the queue."""
        if not self._accepting:
            raise Unavailable("the gateway is shutting down")
        free = self._running + self._queued < self._max_concurrent
        if not free and self._queued >= self._max_queue:
            raise ResourceExhausted(
                f"task queue is full ({self._max_queue} waiting); retry later", retry_after=1.0
            )

    def prestart(self, request: SandboxRequest) -> Prestarted | None:
        """Begin ``request``'s sandbox while its decision is made, if it would run at once.

        Only when a slot is free for it (counting other prestarts), so a
        burst of requests never has more sandboxes begun than
        ``max_concurrent``.  The caller hands the result to :meth:`submit`
        or :meth:`discard`.
        """
        if not self._accepting or (
            self._running + self._queued + self._early >= self._max_concurrent
        ):
            return None
        early = self._sandbox.prestart(request)
        if early is not None:
            self._early += 1
        return early

    def discard(self, early: Prestarted | None) -> None:
        """Undo a :meth:`prestart` whose task will not be submitted."""
        if early is not None:
            self._early -= 1
            self._metrics.sandbox_prestarts.labels(result="discarded").inc()
            early.discard()

    async def submit(
        self,
        record: TaskRecord,
        request: SandboxRequest,
        *,
        gate: Awaitable[None] | None = None,
        early: Prestarted | None = None,
    ) -> TaskRecord:
        """Queue a task whose decision is audited; return its record.

        ``gate`` (the decision record's durability) is awaited by the
        sandbox before the command starts; it may still be pending now.
        ``early`` (from :meth:`prestart`) belongs to the task from here on.
        """
        try:
            self.check_capacity()
        except BaseException:
            self.discard(early)
            raise
        if early is not None:
            self._early -= 1
            self._metrics.sandbox_prestarts.labels(result="submitted").inc()
        now = self._clock()
        record.created_at = now
        record.state = TaskState.QUEUED
        live = _Live(record=record, request=request, gate=gate, early=early)
        self._live[record.id] = live
        self._queued += 1
        self._metrics.tasks_queued.set(self._queued)
        self._store.put(record)
        await self._audit.write(
            "task.queued",
            {"task_id": record.id, "owner": record.owner, "request_id": record.request_id},
            sync=False,
        )
        runner = asyncio.create_task(self._run(live), name=f"task-{record.id}")
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        return record

    async def _run(self, live: _Live) -> None:
        # The runner inherits the submitting request's context, so task.run
        # is a child of the request span even when the request has returned.
        with self._tracing.span("task.run", attributes={"mcp.task.id": live.record.id}) as span:
            await self._run_traced(live)
            span.set_attribute("mcp.task.state", str(live.record.state))

    async def _run_traced(self, live: _Live) -> None:
        record = live.record
        try:
            queued_at = time.monotonic()
            wait_span = self._tracing.tracer.start_span("task.queue_wait")
            try:
                await self._slots.acquire()
            finally:
                wait_span.end()
            try:
                live.queue_wait_s = time.monotonic() - queued_at
                self._metrics.task_queue_wait_seconds.observe(live.queue_wait_s)
                self._queued -= 1
                self._metrics.tasks_queued.set(self._queued)
                if live.cancel.is_set():
                    result = RunResult(exit_code=None, cancelled=True)
                else:
                    self._running += 1
                    self._metrics.tasks_running.set(self._running)
                    try:
                        result = await self._execute(live)
                    finally:
                        self._running -= 1
                        self._metrics.tasks_running.set(self._running)
            finally:
                self._slots.release()
            if result.spawn_s is not None:
                self._metrics.task_start_seconds.observe(live.queue_wait_s + result.spawn_s)
                self._metrics.sandbox_starts.labels(kind="warm" if result.warm else "cold").inc()
            await self._finish(live, result)
        except Exception as exc:  # the runner must always end the task
            log.exception("task runner failed", task_id=record.id)
            self._metrics.sandbox_failures.inc()
            await self._finish(live, RunResult(exit_code=None, error=f"internal error: {exc}"))
        finally:
            # Not run (cancelled while queued, or failed before the sandbox).
            if live.early is not None:
                live.early.discard()
                live.early = None

    async def _execute(self, live: _Live) -> RunResult:
        record = live.record
        record.state = TaskState.RUNNING
        record.started_at = self._clock()
        # Not persisted here: readers of a live task get it from memory, and a
        # task the store still holds as QUEUED after a crash is failed as an
        # orphan all the same (one SQLite commit less per task).
        live.wake()
        # The decision record is appended and its fsync gates the command;
        # transitions are appended in order and fsynced in the background.
        await self._audit.write(
            "task.running", {"task_id": record.id, "owner": record.owner}, sync=False
        )
        early, live.early = live.early, None
        result = await self._sandbox.run(
            live.request, live.append, live.cancel, gate=live.gate, early=early
        )
        if result.error is not None:
            self._metrics.sandbox_failures.inc()
        return result

    async def _finish(self, live: _Live, result: RunResult) -> None:
        record = live.record
        record.ended_at = self._clock()
        record.exit_code = result.exit_code
        record.signal = result.signal
        record.state, record.reason = _final_state(result, live.cancel_reason)
        record.stdout = b"".join(c.data for c in live.chunks if c.stream == "stdout")
        record.stderr = b"".join(c.data for c in live.chunks if c.stream == "stderr")
        record.stdout_bytes = result.stdout_bytes
        record.stderr_bytes = result.stderr_bytes
        record.stdout_truncated = result.stdout_truncated
        record.stderr_truncated = result.stderr_truncated
        record.cpu_time_s = result.cpu_time_s
        record.max_rss_bytes = result.max_rss_bytes
        record.expires_at = record.ended_at + self._retention_s
        self._store.put(record)
        self._metrics.tasks_finished.labels(state=str(record.state)).inc()
        if record.started_at is not None:
            self._metrics.task_latency_ms.labels(state=str(record.state)).observe(
                (record.ended_at - record.started_at) * 1000
            )
        try:
            await self._audit.write(
                f"task.{str(record.state).lower()}",
                {
                    "task_id": record.id,
                    "owner": record.owner,
                    "exit_code": record.exit_code,
                    "signal": record.signal,
                    "reason": record.reason,
                    "stdout_bytes": record.stdout_bytes,
                    "stderr_bytes": record.stderr_bytes,
                    "truncated": record.stdout_truncated or record.stderr_truncated,
                    "cpu_time_s": record.cpu_time_s,
                    "max_rss_bytes": record.max_rss_bytes,
                },
                sync=False,
            )
        finally:
            live.done.set()
            live.wake()
            self._live.pop(record.id, None)

    # -- waiting, streaming, cancelling --------------------------------------------

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Wait until the task ends (or ``timeout``) and return its record."""
        live = self._live.get(task_id)
        if live is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.done.wait(), timeout)
            return live.record
        return self.get(task_id)

    def output(self, task_id: str, stream: Stream) -> bytes:
        """One stream's output so far (all of it once the task has ended)."""
        live = self._live.get(task_id)
        if live is None:
            record = self.get(task_id)
            return record.stdout if stream == "stdout" else record.stderr
        return b"".join(c.data for c in live.chunks if c.stream == stream)

    def owned(self, owner: str, limit: int) -> list[TaskRecord]:
        """The newest ``limit`` tasks of ``owner`` (live state for live tasks), no output."""
        records = self._store.owned(owner, limit)
        return [self._live[r.id].record if r.id in self._live else r for r in records]

    async def stream(self, task_id: str) -> AsyncIterator[OutputChunk]:
        """Yield the task's output from the start, live, until it ends."""
        live = self._live.get(task_id)
        if live is None:
            record = self.get(task_id)
            if record.stdout:
                yield OutputChunk("stdout", record.stdout, 0)
            if record.stderr:
                yield OutputChunk("stderr", record.stderr, 0)
            return
        index = 0
        while True:
            changed = live.changed
            while index < len(live.chunks):
                yield live.chunks[index]
                index += 1
            if live.done.is_set():
                return
            await changed.wait()

    async def cancel(self, task_id: str, reason: str = "cancelled by request") -> TaskRecord:
        """Ask a queued or running task to stop; its whole process tree dies."""
        live = self._live.get(task_id)
        if live is None:
            record = self.get(task_id)
            raise FailedPrecondition(
                f"task {task_id!r} already ended ({record.state})", field="task_id"
            )
        live.cancel_reason = reason
        live.cancel.set()
        await live.done.wait()
        return live.record


def _final_state(result: RunResult, cancel_reason: str) -> tuple[TaskState, str]:
    if result.cancelled:
        return TaskState.CANCELLED, cancel_reason or "cancelled by request"
    if result.timed_out:
        return TaskState.TIMED_OUT, "the command exceeded its timeout; its process tree was killed"
    if result.error is not None:
        return TaskState.FAILED, result.error
    if result.exit_code is None:
        sig = result.signal
        return TaskState.FAILED, f"the command was killed by signal {sig}"
    return TaskState.COMPLETED, ""
