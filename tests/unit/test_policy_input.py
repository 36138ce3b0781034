"""The pure half of the policy seam: the input document and reading decisions."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.models import CommandSpec, Decision, Subject
from gateway.policy import (
    ACTIONS,
    MAX_INPUT_DEPTH,
    MAX_INPUT_NODES,
    POLICY_INPUT_VERSION,
    build_policy_input,
    check_policy_input,
    parse_decision,
)

pytestmark = pytest.mark.unit

ALICE = Subject("alice", ("developer", "agent"), auth="jwt")
REQUEST: dict[str, Any] = {"request_id": "r-1", "transport": "rest", "source": "127.0.0.1"}
ENVELOPE: dict[str, Any] = {
    "version": 1,
    "subject": {"id": "alice", "roles": ["developer", "agent"], "auth": "jwt"},
    "request": {"id": "r-1", "transport": "rest", "source": "127.0.0.1"},
    "sandbox": {"network": "none"},
}


# --- build_policy_input -------------------------------------------------------------


def test_command_input_matches_the_contract() -> None:
    """command.execute carries the command section with args, cwd, env and timeout."""
    spec = CommandSpec(
        name="echo",
        args=("hi", "there"),
        cwd="/workspace/src",
        env=(("K", "V"), ("LANG", "C")),
        timeout_s=12.5,
        network=True,
    )
    doc = build_policy_input("command.execute", ALICE, command=spec, **REQUEST)
    assert doc == {
        **ENVELOPE,
        "action": "command.execute",
        "sandbox": {"network": "full"},
        "command": {
            "name": "echo",
            "args": ["hi", "there"],
            "cwd": "/workspace/src",
            "env": {"K": "V", "LANG": "C"},
            "timeout": 12.5,
        },
    }
    assert doc["version"] == POLICY_INPUT_VERSION


@pytest.mark.parametrize(
    ("action", "details", "section"),
    [
        ("file.read", {"file_path": "src/a.txt"}, {"file": {"path": "src/a.txt"}}),
        ("file.list", {"file_path": ""}, {"file": {"path": ""}}),
        (
            "file.write",
            {"file_path": "a", "file_mode": 0o644},
            {"file": {"path": "a", "mode": 420}},
        ),
        (
            "file.delete",
            {"file_path": "out", "recursive": True},
            {"file": {"path": "out", "recursive": True}},
        ),
        (
            "file.write",
            {"file_path": "", "probe": True},
            {"file": {"path": "", "probe": True}},
        ),
        (
            "task.read",
            {"task_id": "t1", "task_owner": "bob"},
            {"task": {"id": "t1", "owner": "bob"}},
        ),
        ("task.cancel", {"task_id": "t1"}, {"task": {"id": "t1"}}),
        ("command.execute", {}, {}),
        ("file.read", {}, {}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_sections_appear_only_for_their_action(
    action: str, details: dict[str, Any], section: dict[str, Any]
) -> None:
    """Each action gets only its own section; without details it is left out (the policy denies)."""
    doc = build_policy_input(action, ALICE, **REQUEST, **details)
    assert doc == {**ENVELOPE, "action": action, **section}


def test_details_of_other_actions_are_ignored() -> None:
    """A file path passed with task.read does not leak a file section into the input."""
    doc = build_policy_input(
        "task.read", ALICE, file_path="x", command=CommandSpec("echo"), **REQUEST
    )
    assert "file" not in doc
    assert "command" not in doc


def test_builder_is_pure() -> None:
    """Same arguments give equal, independent documents; the subject is not touched."""
    spec = CommandSpec("ls", ("-l",), env=(("A", "1"),))
    first = build_policy_input("command.execute", ALICE, command=spec, **REQUEST)
    second = build_policy_input("command.execute", ALICE, command=spec, **REQUEST)
    assert first == second
    first["command"]["args"].append("x")  # type: ignore[index]
    assert second["command"]["args"] == ["-l"]  # type: ignore[index]
    assert Subject("alice", ("developer", "agent"), auth="jwt") == ALICE


@given(
    name=st.text(min_size=1, max_size=20),
    args=st.lists(st.text(max_size=30), max_size=8),
    env=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=4),
    timeout=st.floats(min_value=0.001, max_value=1e6),
)
def test_built_inputs_are_json_and_pass_the_input_check(
    name: str, args: list[str], env: dict[str, str], timeout: float
) -> None:
    """Any command without NUL characters yields a JSON document the engines accept."""
    spec = CommandSpec(name, tuple(args), env=tuple(env.items()), timeout_s=timeout)
    doc = build_policy_input("command.execute", ALICE, command=spec, **REQUEST)
    has_nul = any("\x00" in s for s in [name, *args, *env, *env.values()])
    surrogate = any(not _encodable(s) for s in [name, *args, *env, *env.values()])
    assert json.loads(json.dumps(doc)) == doc
    assert (check_policy_input(doc) is None) == (not has_nul and not surrogate)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_actions_cover_the_contract() -> None:
    """The action set is the one of policy input version 1."""
    assert {
        "command.execute",
        "file.read",
        "file.write",
        "file.delete",
        "file.list",
        "task.read",
        "task.cancel",
    } == ACTIONS


# --- check_policy_input -------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep (the outer object is level 1)."""
    doc: dict[str, Any] = {}
    for _ in range(depth - 1):
        doc = {"a": doc}
    return doc


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"a": [1, 2.5, True, None, "x", {"b": []}]}, None),
        ({"n": 2**53}, None),
        ([], "policy input must be an object, not list"),
        ("x", "policy input must be an object, not str"),
        ({"s": "a\x00b"}, "policy input has a string with a NUL character"),
        ({"a\x00": 1}, "policy input has a string with a NUL character"),
        ({"s": "\ud800"}, "policy input has a string that is not valid Unicode"),
        ({"n": 2**53 + 1}, "policy input has an integer out of range (9007199254740993)"),
        ({"n": -(2**64)}, "policy input has an integer out of range (-18446744073709551616)"),
        ({"f": 2.34e-265}, "policy input has a number out of range (2.34e-265)"),
        ({"f": 1e-9}, None),
        ({"f": math.inf}, "policy input has a non-finite number"),
        ({"f": math.nan}, "policy input has a non-finite number"),
        ({1: "x"}, "policy input has a non-string key 1"),
        ({"b": b"bytes"}, "policy input has a value of type bytes"),
        ({"s": {1, 2}}, "policy input has a value of type set"),
        (_nested(MAX_INPUT_DEPTH), None),
        (_nested(MAX_INPUT_DEPTH + 1), f"policy input is nested deeper than {MAX_INPUT_DEPTH}"),
        ({"l": [0] * MAX_INPUT_NODES}, f"policy input has more than {MAX_INPUT_NODES} values"),
    ],
    ids=[
        "plain-json",
        "largest-int",
        "list",
        "string",
        "nul-value",
        "nul-key",
        "surrogate",
        "int-too-big",
        "int-too-small",
        "float-too-tiny",
        "smallest-float",
        "inf",
        "nan",
        "int-key",
        "bytes",
        "set",
        "deep-ok",
        "too-deep",
        "too-many",
    ],
)
def test_check_policy_input(doc: object, problem: str | None) -> None:
    """Documents some Rego engines would misread are rejected with the reason; plain JSON passes."""
    assert check_policy_input(doc) == problem


