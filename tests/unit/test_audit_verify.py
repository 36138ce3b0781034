"""The audit chain's pure parts: record format, tail planning and the verifier."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import (
    GENESIS,
    RECOVERED_EVENT,
    REDACTED,
    RecordFormatter,
    TailPlan,
    format_ts,
    journald_datagram,
    plan_tail,
    record_hash,
    verify_lines,
)
from gateway.errors import Internal, InvalidArgument

pytestmark = pytest.mark.unit

CLOCK = 1_700_000_000.25


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def formatter(redact: tuple[str, ...] = ()) -> RecordFormatter:
    return RecordFormatter(redact=redact, clock=lambda: CLOCK)


def chain(n: int, fmt: RecordFormatter | None = None, start: int = 1) -> list[bytes]:
    """n valid record lines (no newlines), seq from ``start``, linked from genesis."""
    fmt = fmt or formatter()
    lines: list[bytes] = []
    prev = GENESIS
    for seq in range(start, start + n):
        line = fmt.render(seq, "test.event", {"n": seq, "who": "alice"}, prev)
        lines.append(line)
        prev = sha(line)
    return lines


def recovered(seq: int, prev: str, torn: list[bytes]) -> bytes:
    fields = {"torn": [{"bytes": len(t), "sha256": sha(t)} for t in torn]}
    return formatter().render(seq, RECOVERED_EVENT, fields, prev, redact=False)


# -- format -------------------------------------------------------------------


def test_genesis_is_sha256_of_empty() -> None:
    """The first record links to SHA-256(b'')."""
    assert GENESIS == sha(b"") == record_hash(b"")


def test_line_format_matches_contract() -> None:
    """A line is compact ASCII JSON: seq, ts, event, fields in order, then prev."""
    line = formatter().render(1, "file.written", {"path": "é/x", "bytes": 3}, GENESIS)
    expected = (
        '{"seq":1,"ts":"2023-11-14T22:13:20.250000Z","event":"file.written",'
        '"path":"\\u00e9/x","bytes":3,"prev":"' + GENESIS + '"}'
    ).encode()
    assert line == expected
    assert list(json.loads(line)) == ["seq", "ts", "event", "path", "bytes", "prev"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "1970-01-01T00:00:00.000000Z"), (1_700_000_000.5, "2023-11-14T22:13:20.500000Z")],
)
def test_format_ts(seconds: float, text: str) -> None:
    """Timestamps are RFC 3339 UTC with microseconds and a Z."""
    assert format_ts(seconds) == text


@pytest.mark.parametrize("key", ["seq", "ts", "event", "prev"])
def test_reserved_field_names_rejected(key: str) -> None:
    """Callers cannot overwrite seq/ts/event/prev."""
    with pytest.raises(InvalidArgument) as info:
        formatter().render(1, "e", {key: 1}, GENESIS)
    assert info.value.field == key


@pytest.mark.parametrize(
    ("fields", "patterns", "expected"),
    [
        ({"token": "abc"}, (), {"token": REDACTED}),
        ({"Authorization": "Bearer x"}, (), {"Authorization": REDACTED}),
        ({"db_password": "pw", "passwd": 1}, (), {"db_password": REDACTED, "passwd": REDACTED}),
        ({"client_secret": {"a": 1}}, (), {"client_secret": REDACTED}),
        (
            {"headers": {"X-Api-Key": "k", "ok": "v"}},
            (),
            {"headers": {"X-Api-Key": REDACTED, "ok": "v"}},
        ),
        ({"auth": "token"}, (), {"auth": "token"}),
        (
            {"args": ["--password=hunter2", "x"]},
            (r"password=\S+",),
            {"args": [f"--{REDACTED}", "x"]},
        ),
        (
            {"cmd": "curl -H 'Bearer abc.def' password=x"},
            (r"Bearer [\w.]+", r"password=\S+"),
            {"cmd": f"curl -H '{REDACTED}' {REDACTED}"},
        ),
        ({"deep": [{"nested": ["sk-123456"]}]}, (r"sk-\d+",), {"deep": [{"nested": [REDACTED]}]}),
        ({"n": 5, "flag": True, "none": None}, (r"\d",), {"n": 5, "flag": True, "none": None}),
    ],
)
def test_redaction(
    fields: dict[str, Any], patterns: tuple[str, ...], expected: dict[str, Any]
) -> None:
    """Secret-looking keys are redacted entirely, pattern matches substring-wise, at any depth."""
    line = formatter(patterns).render(1, "e", fields, GENESIS)
    record = json.loads(line)
    assert {k: v for k, v in record.items() if k not in ("seq", "ts", "event", "prev")} == expected


def test_invalid_redaction_pattern() -> None:
    """A pattern that does not compile is InvalidArgument(field='redact')."""
    with pytest.raises(InvalidArgument) as info:
        formatter(("(",))
    assert info.value.field == "redact"


def test_non_json_values_are_rendered_deterministically() -> None:
    """Sets, tuples, bytes and NaN become plain JSON so lines are always valid."""
    line = formatter().render(
        1, "e", {"s": {3, 1, 2}, "t": (1, "a"), "b": b"\xffok", "f": float("nan")}, GENESIS
    )
    record = json.loads(line)
    assert record["s"] == [1, 2, 3]
    assert record["t"] == [1, "a"]
    assert record["b"] == "\\xffok"
    assert record["f"] == "nan"


def test_journald_datagram() -> None:
    """A journald datagram carries MESSAGE and the identifier; multiline values get a length."""
    datagram = journald_datagram(b'{"seq":1}', seq=1, digest="ab")
    assert datagram.startswith(b'MESSAGE={"seq":1}\nSYSLOG_IDENTIFIER=mcp-gateway-audit\n')
    assert b"MCP_AUDIT_SEQ=1\nMCP_AUDIT_HASH=ab\n" in datagram
    multi = journald_datagram(b"a\nb", seq=2, digest="cd")
    assert multi.startswith(b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\n")


# -- verify: accepted ------------------------------------------------------------


def test_verify_valid_chain() -> None:
    """An untouched chain verifies and reports its head and length."""
    lines = chain(5)
    result = verify_lines(lines)
    assert result.ok
    assert (result.records, result.last_seq, result.head) == (5, 5, sha(lines[-1]))
    assert verify_lines(line + b"\n" for line in lines) == result


def test_verify_empty() -> None:
    """An empty log is a valid log with zero records."""
    assert verify_lines([]).ok


def test_verify_accepts_documented_recovery() -> None:
    """A torn line followed by a matching audit.recovered record, then more records, is valid."""
    good = chain(3)
    torn = good[0][:17]
    rec = recovered(4, sha(good[-1]), [torn])
    after = formatter().render(5, "after", {}, sha(rec))
    result = verify_lines([*good, torn, rec, after])
    assert result.ok, result
    assert result.records == 5


def test_verify_accepts_recovery_of_two_torn_lines() -> None:
    """A recovery that was itself torn is covered by one record listing both lines."""
    good = chain(2)
    torn = [b'{"seq":3,"ts":"2', b'{"seq":3,"ts":"2023-11-14T22:13:20.250000Z","event":"audit.rec']
    rec = recovered(3, sha(good[-1]), torn)
    assert verify_lines([*good, *torn, rec]).ok


def test_verify_accepts_torn_first_line() -> None:
    """A crash during the very first write recovers from genesis."""
    torn = b'{"seq":1,"ts'
    assert verify_lines([torn, recovered(1, GENESIS, [torn])]).ok


# -- verify: tampering ----------------------------------------------------------


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"who":"alice"', b'"who":"mallory"')
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _swap(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def _insert_forged(lines: list[bytes]) -> list[bytes]:
    forged = formatter().render(3, "forged", {}, sha(lines[1]))
    return [*lines[:2], forged, *lines[2:]]


def _truncate_tail(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    return lines


def _malformed_middle(lines: list[bytes]) -> list[bytes]:
    lines[2] = b"not json at all"
    return lines


def _empty_line(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], b"", *lines[2:]]


def _seq_gap_rechained(lines: list[bytes]) -> list[bytes]:
    fmt = formatter()
    out = lines[:2]
    for seq in (4, 5, 6):
        out.append(fmt.render(seq, "test.event", {"n": seq}, sha(out[-1])))
    return out


def _duplicate_key(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"who":"alice"', b'"who":"alice","who":"bob"')
    return lines


def _bad_genesis(lines: list[bytes]) -> list[bytes]:
    first = json.loads(lines[0])
    first["prev"] = "0" * 64
    return [json.dumps(first, separators=(",", ":")).encode()]


def _drop_first(lines: list[bytes]) -> list[bytes]:
    return lines[1:]


def _recovered_without_torn(lines: list[bytes]) -> list[bytes]:
    return [*lines, recovered(len(lines) + 1, sha(lines[-1]), [])]


def _recovered_wrong_description(lines: list[bytes]) -> list[bytes]:
    torn = b'{"seq":6,'
    return [*lines, torn, recovered(6, sha(lines[-1]), [b"something else"])]


def _torn_without_recovery(lines: list[bytes]) -> list[bytes]:
    torn = b'{"seq":6,'
    after = formatter().render(6, "e", {}, sha(lines[-1]))
    return [*lines, torn, after]


def _bad_ts(lines: list[bytes]) -> list[bytes]:
    first = json.loads(lines[0])
    first["ts"] = "yesterday"
    return [json.dumps(first, separators=(",", ":")).encode()]


def _bool_seq(lines: list[bytes]) -> list[bytes]:
    return [lines[0].replace(b'{"seq":1,', b'{"seq":true,')]


def _not_an_object(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], b"[1,2,3]", *lines[2:]]


@pytest.mark.parametrize(
    ("tamper", "bad_line", "reason"),
    [
        (_edit, 4, "prev does not match"),
        (_delete, 3, "seq 4 where 3"),
        (_swap, 3, "seq 4 where 3"),
        (_insert_forged, 4, "seq 3 where 4"),
        (_truncate_tail, 5, "torn or malformed line at the end"),
        (_malformed_middle, 3, "not a JSON object"),
        (_empty_line, 3, "not a JSON object"),
        (_not_an_object, 3, "not a JSON object"),
        (_seq_gap_rechained, 3, "seq 4 where 3"),
        (_duplicate_key, 3, "not a JSON object"),
        (_bad_genesis, 1, "prev does not match"),
        (_drop_first, 1, "seq 2 where 1"),
        (_recovered_without_torn, 6, "without torn lines"),
        (_recovered_wrong_description, 7, "does not match the torn lines"),
        (_torn_without_recovery, 6, "not a JSON object"),
        (_bad_ts, 1, "ts"),
        (_bool_seq, 1, "seq"),
    ],
)
def test_verify_detects_tampering(
    tamper: Callable[[list[bytes]], list[bytes]], bad_line: int, reason: str
) -> None:
    """Each kind of tampering fails verification at the first affected line."""
    result = verify_lines(tamper(chain(5)))
    assert not result.ok
    assert result.first_bad_line == bad_line
    assert result.reason is not None
    assert reason in result.reason


def test_verify_expected_head_detects_clean_truncation() -> None:
    """Records cut cleanly off the end are caught only against an anchored head hash."""
    lines = chain(5)
    head = sha(lines[-1])
    assert verify_lines(lines[:3]).ok
    result = verify_lines(lines[:3], expected_head=head)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert verify_lines(lines, expected_head=head).ok


def test_verify_expected_head_detects_edit_of_last_record() -> None:
    """Editing the last record is invisible to the chain but caught against the head."""
    lines = chain(3)
    head = sha(lines[-1])
    lines[-1] = lines[-1].replace(b'"who":"alice"', b'"who":"eve"')
    assert verify_lines(lines).ok
    assert not verify_lines(lines, expected_head=head).ok


# -- tail planning --------------------------------------------------------------


def test_plan_tail_cases() -> None:
    """plan_tail finds the chain head, the torn lines and whether a newline is missing."""
    lines = chain(3)
    body = b"\n".join(lines) + b"\n"
    head = sha(lines[-1])
    assert plan_tail(b"", at_start=True) == TailPlan(0, GENESIS, (), False)
    assert plan_tail(body, at_start=True) == TailPlan(3, head, (), False)
    assert plan_tail(body + b'{"se', at_start=True) == TailPlan(3, head, (b'{"se',), True)
    assert plan_tail(body + b"x\n", at_start=True) == TailPlan(3, head, (b"x",), False)
    assert plan_tail(body + b"x\nyy", at_start=True) == TailPlan(3, head, (b"x", b"yy"), True)
    assert plan_tail(body[:-1], at_start=True) == TailPlan(3, head, (), True)
    assert plan_tail(b'{"seq":1,"t', at_start=True) == TailPlan(0, GENESIS, (b'{"seq":1,"t',), True)


def test_plan_tail_needs_more_data() -> None:
    """Without the file's start, a window with no complete record asks for more bytes."""
    line = chain(1)[0]
    assert plan_tail(line[5:] + b"\ngarbage", at_start=False) is None
    # The first (possibly partial) line of a window is never trusted.
    assert plan_tail(line + b"\n", at_start=False) is None
    assert plan_tail(b"x\n" + line + b"\n", at_start=False) == TailPlan(1, sha(line), (), False)


