"""The SQLite task store on a real file: records, orphans, expiry, and its checkpoints.

Commits only append to the WAL; copying it into the database file (with
its fsyncs) happens on the store's checkpoint thread, never in ``put``.
Reading the file with ``immutable=1`` ignores the WAL, so it shows exactly
what has been checkpointed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.models import TaskState
from gateway.store import SqliteTaskStore, TaskRecord


def record(task_id: str, state: TaskState = TaskState.QUEUED, **fields: object) -> TaskRecord:
    rec = TaskRecord(id=task_id, owner="alice", argv=("echo", "hi"), cwd="/workspace")
    rec.state = state
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


def checkpointed_ids(path: Path) -> set[str]:
    """The task ids in the database file itself (the WAL ignored)."""
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
        try:
            return {row[0] for row in db.execute("SELECT id FROM tasks")}
        except sqlite3.DatabaseError:  # no schema in the file yet, or a page being copied
            return set()


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlite-checkpoint"]


def test_records_orphans_and_expiry(tmp_path: Path) -> None:
    """What the task manager relies on: round trip, orphans failed on start-up, expiry."""
    with contextlib.closing(SqliteTaskStore(tmp_path / "tasks.db")) as store:
        done = record("done", TaskState.COMPLETED, stdout=b"hi\n", exit_code=0, expires_at=10.0)
        store.put(done)
        store.put(record("running", TaskState.RUNNING))
        got = store.get("done")
        assert got is not None
        assert (got.state, got.stdout, got.exit_code, got.argv) == (
            TaskState.COMPLETED,
            b"hi\n",
            0,
            ("echo", "hi"),
        )
        assert store.get("nope") is None
        orphans = store.fail_orphans("the gateway stopped", now=5.0)
        assert [o.id for o in orphans] == ["running"]
        failed = store.get("running")
        assert failed is not None
        assert (failed.state, failed.reason) == (TaskState.FAILED, "the gateway stopped")
        assert store.expire(now=20.0) == 1
        assert store.get("done") is None


def test_puts_never_checkpoint_the_thread_does(tmp_path: Path) -> None:
    """Thousands of commits stay in the WAL until the checkpoint thread copies them."""
    path = tmp_path / "tasks.db"
    with contextlib.closing(SqliteTaskStore(path, checkpoint_interval_s=3600)) as store:
        for i in range(3000):  # well past SQLite's default autocheckpoint (1000 pages)
            store.put(record(f"t{i}", stdout=b"x" * 200))
        assert checkpointed_ids(path) == set()
        frames, copied = store.checkpoint()
        assert frames > 1000
        assert copied == frames
        assert len(checkpointed_ids(path)) == 3000


def test_checkpoint_thread_runs_on_its_interval(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    with contextlib.closing(SqliteTaskStore(path, checkpoint_interval_s=0.05)) as store:
        store.put(record("a"))
        deadline = time.monotonic() + 10
        while "a" not in checkpointed_ids(path):
            assert time.monotonic() < deadline, "the checkpoint thread never ran"
            time.sleep(0.02)


def test_close_stops_the_thread_and_leaves_everything_in_the_file(tmp_path: Path) -> None:
    before = len(checkpoint_threads())
    path = tmp_path / "tasks.db"
    store = SqliteTaskStore(path, checkpoint_interval_s=3600)
    assert len(checkpoint_threads()) == before + 1
    store.put(record("last", TaskState.COMPLETED))
    store.close()
    assert len(checkpoint_threads()) == before
    assert checkpointed_ids(path) == {"last"}
    assert not (tmp_path / "tasks.db-wal").exists()
    assert store.checkpoint() == (0, 0)  # after close: nothing, no error


@pytest.mark.parametrize("interval", [0.0, 0.01])
def test_checkpoints_alongside_a_busy_writer(tmp_path: Path, interval: float) -> None:
    """A PASSIVE checkpoint in a tight loop neither blocks nor breaks the writer."""
    path = tmp_path / "tasks.db"
    store = SqliteTaskStore(path, checkpoint_interval_s=3600)
    stop = threading.Event()
    rounds = 0

    def checkpoints() -> None:
        nonlocal rounds
        while not stop.is_set():
            store.checkpoint()
            rounds += 1
            time.sleep(interval)

    thread = threading.Thread(target=checkpoints)
    thread.start()
    try:
        for i in range(500):
            store.put(record(f"t{i}"))
            store.put(record(f"t{i}", TaskState.COMPLETED))
    finally:
        stop.set()
        thread.join()
    try:
        assert rounds > 0
        assert all(
            (got := store.get(f"t{i}")) is not None and got.state == TaskState.COMPLETED
            for i in range(500)
        )
    finally:
        store.close()
    assert len(checkpointed_ids(path)) == 500
