"""Glob patterns over workspace-relative paths (pure).

The dialect is the one MCP filesystem clients expect (minimatch with
``dot: true``): ``*`` matches within one path component, ``**`` as a whole
component matches any number of components (including none), ``?`` one
character, ``[...]`` / ``[!...]`` a character class; dot files are not special.
"""

from __future__ import annotations

import functools
import re

from gateway.errors import InvalidArgument

MAX_PATTERN = 1024


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: str, *, field: str = "pattern") -> re.Pattern[str]:
    """A regular expression matching exactly the paths ``pattern`` matches.

    Raises InvalidArgument (naming ``field``) for an empty or over-long
    pattern or an unterminated ``[``.
    """
    if not pattern:
        raise InvalidArgument("pattern must not be empty", field=field)
    if len(pattern) > MAX_PATTERN:
        raise InvalidArgument(f"pattern is longer than {MAX_PATTERN} characters", field=field)
    parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
    out = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            # Any number of whole components; as the last part, anything below.
            out += ".*" if last else "(?:[^/]*/)*"
            continue
        out += _component(part, field) + ("" if last else "/")
    try:
        return re.compile(out, re.DOTALL)
    except re.error as exc:
        raise InvalidArgument(f"invalid pattern {pattern!r}: {exc}", field=field) from None


def _component(part: str, field: str) -> str:
    out = []
    i = 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = part.find("]", i + 2 if part[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise InvalidArgument(f"unterminated '[' in pattern {part!r}", field=field)
            body = part[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            escaped = body.replace("\\", "\\\\").replace("^", "\\^")
            out.append(f"[{'^/' if negate else ''}{escaped}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def matches(pattern: str, path: str, *, field: str = "pattern") -> bool:
    """Does the relative ``path`` match ``pattern`` as a whole?"""
    return compile_glob(pattern, field=field).fullmatch(path) is not None


def excluded(patterns: list[str], path: str, *, field: str = "excludePatterns") -> bool:
    """Is ``path`` excluded?  A pattern with ``*`` must match the whole path;
    one without matches that name (or sub-path) anywhere in the path."""
    for pattern in patterns:
        if "*" in pattern:
            if matches(pattern, path, field=field):
                return True
        elif matches(f"**/{pattern}", path, field=field) or matches(
            f"**/{pattern}/**", path, field=field
        ):
            return True
    return False