# --- parse_decision -----------------------------------------------------------------------

LIMITS = {"timeout_s": 30, "network": False}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "policy engine error: data.mcp.decision is undefined"),
        ([], "malformed policy decision: expected an object, got list"),
        ("allow", "malformed policy decision: expected an object, got str"),
        (True, "malformed policy decision: expected an object, got bool"),
        ({}, "malformed policy decision: allow is not a boolean"),
        (
            {"allow": "true", "deny_reasons": []},
            "malformed policy decision: allow is not a boolean",
        ),
        ({"allow": 1, "deny_reasons": []}, "malformed policy decision: allow is not a boolean"),
        ({"allow": True}, "malformed policy decision: deny_reasons is not a list of strings"),
        (
            {"allow": True, "deny_reasons": "none"},
            "malformed policy decision: deny_reasons is not a list of strings",
        ),
        (
            {"allow": False, "deny_reasons": ["x", 3]},
            "malformed policy decision: deny_reasons is not a list of strings",
        ),
        (
            {"allow": True, "deny_reasons": [], "warnings": [None]},
            "malformed policy decision: warnings is not a list of strings",
        ),
        (
            {"allow": True, "deny_reasons": [], "warnings": "w"},
            "malformed policy decision: warnings is not a list of strings",
        ),
        (
            {"allow": True, "deny_reasons": [], "limits": []},
            "malformed policy decision: limits is not an object",
        ),
        (
            {"allow": True, "deny_reasons": [], "limits": {1: 2}},
            "malformed policy decision: limits is not an object",
        ),
        (
            {"allow": True, "deny_reasons": ["but no"]},
            "malformed policy decision: allow with deny reasons",
        ),
        ({"allow": False, "deny_reasons": []}, "denied by policy (no reason given)"),
    ],
    ids=[
        "undefined",
        "list",
        "string",
        "bool",
        "empty",
        "allow-string",
        "allow-int",
        "reasons-missing",
        "reasons-string",
        "reasons-mixed",
        "warnings-none-item",
        "warnings-string",
        "limits-list",
        "limits-int-key",
        "allow-with-reasons",
        "deny-without-reason",
    ],
)
def test_parse_decision_fails_closed(raw: object, reason: str) -> None:
    """Every malformed or contradictory decision becomes a deny whose first reason says why."""
    decision = parse_decision(raw, "test")
    assert decision.allow is False
    assert decision.deny_reasons[0] == reason
    assert decision.engine == "test"


