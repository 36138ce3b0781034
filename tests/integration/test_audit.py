"""AuditLog on a real file: durability, chain continuity, concurrency, redaction, recovery."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import (
    GENESIS,
    RECOVERED_EVENT,
    REDACTED,
    AuditLog,
    AuditSink,
    verify_file,
)
from gateway.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from tests.conftest import until

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(path)]


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def exists(path: Path) -> bool:
    return path.exists()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


async def write_n(log: AuditLog, n: int, start: int = 0) -> list[str]:
    return [await log.write("test.event", {"i": i}) for i in range(start, start + n)]


def test_auditlog_is_an_audit_sink(log_path: Path) -> None:
    """AuditLog satisfies the AuditSink protocol the core depends on."""
    sink: AuditSink = AuditLog(log_path)
    assert isinstance(sink, AuditLog)


async def test_write_is_durable_and_returns_line_hash(log_path: Path) -> None:
    """Each write is on disk (0o600) before it returns, and returns the SHA-256 of its line."""
    latencies: list[float] = []
    log = AuditLog(log_path, clock=lambda: 0.0, on_latency=latencies.append)
    digest = await log.write("gateway.started", {"engine": "embedded"})
    (line,) = lines_of(log_path)  # readable by another reader before close
    assert digest == sha(line)
    record = json.loads(line)
    assert record == {
        "seq": 1,
        "ts": "1970-01-01T00:00:00.000000Z",
        "event": "gateway.started",
        "engine": "embedded",
        "prev": GENESIS,
    }
    assert mode_of(log_path) == 0o600
    assert len(latencies) == 1
    assert latencies[0] >= 0
    await log.close()


async def test_chain_continues_across_reopen(log_path: Path) -> None:
    """A reopened log continues seq and prev from the last record on disk."""
    log = AuditLog(log_path)
    first = await write_n(log, 3)
    await log.close()
    log = AuditLog(log_path)
    second = await write_n(log, 2, start=3)
    await log.close()
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[3]["prev"] == first[-1]
    result = verify_file(log_path, expected_head=second[-1])
    assert result.ok, result
    assert result.records == 5


async def test_concurrent_writers_form_one_chain(log_path: Path) -> None:
    """Hundreds of concurrent tasks produce a gap-free, valid chain and distinct hashes."""
    log = AuditLog(log_path)
    hashes = await asyncio.gather(*(log.write("burst", {"task": i}) for i in range(300)))
    await log.close()
    recs = records(log_path)
    assert [r["seq"] for r in recs] == list(range(1, 301))
    assert sorted(r["task"] for r in recs) == list(range(300))
    assert set(hashes) == {sha(line) for line in lines_of(log_path)}
    assert verify_file(log_path).ok


async def test_concurrent_writers_share_fsyncs(log_path: Path) -> None:
    """Group commit: concurrent durable writes share fsync rounds, and each returns durable."""
    latencies: list[float] = []
    log = AuditLog(log_path, on_latency=latencies.append)
    await asyncio.gather(*(log.write("burst", {"task": i}) for i in range(200)))
    rounds = log.fsync_rounds
    assert 1 <= rounds < 200
    # Every awaited write had its fsync round finish before it returned.
    assert len(latencies) == 200
    await log.close()
    assert verify_file(log_path).ok


async def test_background_record_is_in_the_file_when_write_returns(log_path: Path) -> None:
    """sync=False: the line is in the file (a crash of the process cannot lose it) at once,
    and the fsync follows in the background."""
    latencies: list[float] = []
    log = AuditLog(log_path, on_latency=latencies.append)
    await log.write("first", {})
    digest = await log.write("task.running", {"task_id": "t"}, sync=False)
    last = lines_of(log_path)[-1]
    assert sha(last) == digest
    assert json.loads(last)["event"] == "task.running"
    await log.close()  # waits for the background fsync
    assert len(latencies) == 2
    assert verify_file(log_path).ok


async def test_cancelled_writers_keep_the_chain_valid(log_path: Path) -> None:
    """Cancelling writers mid-flight never forks or breaks the chain."""
    log = AuditLog(log_path)
    tasks = [asyncio.create_task(log.write("maybe", {"i": i})) for i in range(100)]
    await asyncio.sleep(0)
    for task in tasks[::3]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await log.write("after", {})
    await log.close()
    result = verify_file(log_path)
    assert result.ok, result
    assert records(log_path)[-1]["event"] == "after"


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_the_kernel_runs_the_fsyncs(log_path: Path) -> None:
    """Durable and background records are fsynced through Linux AIO: no thread is started,
    every record reports its fsync, and close releases the AIO context's eventfd."""
    before = open_fds()
    latencies: list[float] = []
    log = AuditLog(log_path, on_latency=latencies.append)
    await log.write("first", {})
    await log.write("task.queued", {"task_id": "t"}, sync=False)
    await asyncio.gather(*(log.write("burst", {"i": i}) for i in range(50)))
    assert log.sync_mode == "aio"
    assert 2 <= log.fsync_rounds < 52
    assert not [t for t in threading.enumerate() if t.name == "audit-fsync"]
    await log.close()
    assert len(latencies) == 52
    assert open_fds() == before
    assert verify_file(log_path).ok


