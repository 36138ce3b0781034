"""Glob matching for search_files/directory_tree and the edit_file edits and diff (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edits import Edit, apply_edits, fenced, unified_diff
from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.globs import excluded, matches

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.py", "a.py", True),
        ("*.py", "src/a.py", False),
        ("**/*.py", "a.py", True),
        ("**/*.py", "src/deep/a.py", True),
        ("src/**", "src/a/b", True),
        ("src/*", "src/a/b", False),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("[ab].c", "b.c", True),
        ("[!ab].c", "b.c", False),
        ("*", ".hidden", True),
        ("a.py", "a.py", True),
        ("a+b(1).py", "a+b(1).py", True),
    ],
)
def test_matches(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


@pytest.mark.parametrize("pattern", ["", "[oops", "x" * 2000])
def test_bad_patterns_name_the_field(pattern: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        matches(pattern, "a", field="pattern")
    assert info.value.field == "pattern"


def test_excluded_plain_names_match_anywhere() -> None:
    assert excluded(["node_modules"], "a/node_modules")
    assert excluded(["node_modules"], "node_modules/x/y")
    assert not excluded(["node"], "node_modules")
    assert excluded(["*.log"], "x.log")
    assert not excluded(["*.log"], "d/x.log")


@given(st.text(alphabet=st.characters(blacklist_characters="/*?[]\\", codec="utf-8"), min_size=1))
def test_literal_names_match_themselves(name: str) -> None:
    if name in (".",):
        return
    assert matches(name, name)
    assert matches(f"**/{name}", f"d/{name}")


def test_edits_apply_in_order_first_occurrence() -> None:
    edits = [Edit("a", "b"), Edit("ba", "c")]
    assert apply_edits("aa a", edits) == "c a"


def test_edit_matches_lines_ignoring_indentation_and_reindents() -> None:
    text = "if x:\n    call(1)\n    call(2)\n"
    out = apply_edits(text, [Edit("call(1)\ncall(2)\n", "call(3)\n  nested()\n")])
    assert out == "if x:\n    call(3)\n      nested()\n"


def test_edit_without_match_names_the_edit() -> None:
    with pytest.raises(FailedPrecondition, match=r"edits\[0\]"):
        apply_edits("abc", [Edit("zzz", "y")])
    with pytest.raises(InvalidArgument) as info:
        apply_edits("abc", [Edit("", "y")])
    assert info.value.field == "edits[0].oldText"


def test_crlf_is_normalized() -> None:
    assert apply_edits("a\r\nb\r\n", [Edit("a\nb", "c")]) == "c\n"


def test_unified_diff_is_git_style() -> None:
    diff = unified_diff("/workspace/f", "a\nb\n", "a\nc")
    assert diff.splitlines() == [
        "Index: /workspace/f",
        "=" * 67,
        "--- /workspace/f\toriginal",
        "+++ /workspace/f\tmodified",
        "@@ -1,2 +1,2 @@",
        " a",
        "-b",
        "+c",
        "\\ No newline at end of file",
    ]


def test_fence_outgrows_backticks_in_the_diff() -> None:
    assert fenced("x\n").startswith("```diff\n")
    assert fenced("```\n").startswith("````diff\n")