def test_parse_decision_allow() -> None:
    """A well-formed allow keeps its warnings and limits."""
    raw = {"allow": True, "deny_reasons": [], "warnings": ["w"], "limits": LIMITS}
    assert parse_decision(raw, "e") == Decision(
        allow=True, warnings=("w",), limits=LIMITS, engine="e"
    )


def test_parse_decision_deny() -> None:
    """A well-formed deny keeps its reasons in order; warnings and limits are optional."""
    decision = parse_decision({"allow": False, "deny_reasons": ["b", "a"]}, "e")
    assert decision == Decision(allow=False, deny_reasons=("b", "a"), engine="e")


def test_parse_decision_does_not_share_limits() -> None:
    """The decision owns a copy of the limits object."""
    limits = {"timeout_s": 1}
    decision = parse_decision({"allow": True, "deny_reasons": [], "limits": limits}, "e")
    limits["timeout_s"] = 99
    assert decision.limits == {"timeout_s": 1}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
DECISIONISH = st.fixed_dictionaries(
    {},
    optional={
        "allow": st.booleans() | JSON,
        "deny_reasons": st.lists(st.text(max_size=8), max_size=3) | JSON,
        "warnings": st.lists(st.text(max_size=8), max_size=3) | JSON,
        "limits": st.dictionaries(st.text(max_size=8), JSON, max_size=3) | JSON,
    },
)


@given(raw=JSON | DECISIONISH)
def test_parse_decision_never_raises_and_denials_explain(raw: object) -> None:
    """For any JSON value the result is a Decision; an allow has no reasons, a deny has some."""
    decision = parse_decision(raw, "h")
    assert isinstance(decision, Decision)
    assert all(isinstance(r, str) for r in decision.deny_reasons)
    assert all(isinstance(w, str) for w in decision.warnings)
    if decision.allow:
        assert decision.deny_reasons == ()
        assert isinstance(raw, dict)
        assert raw["allow"] is True
    else:
        assert decision.deny_reasons
