"""normalize_path and validate_subject_id: the pure gatekeepers of workspace paths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidArgument
from gateway.workspace import NAME_MAX, PATH_MAX, normalize_path, validate_subject_id

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("given_path", "expected"),
    [
        ("", "."),
        (".", "."),
        ("./", "."),
        ("./.", "."),
        (".//", "."),
        ("a", "a"),
        ("a/b", "a/b"),
        ("a//b", "a/b"),
        ("a/./b/", "a/b"),
        ("./a", "a"),
        ("a..b", "a..b"),
        ("...", "..."),
        (".hidden", ".hidden"),
        ("dir with space/f", "dir with space/f"),
        ("back\\slash", "back\\slash"),
        ("ünïcode/名前", "ünïcode/名前"),
        ("x" * NAME_MAX, "x" * NAME_MAX),
        ("é" * (NAME_MAX // 2), "é" * (NAME_MAX // 2)),
        ("/".join(["a" * 100] * 40), "/".join(["a" * 100] * 40)),
    ],
)
def test_normalize_accepts(given_path: str, expected: str) -> None:
    """Valid relative paths normalize to their canonical form ("." for the root)."""
    assert normalize_path(given_path) == expected


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("/", "absolute"),
        ("//a", "absolute"),
        ("..", ".."),
        ("../x", ".."),
        ("a/../b", ".."),
        ("a/..", ".."),
        ("a/b/../../..", ".."),
        ("a\x00b", "NUL"),
        ("\x00", "NUL"),
        ("bad\udcffname", "UTF-8"),
        ("x" * (NAME_MAX + 1), str(NAME_MAX)),
        ("é" * (NAME_MAX // 2 + 1), str(NAME_MAX)),
        ("a/" * (PATH_MAX // 2), str(PATH_MAX - 1)),
        ("a" * PATH_MAX, str(PATH_MAX - 1)),
    ],
)
def test_normalize_rejects(bad: str, why: str) -> None:
    """Dangerous or malformed paths raise InvalidArgument naming the field and the reason."""
    with pytest.raises(InvalidArgument) as info:
        normalize_path(bad, field="dst")
    assert info.value.field == "dst"
    assert why in info.value.message


def test_normalize_rejects_non_str() -> None:
    """A non-string path is an InvalidArgument, not a TypeError."""
    with pytest.raises(InvalidArgument):
        normalize_path(b"a")  # type: ignore[arg-type]


_COMPONENTS = st.sampled_from(["", ".", "..", "a", "b.c", "..a", "\x00", "é", "\udc80", "/"])
_PATHS = st.one_of(
    st.text(),
    st.lists(st.one_of(_COMPONENTS, st.text(max_size=8)), max_size=12).map("/".join),
)


@given(_PATHS)
def test_normalize_output_is_safe(path: str) -> None:
    """Accepted paths are relative, NUL-free, UTF-8, free of ''/'.'/'..' parts, and fixed points."""
    try:
        out = normalize_path(path)
    except InvalidArgument as exc:
        error: InvalidArgument | None = exc
    else:
        error = None
    if error is not None:
        assert error.field == "path"
        return
    assert "\x00" not in out
    assert not out.startswith("/")
    out.encode("utf-8")
    assert len(out.encode("utf-8")) < PATH_MAX
    if out != ".":
        parts = out.split("/")
        assert all(p not in ("", ".", "..") for p in parts)
        assert all(len(p.encode("utf-8")) <= NAME_MAX for p in parts)
    assert normalize_path(out) == out


@pytest.mark.parametrize(
    ("subject", "ok"),
    [
        ("alice", True),
        ("svc.bot@example.com", True),
        ("A-Z_0.9", True),
        ("x" * 128, True),
        ("...", True),
        ("", False),
        (".", False),
        ("..", False),
        ("x" * 129, False),
        ("a/b", False),
        ("a\n", False),
        ("a b", False),
        ("ä", False),
        ("a\x00", False),
    ],
)
def test_validate_subject_id(subject: str, ok: bool) -> None:
    """Subject ids are single safe directory names, else InvalidArgument on field 'subject'."""
    if ok:
        assert validate_subject_id(subject) == subject
    else:
        with pytest.raises(InvalidArgument) as info:
            validate_subject_id(subject)
        assert info.value.field == "subject"
