"""HA in the gateway itself: the VRRP role in /ready and /metrics, LOST tasks of a peer.

A real gateway on loopback (real bwrap, embedded policy) configured as node
``n2`` of a pair with ``n1``; the role file is the one keepalived's notify hook
(roles/keepalived) writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.client import AsyncClient
from gateway.errors import FailedPrecondition, NotFound
from gateway.ha import TaskIds
from tests.conftest import USERS, make_config
from tests.integration.conftest import Api

pytestmark = pytest.mark.integration


@pytest.fixture
async def node(state_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[Api, Path]]:
    role_file = tmp_path / "vrrp-state"
    role_file.write_text("backup 1764700000\n")
    config = make_config(
        state_dir,
        ha={"node_name": "n2", "peers": ["n1"], "vrrp_state_file": str(role_file),
            "poll_interval_s": 0.05},
    )  # fmt: skip
    server = TestServer(build_app(config), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield Api(server, session, state_dir), role_file
    await server.close()


async def wait_role(api: Api, role: str) -> dict[str, object]:
    for _ in range(100):
        status, body = await api.call("GET", "/ready", None)
        assert status == 200, body
        if body["checks"]["vrrp"]["role"] == role:
            return dict(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"/ready never reported role {role}: {body}")


async def test_ready_and_metrics_report_the_vrrp_role(node: tuple[Api, Path]) -> None:
    api, role_file = node
    await wait_role(api, "backup")
    role_file.write_text("master 1764700001\n")
    body = await wait_role(api, "master")
    assert body["ready"] is True  # the role is information: readiness does not depend on it
    status, metrics = await api.call("GET", "/metrics", None)
    assert status == 200
    assert b'mcp_vrrp_role{role="master"} 1.0' in metrics
    assert b'mcp_vrrp_role{role="backup"} 0.0' in metrics


async def test_tasks_started_here_carry_this_nodes_tag(node: tuple[Api, Path]) -> None:
    api, _ = node
    task = await api.run("echo", "hi")
    assert task["task_id"].startswith(TaskIds("n2").tag)
    status, body = await api.call("GET", f"/v1/tasks/{task['task_id']}")
    assert status == 200, body


async def test_a_peer_task_is_reported_lost_not_missing(node: tuple[Api, Path]) -> None:
    api, _ = node
    peer_task = TaskIds("n1").new()
    status, body = await api.call("GET", f"/v1/tasks/{peer_task}")
    assert status == 409, body
    assert body["error"]["code"] == "FAILED_PRECONDITION"
    assert body["error"]["field"] == "task_id"
    assert body["error"]["reasons"] == ["task_state=LOST", "node=n1"]
    assert "started on n1" in body["error"]["message"]
    status, body = await api.call("POST", f"/v1/tasks/{peer_task}/cancel")
    assert status == 409, body
    status, body = await api.call("GET", f"/v1/tasks/{peer_task}/output")
    assert status == 409, body
    # One of this node's own ids that does not exist stays a plain NOT_FOUND.
    status, body = await api.call("GET", f"/v1/tasks/{TaskIds('n2').new()}")
    assert status == 404, body
    # The client library surfaces the reasons.
    async with AsyncClient(api.url("/"), USERS["alice"][0]) as client:
        with pytest.raises(FailedPrecondition) as lost:
            await client.status(peer_task)
        assert "task_state=LOST" in lost.value.reasons
        with pytest.raises(NotFound):
            await client.status(TaskIds("n2").new())