def test_one_log_across_event_loops(log_path: Path) -> None:
    """A log written from one event loop and then from another (the first one closed)
    keeps its chain and its fsyncs go on through the kernel."""
    log = AuditLog(log_path)
    asyncio.run(log.write("one", {}))

    async def second() -> None:
        await log.write("two", {})
        assert log.sync_mode == "aio"
        await log.close()

    asyncio.run(second())
    assert [r["event"] for r in records(log_path)] == ["one", "two"]
    assert verify_file(log_path).ok


def test_a_loop_that_ends_with_records_waiting_strands_nothing(log_path: Path) -> None:
    """An event loop that ends while background records wait for their fsync (or one
    runs) does not hold up the records written from the next loop."""
    log = AuditLog(log_path)

    async def first() -> None:
        await log.write("one", {})
        await log.write("task.queued", {"task_id": "t"}, sync=False)  # waits for company
        await asyncio.sleep(0.006)  # and then has its fsync begin (and, likely, still run)

    asyncio.run(first())

    async def second() -> None:
        await asyncio.wait_for(log.write("two", {}), 10)
        await asyncio.wait_for(log.close(), 10)

    asyncio.run(second())
    assert [r["event"] for r in records(log_path)] == ["one", "task.queued", "two"]
    assert verify_file(log_path).ok


def swap_fd(log: AuditLog, replacement: int) -> None:
    """Put another open file under the log's fd number (what fsync is asked to sync)."""
    state = log._state
    assert state is not None
    os.dup2(replacement, state.fd)
    os.close(replacement)


async def test_a_refused_fsync_round_goes_to_the_thread(log_path: Path) -> None:
    """If the kernel refuses to queue a round's fsync for some other reason than lacking
    AIO (here EBADF: an O_PATH file under the log's fd), the thread fsyncs that round and
    reports what fsync says; the log reopens and AIO goes on."""
    failures: list[int] = []
    log = AuditLog(log_path, on_sync_failure=lambda: failures.append(1))
    await log.write("one", {})
    await log.write("task.queued", {"task_id": "t"}, sync=False)  # its round starts in 5 ms
    swap_fd(log, os.open(log_path, os.O_PATH | os.O_CLOEXEC))
    await until(lambda: failures, timeout_s=2.0)
    assert failures == [1]
    assert log.sync_failures == 1
    await log.write("two", {})
    assert log.sync_mode == "aio"
    await log.close()
    assert [r["event"] for r in records(log_path)] == ["one", "task.queued", "two"]
    assert verify_file(log_path).ok


async def test_a_file_aio_cannot_fsync_hands_over_to_the_thread(log_path: Path) -> None:
    """A file the kernel cannot fsync through AIO (EINVAL: here a pipe under the log's fd)
    hands every later round to the thread, which reports the failed fsync; the log
    reopens and its next records are fsynced by the thread."""
    failures: list[int] = []
    log = AuditLog(log_path, on_sync_failure=lambda: failures.append(1))
    await log.write("one", {})
    await log.write("task.queued", {"task_id": "t"}, sync=False)
    read_end, write_end = os.pipe()
    swap_fd(log, write_end)
    await until(lambda: failures, timeout_s=2.0)
    os.close(read_end)
    assert failures == [1]
    assert log.sync_mode == "thread"
    await log.write("two", {})
    await log.close()
    assert [r["event"] for r in records(log_path)] == ["one", "task.queued", "two"]
    assert verify_file(log_path).ok


FSYNC_BY_THREAD = """
import asyncio, errno, sys, threading
from pathlib import Path
import pyseccomp
filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "io_setup")
filt.load()
from gateway.audit import AuditLog, verify_file

async def main():
    durable = []
    log = AuditLog(Path(sys.argv[1]), on_latency=durable.append)
    await log.write("first", {})
    await log.write("task.queued", {"task_id": "t"}, sync=False)
    await asyncio.gather(*(log.write("burst", {"i": i}) for i in range(20)))
    threads = [t.name for t in threading.enumerate()]
    await log.close()
    print(log.sync_mode, len(durable), "audit-fsync" in threads, verify_file(Path(sys.argv[1])).ok)

asyncio.run(main())
"""


