"""Task records persisted in an embedded SQLite database.

Finished results survive a restart; a task found in a non-terminal state at
start-up belonged to a gateway that died, and :meth:`SqliteTaskStore.fail_orphans`
marks it FAILED with a reason so every task stays accounted for.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol

import structlog

from gateway.errors import Internal
from gateway.models import TaskState

log = structlog.get_logger("gateway.store")

#: How often the WAL is copied back into the database file (off the event loop).
CHECKPOINT_INTERVAL_S = 1.0


@dataclasses.dataclass(slots=True)
class TaskRecord:
    """Everything known about one task; mutable while the task lives."""

    id: str
    owner: str
    argv: tuple[str, ...]
    cwd: str
    state: TaskState = TaskState.CREATED
    request_id: str = ""
    transport: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    expires_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_time_s: float = 0.0
    max_rss_bytes: int = 0
    timeout_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON view every transport returns (output excluded)."""
        return {
            "task_id": self.id,
            "state": str(self.state),
            "owner": self.owner,
            "command": list(self.argv),
            "cwd": self.cwd,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "cpu_time_s": self.cpu_time_s,
            "max_rss_bytes": self.max_rss_bytes,
            "duration_s": (
                None
                if self.started_at is None or self.ended_at is None
                else round(self.ended_at - self.started_at, 6)
            ),
        }


class TaskStore(Protocol):
    def put(self, record: TaskRecord) -> None: ...
    def get(self, task_id: str) -> TaskRecord | None: ...
    def fail_orphans(self, reason: str, now: float) -> list[TaskRecord]: ...
    def owned(self, owner: str, limit: int) -> list[TaskRecord]: ...
    def expire(self, now: float) -> int: ...
    def close(self) -> None: ...


_COLUMNS = [f.name for f in dataclasses.fields(TaskRecord)]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    expires_at REAL,
    doc TEXT NOT NULL,
    stdout BLOB NOT NULL,
    stderr BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_expires ON tasks(expires_at);
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks(owner);
"""

_TERMINAL = tuple(str(s) for s in TaskState if s.terminal)


class SqliteTaskStore:
    """A :class:`TaskStore` in one SQLite file (WAL mode).

    Calls are short and synchronous; the task manager makes a handful per
    task, which costs less than handing each to a thread.  A commit only
    appends to the WAL: copying the WAL back into the database file (a
    checkpoint, which fsyncs both) is left to :class:`_Checkpointer`'s
    thread, so the event loop never waits for a disk flush here.
    """

    def __init__(self, path: Path, checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (the case we test);
            # only power loss can roll back the last commits (those since the
            # last checkpoint).
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Commits never checkpoint (by default every ~1000 pages one of
            # them would, fsyncs included, on the event loop).
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript(_SCHEMA)
            self._checkpointer = _Checkpointer(path, checkpoint_interval_s)
        except sqlite3.Error as exc:
            raise Internal(f"cannot open the task store: {exc}") from exc

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database file now: (frames in the WAL, frames copied)."""
        return self._checkpointer.checkpoint()

    def put(self, record: TaskRecord) -> None:
        doc = {
            name: getattr(record, name)
            for name in _COLUMNS
            if name not in ("stdout", "stderr", "state", "argv")
        }
        doc["argv"] = list(record.argv)
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO tasks(id, owner, state, expires_at, doc, stdout, stderr)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.owner,
                    str(record.state),
                    record.expires_at,
                    json.dumps(doc),
                    record.stdout,
                    record.stderr,
                ),
            )
        except sqlite3.Error as exc:
            raise Internal(f"cannot persist task {record.id}: {exc}") from exc

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute(
            "SELECT state, doc, stdout, stderr FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return None if row is None else _record(row)

    def fail_orphans(self, reason: str, now: float) -> list[TaskRecord]:
        placeholders = ",".join("?" * len(_TERMINAL))
        rows = self._db.execute(
            f"SELECT state, doc, stdout, stderr FROM tasks WHERE state NOT IN ({placeholders})",  # noqa: S608 - placeholders only
            _TERMINAL,
        ).fetchall()
        orphans = []
        for row in rows:
            record = _record(row)
            record.state = TaskState.FAILED
            record.reason = reason
            record.ended_at = now
            self.put(record)
            orphans.append(record)
        return orphans

    def owned(self, owner: str, limit: int) -> list[TaskRecord]:
        """The newest ``limit`` tasks of ``owner``, newest first, without their output."""
        rows = self._db.execute(
            "SELECT state, doc, x'', x'' FROM tasks WHERE owner = ?"
            " ORDER BY json_extract(doc, '$.created_at') DESC LIMIT ?",
            (owner, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def expire(self, now: float) -> int:
        cur = self._db.execute(
            "DELETE FROM tasks WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        )
        return cur.rowcount

    def close(self) -> None:
        self._checkpointer.close()
        # The last connection to close checkpoints what is left and removes the WAL.
        self._db.close()


class _Checkpointer:
    """Copies the WAL into the database file every ``interval_s``, on a thread of its own.

    It has its own connection: a PASSIVE checkpoint never waits for (nor
    blocks) the writer, which keeps appending to the WAL meanwhile.  A
    failed round is logged and retried at the next one.
    """

    def __init__(self, path: Path, interval_s: float) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._interval_s = interval_s
        self._lock = threading.Lock()  # one checkpoint at a time; none after close
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.checkpoint()
            except sqlite3.Error as exc:
                log.warning("task store checkpoint failed", error=str(exc))

    def checkpoint(self) -> tuple[int, int]:
        with self._lock:
            if self._stop.is_set():
                return (0, 0)
            row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return (int(row[1]), int(row[2]))

    def close(self) -> None:
        with self._lock:
            self._stop.set()
        self._thread.join()
        self._db.close()


def _record(row: tuple[str, str, bytes, bytes]) -> TaskRecord:
    state, doc_text, stdout, stderr = row
    doc = json.loads(doc_text)
    doc["argv"] = tuple(doc["argv"])
    return TaskRecord(state=TaskState(state), stdout=bytes(stdout), stderr=bytes(stderr), **doc)
