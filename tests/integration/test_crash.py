"""Crash safety: kill -9 the gateway mid-task; every task is accounted for after restart."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gateway.audit import verify_file
from gateway.client import Client
from tests.conftest import USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def sandbox_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if marker in line and "ps -eo" not in line]


def test_kill9_then_restart_accounts_for_every_task(tmp_path: Path, state_dir: Path) -> None:
    """Running tasks become FAILED with a reason, finished ones keep results, chain verifies."""
    gw = GatewayProcess(make_config(state_dir), tmp_path)
    gw.start()
    marker = "4242.5"  # a sleep duration no other process on the box uses
    try:
        with Client(gw.url, USERS["alice"][0]) as client:
            done = client.execute("echo", ["before crash"], wait=True)
            assert done["state"] == "COMPLETED"
            running = [client.execute("sleep", [marker], timeout=600)["task_id"] for _ in range(3)]
            for _ in range(100):
                if all(client.status(t)["state"] == "RUNNING" for t in running):
                    break
                time.sleep(0.05)
        gw.kill9()
        # Sandboxes die with the gateway (--die-with-parent); one caught while
        # bwrap waited on --block-fd can outlive it, and the restarted gateway
        # kills it before serving (kill_orphans).
        gw.start()
        assert sandbox_processes(marker) == []
        with Client(gw.url, USERS["alice"][0]) as client:
            after = client.status(done["task_id"], output=True)
            assert after["state"] == "COMPLETED"
            assert after["stdout"] == "before crash\n"
            for task_id in running:
                status = client.status(task_id)
                assert status["state"] == "FAILED"
                assert "stopped while the task was running" in status["reason"]
    finally:
        gw.stop()
    result = verify_file(state_dir / "audit.log")
    assert result.ok, result