def test_fsyncs_fall_back_to_a_thread_without_aio(log_path: Path) -> None:
    """Where the kernel refuses an AIO context (here a seccomp filter makes io_setup fail
    with ENOSYS) a thread runs the fsyncs: every record is fsynced and the chain holds."""
    proc = subprocess.run(
        [sys.executable, "-c", FSYNC_BY_THREAD, str(log_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    *logged, result = proc.stdout.splitlines()
    assert result.split() == ["thread", "22", "True", "True"]
    assert "audit fsyncs go to a thread" in "\n".join(logged) + proc.stderr


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"token": "t0p-s3cret"}, {"token": REDACTED}),
        ({"Authorization": "Bearer abc"}, {"Authorization": REDACTED}),
        (
            {"user": {"password": "pw", "name": "bob"}},
            {"user": {"password": REDACTED, "name": "bob"}},
        ),
        ({"args": ["login", "password=hunter2"]}, {"args": ["login", REDACTED]}),
        ({"cmd": "run --key sk-live-1234 now"}, {"cmd": f"run --key {REDACTED} now"}),
    ],
)
async def test_redaction_on_disk(
    log_path: Path, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Secrets never reach the file: secret-named keys and configured patterns are redacted."""
    log = AuditLog(log_path, redact=[r"password=\S+", r"sk-live-\w+"])
    await log.write("redact.test", fields)
    await log.close()
    text = read_bytes(log_path)
    for secret in (b"t0p-s3cret", b"Bearer abc", b"hunter2", b"sk-live-1234", b'"pw"'):
        assert secret not in text
    (record,) = records(log_path)
    assert {k: v for k, v in record.items() if k not in ("seq", "ts", "event", "prev")} == expected


async def test_reserved_fields_rejected_and_nothing_written(log_path: Path) -> None:
    """A reserved field name is InvalidArgument and writes nothing."""
    log = AuditLog(log_path)
    with pytest.raises(InvalidArgument):
        await log.write("e", {"seq": 99})
    await log.close()
    assert not exists(log_path)


async def test_closed_log_refuses_writes(log_path: Path) -> None:
    """After close, write fails with FailedPrecondition; close is idempotent."""
    log = AuditLog(log_path)
    await log.write("e", {})
    await log.close()
    await log.close()
    with pytest.raises(FailedPrecondition):
        await log.write("e", {})


async def test_second_writer_is_refused(log_path: Path) -> None:
    """A second writer on the same file is Unavailable while the first holds it (flock)."""
    first = AuditLog(log_path)
    await first.write("one", {})
    second = AuditLog(log_path)
    with pytest.raises(Unavailable, match="another writer"):
        await second.write("two", {})
    await first.close()
    await second.write("two", {})
    await second.close()
    assert [r["event"] for r in records(log_path)] == ["one", "two"]
    assert verify_file(log_path).ok


# -- torn tails --------------------------------------------------------------------


async def test_torn_tail_is_recovered(log_path: Path) -> None:
    """A torn last line is kept; an audit.recovered record links past it to the last good one."""
    log = AuditLog(log_path)
    hashes = await write_n(log, 3)
    await log.close()
    torn = b'{"seq":4,"ts":"2024-01-01T00:00'
    append_bytes(log_path, torn)
    broken = verify_file(log_path)
    assert (broken.ok, broken.first_bad_line) == (False, 4)
    assert broken.reason is not None
    assert "not yet recovered" in broken.reason

    log = AuditLog(log_path)
    last = await log.write("after.crash", {})
    await log.close()
    raw = lines_of(log_path)
    assert raw[3] == torn
    recovery = json.loads(raw[4])
    assert recovery["event"] == RECOVERED_EVENT
    assert recovery["seq"] == 4
    assert recovery["prev"] == hashes[-1]
    assert recovery["torn"] == [{"bytes": len(torn), "sha256": sha(torn)}]
    assert json.loads(raw[5])["seq"] == 5
    result = verify_file(log_path, expected_head=last)
    assert result.ok, result
    assert result.records == 5


async def test_torn_recovery_itself_torn(log_path: Path) -> None:
    """A crash during recovery leaves two torn lines; the next open recovers both at once."""
    log = AuditLog(log_path)
    await write_n(log, 2)
    await log.close()
    append_bytes(
        log_path,
        b'{"seq":3,"t' + b'\n{"seq":3,"ts":"2024-01-01T00:00:00.000000Z","event":"audit.re',
    )
    log = AuditLog(log_path)
    await log.write("after", {})
    await log.close()
    recs = [json.loads(line) for line in lines_of(log_path)[4:]]
    assert recs[0]["event"] == RECOVERED_EVENT
    assert len(recs[0]["torn"]) == 2
    assert verify_file(log_path).ok


async def test_complete_record_missing_newline(log_path: Path) -> None:
    """A record that lost only its newline stays valid: the writer just adds the newline."""
    log = AuditLog(log_path)
    await write_n(log, 2)
    await log.close()
    write_bytes(log_path, read_bytes(log_path)[:-1])
    log = AuditLog(log_path)
    await log.write("after", {})
    await log.close()
    assert [r["event"] for r in records(log_path)] == ["test.event", "test.event", "after"]
    assert verify_file(log_path).ok


async def test_torn_first_write(log_path: Path) -> None:
    """A file holding only a torn fragment recovers from the genesis hash."""
    write_bytes(log_path, b'{"seq":1,"ts":"20')
    log = AuditLog(log_path)
    await log.write("after", {})
    await log.close()
    recs = [json.loads(line) for line in lines_of(log_path)[1:]]
    assert (recs[0]["event"], recs[0]["seq"], recs[0]["prev"]) == (RECOVERED_EVENT, 1, GENESIS)
    assert verify_file(log_path).ok


async def test_recovery_record_is_not_redacted(log_path: Path) -> None:
    """Redaction patterns never touch the recovery record, so it always verifies."""
    write_bytes(log_path, b"{torn")
    log = AuditLog(log_path, redact=[r"[0-9a-f]{8,}", r"\d+"])
    await log.write("after", {})
    await log.close()
    assert verify_file(log_path).ok


async def test_corrupt_last_record_fails_closed(log_path: Path) -> None:
    """A last line that is JSON but not a record stops the writer (Internal), appending nothing."""
    log = AuditLog(log_path)
    await write_n(log, 2)
    await log.close()
    append_bytes(log_path, b'{"hello":"world"}\n')
    before = read_bytes(log_path)
    log = AuditLog(log_path)
    with pytest.raises(Internal, match="corrupt"):
        await log.write("e", {})
    await log.close()
    assert read_bytes(log_path) == before


async def test_long_garbage_tail_is_read_back_far_enough(log_path: Path) -> None:
    """A torn tail longer than the first read window is still found and described."""
    log = AuditLog(log_path)
    await write_n(log, 2)
    await log.close()
    torn = b'{"seq":3,"big":"' + b"x" * 300_000
    append_bytes(log_path, torn)
    log = AuditLog(log_path)
    await log.write("after", {})
    await log.close()
    assert json.loads(lines_of(log_path)[3])["torn"][0]["bytes"] == len(torn)
    assert verify_file(log_path).ok


# -- failures and side channels ---------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_disk_full_is_resource_exhausted() -> None:
    """ENOSPC on write surfaces as ResourceExhausted, not a raw OSError."""
    log = AuditLog(Path("/dev/full"))
    with pytest.raises(ResourceExhausted):
        await log.write("e", {})
    await log.close()


async def test_unwritable_location_is_internal(tmp_path: Path) -> None:
    """A log path whose directory is missing fails with Internal and no host path in the message."""
    log = AuditLog(tmp_path / "missing" / "audit.log")
    with pytest.raises(Internal) as info:
        await log.write("e", {})
    assert str(tmp_path) not in info.value.message
    await log.close()


async def test_latency_callback_errors_do_not_fail_writes(log_path: Path) -> None:
    """A broken on_latency callback never turns a durable write into an error."""

    def broken(seconds: float) -> None:
        raise RuntimeError("metrics down")

    log = AuditLog(log_path, on_latency=broken)
    await log.write("e", {})
    await log.close()
    assert verify_file(log_path).ok


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket standing in for journald's native socket."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fsencode(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


async def test_journald_receives_each_record(
    log_path: Path, journal: tuple[Path, socket.socket]
) -> None:
    """With also_journald, every record is also sent as a native journald datagram."""
    path, sock = journal
    log = AuditLog(log_path, also_journald=True, journald_socket=path)
    digest = await log.write("hello", {"n": 1})
    await log.close()
    datagram = sock.recv(65536)
    (line,) = lines_of(log_path)
    assert datagram.startswith(b"MESSAGE=" + line + b"\n")
    assert b"SYSLOG_IDENTIFIER=mcp-gateway-audit\n" in datagram
    assert f"MCP_AUDIT_HASH={digest}\n".encode() in datagram
    assert log.journald_failures == 0


async def test_journald_unreachable_never_fails(
    log_path: Path, journal: tuple[Path, socket.socket]
) -> None:
    """A journald socket nobody listens on, or no socket at all, never fails or blocks writes."""
    path, sock = journal
    log = AuditLog(log_path, also_journald=True, journald_socket=path)
    await log.write("one", {})
    sock.close()  # journald went away: the socket file stays, nobody receives
    await log.write("two", {})
    await log.close()
    assert log.journald_failures == 1
    missing = AuditLog(
        log_path.with_name("b.log"), also_journald=True, journald_socket=path.with_name("none")
    )
    await missing.write("three", {})
    await missing.close()
    assert verify_file(log_path).ok
