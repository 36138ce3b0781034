"""When /mcp answers a POST with an SSE stream instead of JSON (pure)."""

from __future__ import annotations

import pytest

from gateway.mcp import wants_sse

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("accept", "token", "expected"),
    [
        ("application/json, text/event-stream", None, False),
        ("application/json, text/event-stream", "p", True),
        ("application/json, text/event-stream", 0, True),
        ("text/event-stream", None, True),
        ("application/json", "p", False),
        ("", "p", False),
        ("*/*", "p", True),
        ("*/*", None, False),
        ("text/*, application/json;q=0.9", None, True),
        ("text/event-stream;q=0.5, application/json", "p", False),
        ("text/event-stream;q=0, */*", "p", False),
        ("text/event-stream;q=bogus, application/json", "p", False),
        ("TEXT/EVENT-STREAM", None, True),
    ],
)
def test_wants_sse(accept: str, token: str | int | None, expected: bool) -> None:
    assert wants_sse(accept, token) is expected
