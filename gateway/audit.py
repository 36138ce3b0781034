"""Tamper-evident audit log: hash-chained JSON lines, fsynced by group commit.

Record format
-------------
One JSON object per line (UTF-8, in fact pure ASCII: ``ensure_ascii``),
rendered by structlog's :class:`~structlog.processors.JSONRenderer` with
compact separators, keys in this order::

    {"seq":7,"ts":"2024-05-01T12:00:00.123456Z","event":"file.written",
     ...caller's fields...,"prev":"<64 hex>"}

* ``seq`` counts records from 1 in each file and continues across restarts.
* ``trace_id`` (a caller's field, added by :meth:`AuditLog.write` when the
  record is written inside a traced request and the caller gave none): the
  W3C trace id of the request, so a record leads to its trace.
* ``ts`` is RFC 3339 UTC with microseconds, from the injected clock.
* ``prev`` is the hex SHA-256 of the previous record's line, exact bytes
  without the newline.  The first record's ``prev`` is :data:`GENESIS`, the
  SHA-256 of the empty string.  The hash of a record (what
  :meth:`AuditLog.write` returns) is the SHA-256 of its own line, so each
  record commits to the whole history before it.  Nothing is added to a line
  after it is hashed.

Keep a record hash somewhere else (the journald copy, a ticket, another
host) and :func:`verify_lines` with ``expected_head`` also detects records
cut off the end; without such an anchor, a hash chain cannot tell a cleanly
truncated log, or one rewritten from some point on, from an honest one.

Torn writes
-----------
A crash can leave the last line incomplete (no newline).  The writer never
truncates the log: on open it keeps the torn bytes, terminates them with a
newline, and appends an ``audit.recovered`` record whose ``prev`` links to
the last *complete record* and whose ``torn`` field lists ``{"bytes": n,
"sha256": h}`` for each unparseable line in between (more than one only if
the recovery itself was torn by a second crash).  :func:`verify_lines`
accepts exactly that: lines that are not JSON objects only when immediately
followed by a matching ``audit.recovered`` record; a recovery record without
torn lines is itself an error.  A torn fragment can never parse as a JSON
object (its closing brace is the line's last byte), so a line that *does*
parse is always checked as a full record.  A complete record that merely
lost its newline is valid as it is; the writer just adds the newline.

Redaction
---------
Values under keys that look like credentials (``token``, ``password``,
``secret``, ``authorization``, ...; any depth, case-insensitive, substring)
become ``[REDACTED]`` entirely; every string in the caller's fields (nested
in lists and mappings too) has each match of the configured patterns
replaced by ``[REDACTED]``.  ``seq``/``ts``/``event``/``prev`` are ours and
never redacted; callers may not use those names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
from structlog.processors import JSONRenderer
from structlog.typing import EventDict, WrappedLogger

from gateway.aiofsync import UNSUPPORTED, AioContext
from gateway.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    McpError,
    ResourceExhausted,
    Unavailable,
)
from gateway.tracing import Tracing, current_trace_ids

__all__ = [
    "GENESIS",
    "JOURNALD_SOCKET",
    "RECOVERED_EVENT",
    "REDACTED",
    "RESERVED_FIELDS",
    "AuditLog",
    "AuditSink",
    "RecordFormatter",
    "TailPlan",
    "VerifyResult",
    "check_fields",
    "format_ts",
    "journald_datagram",
    "plan_tail",
    "record_hash",
    "verify_file",
    "verify_lines",
]

#: ``prev`` of the first record: SHA-256 of the empty string.
GENESIS = hashlib.sha256(b"").hexdigest()
RECOVERED_EVENT = "audit.recovered"
REDACTED = "[REDACTED]"
RESERVED_FIELDS = frozenset({"seq", "ts", "event", "prev"})
JOURNALD_SOCKET = Path("/run/systemd/journal/socket")
SYSLOG_IDENTIFIER = "mcp-gateway-audit"

_SECRET_KEY = re.compile(
    r"token|passw(?:or)?d|secret|authorization|api[_-]?key|cookie|credential|private[_-]?key",
    re.IGNORECASE,
)
_TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAIL_WINDOW = 64 * 1024

log = structlog.get_logger("gateway.audit")


# --------------------------------------------------------------------------
# Pure: hashing, rendering, redaction
# --------------------------------------------------------------------------


def record_hash(line: bytes) -> str:
    """Hex SHA-256 of one record line (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def format_ts(seconds: float) -> str:
    """RFC 3339 UTC with microseconds: ``2024-05-01T12:00:00.123456Z``."""
    micros = round(seconds * 1_000_000)
    whole, fraction = divmod(micros, 1_000_000)
    return f"{_second_prefix(whole)}.{fraction:06d}Z"


@functools.lru_cache(maxsize=4)
def _second_prefix(whole: int) -> str:
    # Records of one second share this: formatting a date is the slow part.
    moment = datetime.datetime.fromtimestamp(whole, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class _Redactor:
    """structlog processor: redacts the caller's fields (never the reserved ones)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        compiled: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise InvalidArgument(
                    f"invalid redaction pattern {pattern!r}: {exc}", field="redact"
                ) from exc
        self._patterns = tuple(compiled)
        self._secret_keys: dict[str, bool] = {}

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        return {
            key: value if key in RESERVED_FIELDS else self._field(key, value)
            for key, value in event_dict.items()
        }

    def _field(self, key: str, value: object) -> object:
        secret = self._secret_keys.get(key)
        if secret is None:
            secret = _SECRET_KEY.search(key) is not None
            if len(self._secret_keys) < 4096:  # field names repeat; values do not
                self._secret_keys[key] = secret
        if secret:
            return REDACTED
        return self._value(value)

    def _value(self, value: object) -> object:
        if isinstance(value, str):
            for pattern in self._patterns:
                value = pattern.sub(REDACTED, value)
            return value
        if isinstance(value, Mapping):
            return {str(k): self._field(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        return value


def _jsonable(value: object) -> object:
    """Plain JSON types only, deterministically (sets sorted, NaN as text)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


class RecordFormatter:
    """Renders one record line; pure apart from reading the injected clock.

    The processors are structlog's protocol (``logger, method, event_dict``):
    a timestamper using ``clock``, the redactor, then ``JSONRenderer``.
    """

    def __init__(
        self, *, redact: Sequence[str] = (), clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._redactor = _Redactor(redact)
        self._renderer = JSONRenderer(
            separators=(",", ":"), ensure_ascii=True, allow_nan=False, sort_keys=False
        )

    def _stamp(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        seq = event_dict.pop("seq")
        return {"seq": seq, "ts": format_ts(self._clock()), **event_dict}

    def render(
        self,
        seq: int,
        event: str,
        fields: Mapping[str, object],
        prev: str,
        *,
        redact: bool = True,
    ) -> bytes:
        """The record's line (no newline).  Raises InvalidArgument for reserved keys."""
        check_fields(event, fields)
        event_dict: EventDict = {"seq": seq, "event": event}
        event_dict.update({key: _jsonable(value) for key, value in fields.items()})
        event_dict["prev"] = prev
        event_dict = self._stamp(None, "audit", event_dict)
        if redact:
            event_dict = self._redactor(None, "audit", event_dict)
        rendered = self._renderer(None, "audit", event_dict)
        return rendered.encode("ascii") if isinstance(rendered, str) else rendered


def check_fields(event: str, fields: Mapping[str, object]) -> None:
    """Caller input rules: a non-empty event name, str keys, no reserved key."""
    if not isinstance(event, str) or not event:
        raise InvalidArgument("audit event must be a non-empty string", field="event")
    for key in fields:
        if not isinstance(key, str):
            raise InvalidArgument("audit field names must be strings", field=str(key))
        if key in RESERVED_FIELDS:
            raise InvalidArgument(f"audit field name {key!r} is reserved", field=key)


def journald_datagram(message: bytes, *, seq: int, digest: str) -> bytes:
    """One journald native-protocol datagram (systemd: "Native Journal Protocol").

    ``KEY=value\\n`` per field; a value containing a newline is sent as
    ``KEY\\n`` + little-endian u64 length + value + ``\\n``.
    """
    fields = (
        (b"MESSAGE", message),
        (b"SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.encode()),
        (b"PRIORITY", b"6"),
        (b"MCP_AUDIT_SEQ", str(seq).encode()),
        (b"MCP_AUDIT_HASH", digest.encode()),
    )
    out = bytearray()
    for key, value in fields:
        if b"\n" in value:
            out += key + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += key + b"=" + value + b"\n"
    return bytes(out)


# --------------------------------------------------------------------------
# Pure: parsing, tail planning, verification
# --------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_object(line: bytes) -> dict[str, Any] | None:
    """The line as a JSON object, or None if it is not one (torn or garbage)."""
    try:
        obj = json.loads(line, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _record_problem(obj: Mapping[str, Any], expected_seq: int, prev: str) -> str | None:
    """Why ``obj`` is not the record that must come next, or None if it is."""
    seq = obj.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int):
        return "missing or non-integer seq"
    ts = obj.get("ts")
    if not isinstance(ts, str) or _TS_RE.fullmatch(ts) is None:
        return "missing or malformed ts"
    event = obj.get("event")
    if not isinstance(event, str) or not event:
        return "missing event"
    link = obj.get("prev")
    if not isinstance(link, str) or _HEX64.fullmatch(link) is None:
        return "missing or malformed prev"
    if seq != expected_seq:
        return f"seq {seq} where {expected_seq} was expected (records missing or reordered)"
    if link != prev:
        return "prev does not match the hash of the previous record (edited, removed or inserted)"
    return None


def _torn_descriptions(torn: Iterable[bytes]) -> list[dict[str, object]]:
    return [{"bytes": len(line), "sha256": record_hash(line)} for line in torn]


@dataclasses.dataclass(frozen=True, slots=True)
class TailPlan:
    """What the writer must do on open, decided from the file's tail.

    ``seq``/``head``: the last complete record's seq and line hash (0 and
    :data:`GENESIS` if none).  ``torn``: unparseable lines after it, to be
    described by an ``audit.recovered`` record.  ``needs_newline``: the file
    does not end with a newline.
    """

    seq: int
    head: str
    torn: tuple[bytes, ...]
    needs_newline: bool


def plan_tail(data: bytes, *, at_start: bool) -> TailPlan | None:
    """Decide how to continue a log whose last bytes are ``data``.

    ``at_start`` says ``data`` begins at offset 0; otherwise its first line
    may be partial and is not trusted, and None means "give me more bytes"
    (no complete record found yet).  Raises Internal when the last line that
    parses as JSON is not a valid record: the log is corrupt, not torn, and
    writing on would only hide that (fail closed; run ``verify``).
    """
    lines = data.split(b"\n")
    needs_newline = data != b"" and not data.endswith(b"\n")
    if not needs_newline:
        lines.pop()  # the empty string after the final newline (or of b"")
    first = 0 if at_start else 1
    for index in range(len(lines) - 1, first - 1, -1):
        obj = _parse_object(lines[index])
        if obj is None:
            continue
        seq = obj.get("seq")
        if (
            isinstance(seq, bool)
            or not isinstance(seq, int)
            or seq < 1
            or not isinstance(obj.get("prev"), str)
        ):
            raise Internal(
                "the audit log is corrupt: its last record is not a valid audit record; "
                "run 'mcp-gateway audit verify'"
            )
        return TailPlan(seq, record_hash(lines[index]), tuple(lines[index + 1 :]), needs_newline)
    if not at_start:
        return None
    return TailPlan(0, GENESIS, tuple(lines), needs_newline)


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify_lines`.

    ``records``: valid records seen (up to the first problem).
    ``first_bad_line``: 1-based line number of the first problem, None if ok
    (or if the file could not be read at all).  ``head``/``last_seq``: hash
    and seq of the last valid record.
    """

    ok: bool
    records: int
    first_bad_line: int | None = None
    reason: str | None = None
    head: str = GENESIS
    last_seq: int = 0


def verify_lines(lines: Iterable[bytes], *, expected_head: str | None = None) -> VerifyResult:
    """Check a whole log, given as its lines (one trailing ``\\n`` each is ignored).

    Detects edited, deleted, reordered and inserted records, seq gaps,
    malformed lines and unrecovered torn writes; accepts the documented
    ``audit.recovered`` records (see the module docstring) and nothing else.
    With ``expected_head`` (a record hash kept elsewhere) the log must also
    end with that record, which catches records cut off the end.  Pure.
    """
    records = 0
    expected_seq = 1
    prev = GENESIS
    pending: list[tuple[int, bytes]] = []
    lineno = 0

    def bad(line: int | None, reason: str) -> VerifyResult:
        return VerifyResult(False, records, line, reason, prev, expected_seq - 1)

    for lineno, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith(b"\n") else raw
        obj = _parse_object(line)
        if obj is None:
            pending.append((lineno, line))
            continue
        recovery = obj.get("event") == RECOVERED_EVENT
        if pending and not recovery:
            return bad(
                pending[0][0],
                "line is not a JSON object (malformed, or a torn write with no recovery record)",
            )
        problem = _record_problem(obj, expected_seq, prev)
        if problem is not None:
            return bad(lineno, problem)
        if recovery:
            if not pending:
                return bad(lineno, "audit.recovered record without torn lines before it")
            if obj.get("torn") != _torn_descriptions(line for _, line in pending):
                return bad(lineno, "audit.recovered record does not match the torn lines")
            pending.clear()
        records += 1
        expected_seq += 1
        prev = record_hash(line)
    if pending:
        return bad(
            pending[0][0], "torn or malformed line at the end of the log (not yet recovered)"
        )
    if expected_head is not None and prev != expected_head:
        return bad(lineno + 1, "the log does not end with the expected record (truncated?)")
    return VerifyResult(True, records, None, None, prev, expected_seq - 1)


def verify_file(path: Path, *, expected_head: str | None = None) -> VerifyResult:
    """:func:`verify_lines` over a file, streamed (blocking I/O).

    A file that cannot be read gives ``ok=False`` with ``first_bad_line``
    None and the reason.
    """
    try:
        with open(path, "rb") as handle:
            return verify_lines(handle, expected_head=expected_head)
    except OSError as exc:
        return VerifyResult(False, 0, None, f"cannot read the audit log: {exc.strerror}")


# --------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where audit records go."""

    async def write(self, event: str, fields: Mapping[str, object], *, sync: bool = True) -> str:
        """Record ``event`` with ``fields``; return the record's hash.

        The record is in the log when this returns.  With ``sync`` it is
        also durable (fsynced); without, it becomes durable shortly after,
        in the background.
        """
        ...

    async def append(
        self, event: str, fields: Mapping[str, object]
    ) -> tuple[str, asyncio.Future[None]]:
        """Record now; return the hash and a future that ends once the record is durable."""
        ...

    async def close(self) -> None:
        """Flush and release; later writes fail."""
        ...


@dataclasses.dataclass(eq=False, slots=True)
class _Open:
    """The open file and the chain head (owned by the event-loop thread)."""

    fd: int
    seq: int
    head: str
    journal: socket.socket | None
    closed: bool = False
    # A background ticket is queued and its fsync has not begun: later
    # background records are covered by it and need no ticket of their own.
    background_queued: bool = False


@dataclasses.dataclass(eq=False, slots=True)
class _Ticket:
    """One record (or a close) waiting for its fsync round."""

    state: _Open
    loop: asyncio.AbstractEventLoop
    started: float
    done: asyncio.Future[None] | None  # None: nobody waits (a background record)
    close: bool = False

    @property
    def awaited(self) -> bool:
        """Somebody waits for it (a durable record or a close): its round starts now."""
        return self.done is not None or self.close


def _round_files(batch: list[_Ticket]) -> list[_Open]:
    """Begin a fsync round of ``batch``: the open files to fsync, each once."""
    for ticket in batch:
        # Records appended from here on need a ticket of their own: this
        # round's fsync may begin before they are written.
        ticket.state.background_queued = False
    return [state for state in {id(t.state): t.state for t in batch}.values() if not state.closed]


def _close_after_round(batch: list[_Ticket]) -> None:
    """End a fsync round of ``batch``: close the files its close tickets are for."""
    for ticket in batch:
        if ticket.close and not ticket.state.closed:
            ticket.state.closed = True
            _close_quietly(ticket.state)


class _Syncer:
    """Group commit: one thread fsyncs for every record appended since its last fsync.

    Records are appended on the event loop; each one queues a ticket here.
    The thread takes all queued tickets, fsyncs each file once and hands
    the results back to the tickets' loops, so concurrent writers share one
    fsync instead of queueing for one each.  A close ticket fsyncs and then
    closes its file (after every record queued before it).  The thread
    exits after :data:`_SYNCER_IDLE_S` without work and starts again on demand.
    """

    def __init__(self, complete: Callable[[list[_Ticket], dict[int, OSError]], None]) -> None:
        self._complete = complete
        self._jobs: queue.SimpleQueue[_Ticket] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self.rounds = 0  # fsync rounds so far (one per batch of tickets)

    def submit(self, ticket: _Ticket) -> None:
        self._jobs.put(ticket)
        with self._lock:
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name="audit-fsync", daemon=True).start()

    def _next_batch(self) -> list[_Ticket] | None:
        """Every queued ticket (waiting for the first), or None once idle for long."""
        try:
            batch = [self._jobs.get(timeout=_SYNCER_IDLE_S)]
        except queue.Empty:
            with self._lock:
                if self._jobs.empty():
                    self._running = False
                    return None
            return []
        deadline = time.monotonic() + _BACKGROUND_GRACE_S
        while True:
            try:
                batch.append(self._jobs.get_nowait())
                continue
            except queue.Empty:
                pass
            # Nobody waits for these records: give the next ones a moment to
            # share the fsync (a durable write ends the wait at once).
            left = deadline - time.monotonic()
            if left <= 0 or any(t.awaited for t in batch):
                return batch
            try:
                batch.append(self._jobs.get(timeout=left))
            except queue.Empty:
                return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.rounds += 1
            errors: dict[int, OSError] = {}
            for state in _round_files(batch):
                try:
                    os.fsync(state.fd)
                except OSError as exc:
                    errors[id(state)] = exc
            _close_after_round(batch)
            by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[_Ticket]]] = {}
            for ticket in batch:
                by_loop.setdefault(id(ticket.loop), (ticket.loop, []))[1].append(ticket)
            for loop, tickets in by_loop.values():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(self._complete, tickets, errors)


class _AioSyncer:
    """Group commit on the event loop: the kernel runs the fsyncs (Linux AIO).

    The same contract as :class:`_Syncer` (tickets in, ``complete(tickets,
    errors)`` called on the tickets' loop, a close ticket closes its file
    after its fsync), without a thread: a round fsyncs each file of its
    tickets once through :class:`~gateway.aiofsync.AioContext`, whose
    eventfd the loop watches.  Tickets that come while a round runs form
    the next one; a round of background tickets waits up to
    :data:`_BACKGROUND_GRACE_S` for company, as the thread does.

    The thread takes over (``fallback``) where the kernel refuses: no AIO
    context (an old kernel, a seccomp filter), or a filesystem that cannot
    fsync through it (the round is then fsynced again by the thread).  It
    also takes the tickets of a second event loop while the first one still
    has a round going.
    """

    def __init__(
        self,
        complete: Callable[[list[_Ticket], dict[int, OSError]], None],
        fallback: _Syncer,
    ) -> None:
        self._complete = complete
        self._fallback = fallback
        self._aio: AioContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._disabled = False
        self._pending: list[_Ticket] = []
        self._round: list[_Ticket] | None = None
        self._inflight: dict[int, _Open] = {}  # token -> file being fsynced
        self._errors: dict[int, OSError] = {}
        self._grace: asyncio.TimerHandle | None = None
        self._tokens = 0
        self._rounds = 0

    @property
    def rounds(self) -> int:
        return self._rounds + self._fallback.rounds

    @property
    def mode(self) -> str:
        """``aio`` while the kernel runs the fsyncs, ``thread`` once the thread has taken over."""
        return "thread" if self._disabled else "aio"

    def submit(self, ticket: _Ticket) -> None:
        if self._disabled or not self._bind(ticket.loop):
            self._fallback.submit(ticket)
            return
        self._pending.append(ticket)
        self._schedule()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Watch the eventfd on ``loop`` (making the AIO context first); False: use the thread."""
        if loop is self._loop:
            return True
        if self._loop is not None and not self._loop.is_closed():
            if self._round is not None or self._pending or self._loop.is_running():
                return False
            self._loop.remove_reader(self._aio.eventfd)  # type: ignore[union-attr]
        elif self._loop is not None:
            # That loop ended with a round going or records waiting for one:
            # nobody waits for them any more.  An fsync already submitted
            # still runs; the records waiting are in the file, and the next
            # round's fsync of it covers them.
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self._round, self._pending, self._inflight, self._errors = None, [], {}, {}
        self._loop = None
        if self._aio is None:
            try:
                self._aio = AioContext()
            except OSError as exc:
                self._disable(f"no AIO context: {exc}")
                return False
        loop.add_reader(self._aio.eventfd, self._ready)
        self._loop = loop
        return True

    def _disable(self, why: str) -> None:
        if not self._disabled:
            self._disabled = True
            log.info("audit fsyncs go to a thread", reason=why)

    def _schedule(self) -> None:
        if self._round is not None or not self._pending or self._loop is None:
            return
        if any(t.awaited for t in self._pending):
            self._start()
        elif self._grace is None:
            # Nobody waits for these records: give the next ones a moment to share the fsync.
            self._grace = self._loop.call_later(_BACKGROUND_GRACE_S, self._start)

    def _start(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._round is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._round, self._errors, self._inflight = batch, {}, {}
        self._rounds += 1
        assert self._aio is not None  # noqa: S101 - bound before any ticket is queued
        for state in _round_files(batch):
            self._tokens += 1
            try:
                self._aio.submit_fsync(state.fd, self._tokens)
            except OSError as exc:
                if exc.errno in UNSUPPORTED:
                    self._hand_over(f"io_submit: {exc}")
                else:
                    # Out of AIO resources for now (EAGAIN), or worse: the
                    # thread fsyncs this round (and reports what fsync says).
                    self._round_to_thread()
                return
            self._inflight[self._tokens] = state
        if not self._inflight:
            self._finish()

    def _ready(self) -> None:
        """The eventfd is readable: collect the ended fsyncs; finish the round once all have."""
        assert self._aio is not None  # noqa: S101 - the reader exists only with a context
        unsupported = False
        for token, result in self._aio.completions():
            state = self._inflight.pop(token, None)
            if state is None or result >= 0:
                continue
            if -result in UNSUPPORTED:
                unsupported = True
            else:
                self._errors[id(state)] = OSError(-result, os.strerror(-result))
        if unsupported:
            self._hand_over("this filesystem cannot fsync through AIO")
        elif self._round is not None and not self._inflight:
            self._finish()

    def _hand_over(self, why: str) -> None:
        """The kernel refused: this round and every later ticket go to the thread."""
        self._disable(why)
        batch, self._round = self._round or [], None
        self._inflight = {}
        for ticket in [*batch, *self._pending]:
            self._fallback.submit(ticket)
        self._pending = []
        self._unbind()

    def _round_to_thread(self) -> None:
        """This round goes to the thread (fsyncs of it already submitted end unheard)."""
        batch, self._round = self._round or [], None
        self._inflight, self._errors = {}, {}
        for ticket in batch:
            self._fallback.submit(ticket)
        self._schedule()

    def _finish(self) -> None:
        batch, errors = self._round or [], self._errors
        self._round, self._errors = None, {}
        _close_after_round(batch)
        self._complete(batch, errors)
        if any(t.close for t in batch) and self._round is None and not self._pending:
            self._unbind()  # the log is closed: nothing more comes
        else:
            self._schedule()

    def _unbind(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._aio is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._aio.eventfd)
        self._loop = None
        self._aio.close()
        self._aio = None


# How long the fsync thread lingers without work before it exits.
_SYNCER_IDLE_S = 5.0
# How long records nobody waits for (task transitions) may wait for company
# before they are fsynced on their own.
_BACKGROUND_GRACE_S = 0.005


class AuditLog(AuditSink):
    """The hash-chained JSON-lines log at ``path`` (see the module docstring).

    The file is opened lazily by the first :meth:`write` (mode 0o600,
    ``O_APPEND``) and locked with ``flock(LOCK_EX)`` so a second writer,
    which would fork the chain, fails with Unavailable instead.

    A write renders the record and ``os.write``-s the whole line on the
    event loop, with no await in between, so records are chained in call
    order and a process crash (even ``kill -9``) loses none that a caller
    saw written.  Durability is group-committed: one fsync for every record
    appended since the previous one, run by the kernel through Linux AIO
    and reported on an eventfd the loop watches (see :class:`_AioSyncer`),
    or by a dedicated thread where the kernel refuses (:class:`_Syncer`).
    ``write(..., sync=True)`` (the default) returns only
    once its record is fsynced; ``sync=False`` returns once the record is
    in the file and lets the fsync happen in the background (task
    transitions: only power loss could drop them, and the decision that
    allowed the task is always fsynced first).

    ``on_latency(seconds)`` receives, for each record, the time from its
    append until it was fsynced, except for background records appended
    while an earlier one still waits for its fsync: they ride on that
    one's fsync and its measurement; it must not raise (if it does, the
    exception is ignored: the record is already durable).  With
    ``also_journald`` and an existing ``journald_socket`` each record is
    also sent, non-blocking and best-effort, as a journald native
    datagram; failures are only counted (:attr:`journald_failures`).  If a
    write or an fsync fails the file is closed and reopened (and any torn
    tail recovered) before the next record; background records whose
    fsync failed are counted in :attr:`sync_failures` (once per failed
    fsync) and reported to ``on_sync_failure()``.
    """

    def __init__(
        self,
        path: Path,
        *,
        redact: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        also_journald: bool = False,
        on_latency: Callable[[float], object] | None = None,
        on_sync_failure: Callable[[], object] | None = None,
        journald_socket: Path = JOURNALD_SOCKET,
        tracing: Tracing | None = None,
    ) -> None:
        self._path = Path(path)
        self._tracing = tracing or Tracing()
        self._formatter = RecordFormatter(redact=redact, clock=clock)
        self._also_journald = also_journald
        self._journald_socket = journald_socket
        self._on_latency = on_latency
        self._on_sync_failure = on_sync_failure
        self._open_lock = asyncio.Lock()
        self._state: _Open | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closed = False
        self._syncer = _AioSyncer(self._synced, _Syncer(self._synced))
        self.journald_failures = 0
        self.sync_failures = 0

    @property
    def path(self) -> Path:
        return self._path

    @property
    def sync_mode(self) -> str:
        """Who runs the fsyncs: ``aio`` (the kernel) or ``thread`` (the fallback)."""
        return self._syncer.mode

    @property
    def fsync_rounds(self) -> int:
        """How many group fsyncs ran so far (each covers every record appended before it)."""
        return self._syncer.rounds

    async def write(self, event: str, fields: Mapping[str, object], *, sync: bool = True) -> str:
        """Append one record and return its hash (hex SHA-256 of the line).

        With ``sync`` (the default) the record is fsynced before this
        returns.  Raises InvalidArgument for a bad event name or a reserved
        field name, FailedPrecondition after :meth:`close`, Unavailable if
        another writer holds the file, ResourceExhausted when the disk is
        full, Internal for other I/O failures or a corrupt log.
        """
        durable = asyncio.get_running_loop().create_future() if sync else None
        digest = await self._append(event, fields, durable)
        if durable is not None:
            # Shielded: a cancelled caller leaves the record to be synced.
            await asyncio.shield(durable)
        return digest

    async def append(
        self, event: str, fields: Mapping[str, object]
    ) -> tuple[str, asyncio.Future[None]]:
        """Append one record now; return its hash and a future that ends when it is fsynced.

        For work that must not *start* before its record is durable but can
        be prepared meanwhile (the sandbox is set up while the decision
        record is fsynced).  The future raises the write's McpError if the
        fsync fails.  Raises like :meth:`write` when the append itself fails.
        """
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        return await self._append(event, fields, durable), durable

    async def _append(
        self, event: str, fields: Mapping[str, object], durable: asyncio.Future[None] | None
    ) -> str:
        """Append the record; ``durable`` (if any) ends once it is fsynced."""
        check_fields(event, fields)
        ids = current_trace_ids()
        if ids and "trace_id" not in fields:
            # The trace of the request this record belongs to: an auditor can
            # jump from the record to its trace (and back, by trace id).
            fields = {**fields, "trace_id": ids["trace_id"]}
        with self._tracing.span("audit.write", attributes={"mcp.audit.event": event}):
            state = self._state if self._state is not None else await self._ensure_open()
            # From here to the append nothing awaits: the chain is in call order.
            line = self._formatter.render(state.seq + 1, event, fields, state.head)
            try:
                _write_all(state.fd, line + b"\n")
            except McpError:
                # Part of the line may have reached the file: reopen (and
                # recover the torn tail) before the next record.
                self._retire(state)
                raise
            state.seq += 1
            state.head = digest = record_hash(line)
            self._send_journald(state, line)
            if durable is not None or not state.background_queued:
                if durable is None:
                    state.background_queued = True
                ticket = _Ticket(state, asyncio.get_running_loop(), time.perf_counter(), durable)
                self._syncer.submit(ticket)
        return digest

    async def close(self) -> None:
        """Fsync and close the file (releasing the lock); idempotent."""
        async with self._open_lock:
            self._closed = True
            if self._opening is not None and not self._opening.done():
                await asyncio.wait([self._opening])  # it closes what it opened
            state, self._state = self._state, None
            if state is not None:
                loop = asyncio.get_running_loop()
                done: asyncio.Future[None] = loop.create_future()
                self._syncer.submit(_Ticket(state, loop, 0.0, done, close=True))
                with contextlib.suppress(McpError):
                    await done

    async def _ensure_open(self) -> _Open:
        async with self._open_lock:
            while True:
                if self._closed:
                    raise FailedPrecondition("the audit log is closed")
                if self._state is not None:
                    return self._state
                if self._opening is None or self._opening.done():
                    self._opening = asyncio.ensure_future(self._open_async())
                # Shielded: a cancelled writer must not strand an open, locked file.
                await asyncio.shield(self._opening)

    async def _open_async(self) -> None:
        state = await asyncio.to_thread(self._open)
        if self._closed:
            _close_quietly(state)
            return
        self._state = state

    def _retire(self, state: _Open) -> None:
        """Stop using ``state``; the syncer closes it after its queued records."""
        if self._state is state:
            self._state = None
        self._syncer.submit(_Ticket(state, asyncio.get_running_loop(), 0.0, None, close=True))

    def _synced(self, tickets: list[_Ticket], errors: dict[int, OSError]) -> None:
        """On the loop: resolve the tickets of one fsync round."""
        now = time.perf_counter()
        for ticket in tickets:
            error = errors.get(id(ticket.state))
            if error is not None:
                if self._state is ticket.state:
                    self._retire(ticket.state)
                if ticket.done is None and not ticket.close:
                    self.sync_failures += 1
                    log.error("audit fsync failed", error=str(error))
                    if self._on_sync_failure is not None:
                        with contextlib.suppress(Exception):
                            self._on_sync_failure()
            elif not ticket.close and self._on_latency is not None:
                with contextlib.suppress(Exception):
                    self._on_latency(now - ticket.started)
            if ticket.done is not None and not ticket.done.done():
                if error is None:
                    ticket.done.set_result(None)
                else:
                    ticket.done.set_exception(_io_error(error, "write"))

    # -- blocking part (worker thread) -----------------------------------------

    def _open(self) -> _Open:
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _io_error(exc, "open") from exc
        state = _Open(fd, 0, GENESIS, None)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Unavailable("the audit log is in use by another writer") from None
            plan = self._read_tail()
            state.seq, state.head = plan.seq, plan.head
            if plan.torn:
                line = self._formatter.render(
                    plan.seq + 1,
                    RECOVERED_EVENT,
                    {
                        "torn": _torn_descriptions(plan.torn),
                        "note": "incomplete lines found at open were kept in place",
                    },
                    plan.head,
                    redact=False,
                )
                _append(fd, (b"\n" if plan.needs_newline else b"") + line + b"\n")
                state.seq, state.head = plan.seq + 1, record_hash(line)
            elif plan.needs_newline:
                _append(fd, b"\n")
            self._fsync_dir()
            if self._also_journald and self._journald_socket.exists():
                state.journal = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
        except BaseException:
            _close_quietly(state)
            raise
        return state

    def _read_tail(self) -> TailPlan:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _io_error(exc, "open") from exc
        try:
            size = os.fstat(fd).st_size
            window = _TAIL_WINDOW
            while True:
                start = max(0, size - window)
                data = os.pread(fd, size - start, start)
                plan = plan_tail(data, at_start=start == 0)
                if plan is not None:
                    return plan
                window *= 4
        except OSError as exc:
            raise _io_error(exc, "read") from exc
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        """Make the file's directory entry durable too (fsync(2), NOTES)."""
        try:
            dfd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _io_error(exc, "open") from exc
        try:
            os.fsync(dfd)
        except OSError as exc:
            raise _io_error(exc, "write") from exc
        finally:
            os.close(dfd)

    def _send_journald(self, state: _Open, line: bytes) -> None:
        """Best effort: a non-blocking datagram; never raises, never waits."""
        if state.journal is None:
            return
        datagram = journald_datagram(line, seq=state.seq, digest=state.head)
        try:
            state.journal.sendto(datagram, os.fsencode(self._journald_socket))
        except OSError:
            self.journald_failures += 1


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (O_APPEND)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise _io_error(exc, "write") from exc


def _append(fd: int, data: bytes) -> None:
    """Write all of ``data`` (O_APPEND) and fsync it before returning."""
    _write_all(fd, data)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _io_error(exc, "write") from exc


def _close_quietly(state: _Open) -> None:
    with contextlib.suppress(OSError):
        os.close(state.fd)
    if state.journal is not None:
        state.journal.close()


def _io_error(exc: OSError, action: str) -> McpError:
    """OSError -> McpError, once, without host paths in the message."""
    name = errno.errorcode.get(exc.errno or 0, "unknown error")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"audit log {action} failed: no space left ({name})")
    return Internal(f"audit log {action} failed ({name})")
