"""Request validation: every problem is an InvalidArgument naming its field."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import LimitsConfig, TasksConfig
from gateway.errors import InvalidArgument
from gateway.schema import parse_bool, parse_execute, parse_mode, parse_task_id

pytestmark = pytest.mark.unit

TASKS = TasksConfig(max_args=8, max_arg_bytes=256, max_stdin_bytes=16)
LIMITS = LimitsConfig(timeout_s=30, max_timeout_s=60)


def parse(body: Any) -> Any:
    return parse_execute(body, tasks=TASKS, limits=LIMITS)


def test_minimal_body() -> None:
    """A bare command gets defaults from the config."""
    spec, wait = parse({"command": "echo", "args": ["hello world"]})
    assert spec.argv == ["echo", "hello world"]
    assert spec.cwd == "/workspace"
    assert spec.timeout_s == 30
    assert wait is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ("echo", "body"),
        ({}, "command"),
        ({"command": ""}, "command"),
        ({"command": 5}, "command"),
        ({"command": "echo", "args": "hi"}, "args"),
        ({"command": "echo", "args": ["ok", 3]}, "args[1]"),
        ({"command": "echo", "args": ["a\x00b"]}, "args[0]"),
        ({"command": "e\x00cho"}, "command"),
        ({"command": "echo", "args": ["x"] * 9}, "args"),
        ({"command": "echo", "args": ["x" * 300]}, "args"),
        ({"command": "echo", "cwd": "/etc"}, "cwd"),
        ({"command": "echo", "cwd": "/workspace/../etc"}, "cwd"),
        ({"command": "echo", "cwd": "/workspacefoo"}, "cwd"),
        ({"command": "echo", "env": {"1BAD": "x"}}, "env.1BAD"),
        ({"command": "echo", "env": {"OK": 1}}, "env.OK"),
        ({"command": "echo", "env": {"OK": "a\x00"}}, "env.OK"),
        ({"command": "echo", "timeout": 0}, "timeout"),
        ({"command": "echo", "timeout": -1}, "timeout"),
        ({"command": "echo", "timeout": 61}, "timeout"),
        ({"command": "echo", "timeout": "10"}, "timeout"),
        ({"command": "echo", "wait": "yes"}, "wait"),
        ({"command": "echo", "stdin": "x" * 17}, "stdin"),
        ({"command": "echo", "stdin_base64": "***"}, "stdin_base64"),
        ({"command": "echo", "stdin": "a", "stdin_base64": "YQ=="}, "stdin"),
        ({"command": "echo", "surprise": True}, "surprise"),
    ],
)
def test_bad_bodies_name_the_field(body: Any, field: str) -> None:
    """Each malformed body is refused with the offending field named."""
    with pytest.raises(InvalidArgument) as info:
        parse(body)
    assert info.value.field == field
    assert field.split("[")[0].split(".")[0] in info.value.message


def test_stdin_base64_is_binary_safe() -> None:
    """stdin_base64 carries arbitrary bytes."""
    spec, _ = parse({"command": "cat", "stdin_base64": base64.b64encode(b"\x00\xff").decode()})
    assert spec.stdin == b"\x00\xff"


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text())))
def test_arbitrary_objects_never_crash(body: dict[str, Any]) -> None:
    """Any JSON-like object either parses or raises InvalidArgument with a field."""
    try:
        parse(body)
    except InvalidArgument as exc:
        assert exc.field


@given(
    st.fixed_dictionaries(
        {"command": st.text(min_size=1, max_size=20), "args": st.lists(st.text(max_size=20))}
    )
)
def test_arbitrary_strings_are_accepted_or_named(body: dict[str, Any]) -> None:
    """Unicode commands/args parse unless they hit a documented limit (NUL, size)."""
    try:
        spec, _ = parse(body)
    except InvalidArgument as exc:
        assert exc.field is not None
        assert exc.field in {"command", "args"} or exc.field.startswith("args[")
    else:
        assert "\x00" not in "".join(spec.argv)


@pytest.mark.parametrize("value", ["1234567890abcdef1234567890ABCDEF", "x", "", "../etc"])
def test_bad_task_ids(value: str) -> None:
    """Task ids are 32 lowercase hex digits."""
    with pytest.raises(InvalidArgument, match="task_id"):
        parse_task_id(value)


@pytest.mark.parametrize(("text", "mode"), [(None, 0o644), ("600", 0o600), ("0o755", 0o755)])
def test_modes(text: str | None, mode: int) -> None:
    """Octal modes parse."""
    assert parse_mode(text) == mode


@pytest.mark.parametrize("text", ["4755", "888", "rw", "-1"])
def test_bad_modes(text: str) -> None:
    """Special bits and non-octal text are refused."""
    with pytest.raises(InvalidArgument, match="mode"):
        parse_mode(text)


def test_bool_query() -> None:
    """Query booleans accept the usual spellings only."""
    assert parse_bool("true", "x") is True
    assert parse_bool(None, "x") is False
    with pytest.raises(InvalidArgument, match="recursive"):
        parse_bool("maybe", "recursive")
