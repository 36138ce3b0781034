"""Pure pieces of the core: how limits are granted, how errors map to HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import errors
from gateway.config import LimitsConfig
from gateway.models import CommandSpec
from gateway.sandbox import is_orphan_sandbox
from gateway.service import grant_limits

pytestmark = pytest.mark.unit

CAPS = LimitsConfig(timeout_s=30, max_timeout_s=600, memory_bytes=512 << 20, pids=128)


@pytest.mark.parametrize(
    ("timeout", "network", "granted", "expect"),
    [
        (10, False, {}, {"timeout_s": 10, "memory_bytes": 512 << 20, "network": False}),
        (100, False, {"timeout_s": 30}, {"timeout_s": 30}),
        (10, False, {"memory_bytes": 1 << 40}, {"memory_bytes": 512 << 20}),
        (10, False, {"memory_bytes": 64 << 20, "pids": 16}, {"memory_bytes": 64 << 20, "pids": 16}),
        (10, True, {"network": True}, {"network": True}),
        (10, True, {}, {"network": False}),
        (10, False, {"network": True}, {"network": False}),
        (10, False, {"pids": "lots", "timeout_s": -1, "cpu_seconds": True}, {"pids": 128}),
    ],
)
def test_grant_limits(
    timeout: float, network: bool, granted: dict[str, Any], expect: dict[str, Any]
) -> None:
    """Policy limits only lower the caps; network needs request and grant; junk is ignored."""
    spec = CommandSpec(name="true", timeout_s=timeout, network=network)
    limits = grant_limits(CAPS, spec, granted)
    for key, value in expect.items():
        assert getattr(limits, key) == value, key


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.InvalidArgument, 400),
        (errors.Unauthenticated, 401),
        (errors.PermissionDenied, 403),
        (errors.NotFound, 404),
        (errors.FailedPrecondition, 409),
        (errors.PayloadTooLarge, 413),
        (errors.ResourceExhausted, 429),
        (errors.Unavailable, 503),
        (errors.DeadlineExceeded, 504),
        (errors.Internal, 500),
    ],
)
def test_every_code_maps_once_and_round_trips(cls: type[errors.McpError], status: int) -> None:
    """Each error class has one HTTP status and survives to_dict/from_dict."""
    err = cls("boom", field="f", reasons=["r"], retry_after=2.0)
    assert err.http_status == status
    back = errors.from_dict(err.to_dict())
    assert type(back) is cls
    assert (back.message, back.field, back.reasons, back.retry_after) == ("boom", "f", ["r"], 2.0)


def test_every_code_has_a_class() -> None:
    """No code is left without a class or a status."""
    assert set(errors.BY_CODE) == set(errors.ErrorCode) == set(errors.HTTP_STATUS)


def test_unknown_code_becomes_internal() -> None:
    """A body with an unknown code is read as INTERNAL, not a crash."""
    assert isinstance(errors.from_dict({"error": {"code": "NOPE"}}), errors.Internal)


@pytest.mark.parametrize(
    ("cmdline", "orphan"),
    [
        (
            ["/usr/bin/bwrap", "--bind", "/srv/state/workspaces/alice", "/workspace", "--", "x"],
            True,
        ),
        (["/usr/bin/bwrap", "--bind", "/srv/other/alice", "/workspace"], False),
        (["/usr/bin/bwrap", "--bind", "/srv/state/workspaces-x/a", "/workspace"], False),
        (["/usr/bin/bwrap", "--bind", "/srv/state/workspaces/alice", "/elsewhere"], False),
        (["/bin/bwrap", "--bind", "/srv/state/workspaces/alice", "/workspace"], False),
        (["sleep", "--bind", "/srv/state/workspaces/alice", "/workspace"], False),
        ([], False),
    ],
)
def test_orphan_sandbox_matching(cmdline: list[str], orphan: bool) -> None:
    """Only our bwrap, bound to a workspace of this state directory, counts as an orphan."""
    assert is_orphan_sandbox(cmdline, "/usr/bin/bwrap", "/srv/state/workspaces") is orphan
