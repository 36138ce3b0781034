"""The ``mcp-gateway`` CLI against a real gateway process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("cli")
    state = work / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), work)
    gw.start()
    yield gw
    gw.stop()


def cli(gw: GatewayProcess, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MCP_GATEWAY_URL": gw.url, "MCP_GATEWAY_TOKEN": USERS["alice"][0]}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_exec_prints_output_and_exits_with_command_code(gateway: GatewayProcess) -> None:
    """exec streams stdout/stderr to the matching streams and returns the exit code."""
    ok = cli(gateway, "exec", "--", "echo", "hello world")
    assert (ok.returncode, ok.stdout) == (0, b"hello world\n")
    failed = cli(gateway, "exec", "--", "ls", "/definitely-missing")
    assert failed.returncode == 2
    assert b"definitely-missing" in failed.stderr
    assert failed.stdout == b""


def test_exec_denied_prints_one_line(gateway: GatewayProcess) -> None:
    """A policy deny is one clear line and exit code 1, no traceback."""
    denied = cli(gateway, "exec", "--", "sh", "-c", "id")
    assert denied.returncode == 1
    assert denied.stderr.startswith(b"error: PERMISSION_DENIED:")
    assert b"Traceback" not in denied.stderr


def test_exec_timeout_exit_code(gateway: GatewayProcess) -> None:
    """A timed-out command exits 124 like timeout(1)."""
    result = cli(gateway, "exec", "--timeout", "0.5", "--", "sleep", "30")
    assert result.returncode == 124
    assert b"TIMED_OUT" in result.stderr


def test_files_put_get_ls_rm(gateway: GatewayProcess, tmp_path: Path) -> None:
    """files put/get/ls/rm round-trip binary data."""
    data = bytes(range(256))
    assert cli(gateway, "files", "put", "cli/data.bin", "--create-dirs", stdin=data).returncode == 0
    got = cli(gateway, "files", "get", "cli/data.bin")
    assert (got.returncode, got.stdout) == (0, data)
    listing = cli(gateway, "files", "ls", "cli")
    assert b"data.bin" in listing.stdout
    assert cli(gateway, "files", "rm", "cli", "--recursive").returncode == 0
    missing = cli(gateway, "files", "get", "cli/data.bin")
    assert missing.returncode == 1
    assert missing.stderr.startswith(b"error: NOT_FOUND")


def test_task_status_and_output(gateway: GatewayProcess) -> None:
    """task status/output show a finished task."""
    from gateway.client import Client

    with Client(gateway.url, USERS["alice"][0]) as client:
        task = client.execute("seq", ["3"], wait=True)
    status = cli(gateway, "task", "status", task["task_id"])
    assert b'"COMPLETED"' in status.stdout
    output = cli(gateway, "task", "output", task["task_id"])
    assert output.stdout == b"1\n2\n3\n"


def test_audit_verify(gateway: GatewayProcess) -> None:
    """audit verify accepts the live log and reports the first broken line of a tampered copy."""
    log = Path(gateway.config_path).parent / "state" / "audit.log"
    ok = cli(gateway, "audit", "verify", str(log))
    assert ok.returncode == 0, ok.stderr
    lines = log.read_bytes().splitlines(keepends=True)
    tampered = Path(gateway.config_path).parent / "tampered.log"
    tampered.write_bytes(b"".join([*lines[:1], lines[1].replace(b'"', b"'", 1), *lines[2:]]))
    bad = cli(gateway, "audit", "verify", str(tampered))
    assert bad.returncode == 1
    assert b"line 2" in bad.stderr


def test_token_hash() -> None:
    """token hash prints the SHA-256 the config stores."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", "hash"],
        input=b"dev-token\n",
        capture_output=True,
        check=True,
    )
    assert result.stdout.strip() == (
        b"c91cbbedf8c712e8e2b7517ddeca8fe4fde839ebd8339e0b2001363002b37712"
    )


def test_serve_invalid_config_names_key(tmp_path: Path) -> None:
    """serve with an invalid value exits 2 with one line naming the key."""
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  port: seventy\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"server.port" in result.stderr
    assert b"Traceback" not in result.stderr


def test_serve_refuses_to_start_without_working_sandbox(tmp_path: Path) -> None:
    """Fail closed: with a bwrap that cannot work, serve exits 1 and never listens."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state, sandbox={"bwrap": str(fake)}), tmp_path)
    with pytest.raises(RuntimeError, match="gateway exited"):
        gw.start(timeout=30)
    assert gw.proc is not None
    assert gw.proc.returncode == 1
    assert b"gateway failed to start" in gw.log_path.read_bytes()


ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_policy_check_and_test_wrap_opa() -> None:
    """policy check/test run opa check --strict and opa test on the shipped policies."""
    opa = ROOT / ".tools" / "bin" / "opa"
    assert opa.exists(), "run `make opa` first"
    check = run_cli("policy", "check", "--dir", "policies", "--opa", str(opa))
    assert check.returncode == 0, check.stderr
    assert b"compiles" in check.stdout
    tested = run_cli("policy", "test", "--dir", "policies", "--opa", str(opa))
    assert tested.returncode == 0, tested.stderr
    assert b"coverage" in tested.stdout


def test_policy_eval_against_configured_engine() -> None:
    """policy eval prints the decision of the configured engine; exit 3 on deny."""
    config = "gateway/resources/dev.yaml"
    allow_doc: dict[str, Any] = {
        "version": 1,
        "action": "command.execute",
        "subject": {"id": "dev", "roles": ["developer"], "auth": "token"},
        "command": {"name": "echo", "args": ["hi"], "cwd": "/workspace", "env": {}, "timeout": 5},
        "sandbox": {"network": "none"},
        "request": {"id": "r1", "transport": "cli", "source": ""},
    }
    allowed = run_cli("policy", "eval", "--config", config, stdin=json.dumps(allow_doc).encode())
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["allow"] is True
    deny_doc = {**allow_doc, "command": {**allow_doc["command"], "name": "sh", "args": ["-c", "x"]}}
    denied = run_cli("policy", "eval", "--config", config, stdin=json.dumps(deny_doc).encode())
    assert denied.returncode == 3
    assert json.loads(denied.stdout)["deny_reasons"]
    bad = run_cli("policy", "eval", "--config", config, stdin=b"{nope")
    assert bad.returncode == 2
    assert b"not valid JSON" in bad.stderr


def test_serve_answers_grpc_beside_rest(gateway: GatewayProcess) -> None:
    """`mcp-gateway serve` runs the gRPC service in the same process: grpcurl as in the README."""
    from tests.integration.test_grpc import _grpcurl

    created = _grpcurl(
        gateway.grpc_port,
        "-d",
        '{"command":"echo","args":["hello world"],"timeout":30,"wait":true}',
        "mcp.McpService/ExecuteCommand",
    )
    assert created["result"]["stdout"] == "hello world\n"
    health = _grpcurl(gateway.grpc_port, "grpc.health.v1.Health/Check")
    assert health["status"] == "SERVING"
