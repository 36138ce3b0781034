"""The VRRP role file and node-tagged task ids (gateway/ha.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gateway.errors import ErrorCode
from gateway.ha import TaskIds, VrrpRole, node_tag, parse_state
from gateway.metrics import Metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("master 1764700000\n", "master"),
        ("BACKUP\n", "backup"),
        ("fault 1", "fault"),
        ("stop 1", "unknown"),
        ("", "unknown"),
        ("\x00garbage", "unknown"),
    ],
)
def test_parse_state(text: str, role: str) -> None:
    assert parse_state(text) == role


def role_metric(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^mcp_vrrp_role\{role="(\w+)"\} (\S+)$', text, re.M)
    }


def test_the_role_follows_the_file_and_is_exported(tmp_path: Path) -> None:
    metrics = Metrics()
    state = tmp_path / "state"
    vrrp = VrrpRole(state, metrics)
    assert vrrp.refresh() == "unknown"  # no file yet: keepalived has not reported
    assert role_metric(metrics) == {"master": 0, "backup": 0, "fault": 0, "unknown": 1}
    state.write_text("master 1764700000\n")
    assert vrrp.refresh() == "master"
    assert role_metric(metrics) == {"master": 1, "backup": 0, "fault": 0, "unknown": 0}
    state.write_text("fault 1764700001\n")
    assert vrrp.refresh() == "fault"
    assert role_metric(metrics)["fault"] == 1
    state.unlink()
    assert vrrp.refresh() == "unknown"


async def test_watching_polls_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("backup 1\n")
    vrrp = VrrpRole(state, Metrics())
    async with vrrp.watching(0.01):
        for _ in range(200):
            if vrrp.role == "backup":
                break
            await asyncio.sleep(0.01)
        assert vrrp.role == "backup"
        state.write_text("master 2\n")
        for _ in range(200):
            if vrrp.role == "master":
                break
            await asyncio.sleep(0.01)
        assert vrrp.role == "master"


def test_task_ids_carry_the_node_and_stay_32_hex_digits() -> None:
    ids = TaskIds("gw-a1", peers=["gw-a1", "gw-a2"])
    first, second = ids.new(), ids.new()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second
    assert first.startswith(node_tag("gw-a1"))
    assert ids.elsewhere(first) is None


def test_a_peer_task_is_lost_here_with_the_peer_named() -> None:
    a1, a2 = TaskIds("gw-a1", ["gw-a2"]), TaskIds("gw-a2", ["gw-a1"])
    task_id = a1.new()
    assert a2.elsewhere(task_id) == "gw-a1"
    error = a2.lost(task_id, "gw-a1")
    assert error.code is ErrorCode.FAILED_PRECONDITION
    assert error.field == "task_id"
    assert error.reasons == ["task_state=LOST", "node=gw-a1"]
    assert "gw-a1" in error.message
    assert "gw-a2" in error.message
    # An id of no known peer (another pair, or made up) is a plain NOT_FOUND.
    assert a2.elsewhere(TaskIds("gw-b1").new()) is None
    assert a2.elsewhere("0" * 32) is None
