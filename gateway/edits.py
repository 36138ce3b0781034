"""Text edits for the ``edit_file`` tool and their git-style diff (pure).

Each edit replaces the first occurrence of ``old_text`` with ``new_text``;
edits apply in order, each to the result of the previous ones.  Line endings
are normalized to ``\\n`` first.  When ``old_text`` does not occur verbatim,
a run of whole lines equal to its lines *after stripping surrounding
whitespace* is accepted, and ``new_text`` is re-indented to the indentation
found in the file.  An edit that matches nothing fails the whole request.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from gateway.errors import FailedPrecondition, InvalidArgument


@dataclass(frozen=True, slots=True)
class Edit:
    old_text: str
    new_text: str


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n")


def apply_edits(text: str, edits: list[Edit]) -> str:
    """The text with every edit applied; FailedPrecondition names an edit that did not match."""
    result = normalize_newlines(text)
    for index, edit in enumerate(edits):
        old = normalize_newlines(edit.old_text)
        new = normalize_newlines(edit.new_text)
        if not old:
            raise InvalidArgument("oldText must not be empty", field=f"edits[{index}].oldText")
        at = result.find(old)
        if at >= 0:
            result = result[:at] + new + result[at + len(old) :]
            continue
        replaced = _replace_lines(result, old, new)
        if replaced is None:
            raise FailedPrecondition(f"edits[{index}]: could not find a match for oldText:\n{old}")
        result = replaced
    return result


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _replace_lines(text: str, old: str, new: str) -> str | None:
    lines = text.split("\n")
    old_lines = old.split("\n")
    if old_lines and old_lines[-1] == "":
        old_lines.pop()
    want = [line.strip() for line in old_lines]
    for start in range(len(lines) - len(want) + 1):
        if [line.strip() for line in lines[start : start + len(want)]] != want:
            continue
        file_indent = _indent(lines[start])
        old_indent = _indent(old_lines[0])
        new_lines = new.split("\n")
        trailing = bool(new_lines) and new_lines[-1] == "" and len(new_lines) > 1
        if trailing:
            new_lines.pop()
        fixed = [
            file_indent + line.removeprefix(old_indent) if line.strip() else line
            for line in new_lines
        ]
        return "\n".join(lines[:start] + fixed + lines[start + len(want) :])
    return None


def unified_diff(path: str, before: str, after: str) -> str:
    """A git-style unified diff (three lines of context) from ``before`` to ``after``."""
    body = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=path,
        tofile=path,
        fromfiledate="original",
        tofiledate="modified",
    )
    out = [f"Index: {path}\n", "=" * 67 + "\n"]
    for line in body:
        if line.endswith("\n"):
            out.append(line)
        else:
            out.append(line + "\n\\ No newline at end of file\n")
    return "".join(out)


def fenced(diff: str) -> str:
    """The diff in a Markdown ``diff`` block whose fence no line of it can close."""
    fence = "```"
    while fence in diff:
        fence += "`"
    return f"{fence}diff\n{diff}{fence}\n\n"