def test_plan_tail_corrupt_record_fails_closed() -> None:
    """A last JSON line that is not a record means corruption: Internal, not a silent restart."""
    with pytest.raises(Internal, match="corrupt"):
        plan_tail(b"\n".join(chain(2)) + b'\n{"hello":1}\n', at_start=True)


# -- properties -----------------------------------------------------------------

_KEYS = st.text(alphabet="abcdxyz_019üé", min_size=1, max_size=8).filter(
    lambda k: k not in ("seq", "ts", "event", "prev")
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=50)
@given(st.lists(st.dictionaries(_KEYS, _JSON, max_size=6), min_size=1, max_size=6))
def test_random_fields_round_trip_and_verify(records: list[dict[str, Any]]) -> None:
    """Arbitrary JSON field dicts come back unchanged and their chain verifies."""
    fmt = formatter()
    lines: list[bytes] = []
    prev = GENESIS
    for seq, fields in enumerate(records, start=1):
        line = fmt.render(seq, "prop", fields, prev)
        assert b"\n" not in line
        parsed = json.loads(line)
        assert {
            k: v for k, v in parsed.items() if k not in ("seq", "ts", "event", "prev")
        } == fields
        lines.append(line)
        prev = sha(line)
    result = verify_lines(lines, expected_head=prev)
    assert result.ok, result
    assert result.records == len(records)


@given(st.data())
def test_any_single_byte_change_is_detected(data: st.DataObject) -> None:
    """Changing any one byte of any line fails verification against the anchored head."""
    lines = chain(4)
    head = sha(lines[-1])
    index = data.draw(st.integers(0, len(lines) - 1))
    line = bytearray(lines[index])
    pos = data.draw(st.integers(0, len(line) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != line[pos]))
    line[pos] = new
    lines[index] = bytes(line)
    assert not verify_lines(lines, expected_head=head).ok
