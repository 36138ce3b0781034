"""The reference filesystem tools on /mcp, driven with the official SDK client.

Every call goes through the real service layer: the embedded policy engine
decides, the audit log records, the files live in the subject's workspace.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession

from gateway.audit import verify_file
from gateway.rest import GATEWAY
from tests.integration.conftest import Api
from tests.integration.mcp_sdk import connect, text

pytestmark = pytest.mark.integration

REFERENCE_TOOLS = {
    "read_text_file",
    "read_media_file",
    "read_multiple_files",
    "write_file",
    "edit_file",
    "create_directory",
    "list_directory",
    "list_directory_with_sizes",
    "directory_tree",
    "move_file",
    "search_files",
    "get_file_info",
    "list_allowed_directories",
}
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def ok(client: ClientSession, tool: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.isError is False, text(result)
    return text(result)


def workspace(api: Api, user: str = "alice") -> Path:
    return api.server.app[GATEWAY].workspaces.path_for(user)


def audit_events(api: Api) -> list[dict[str, Any]]:
    lines = (api.state / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def test_reference_tools_are_listed_with_schemas_and_hints(api: Api) -> None:
    """All reference tools, each with an input schema, hints and (where shaped) an output schema."""
    async with connect(api) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) >= REFERENCE_TOOLS
    for name in REFERENCE_TOOLS:
        tool = tools[name]
        assert tool.annotations is not None, name
        assert tool.annotations.openWorldHint is False
        assert tool.outputSchema is not None, name
        assert tool.inputSchema["type"] == "object"
    assert tools["edit_file"].inputSchema["required"] == ["path", "edits"]
    assert tools["move_file"].inputSchema["required"] == ["source", "destination"]
    assert tools["edit_file"].annotations is not None
    assert tools["edit_file"].annotations.destructiveHint is True
    assert tools["edit_file"].annotations.idempotentHint is False
    assert tools["search_files"].annotations is not None
    assert tools["search_files"].annotations.readOnlyHint is True


async def test_read_text_file_head_tail_and_structured(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "/workspace/n.txt", "content": "1\n2\n3\n"})
        result = await client.call_tool("read_text_file", {"path": "n.txt", "tail": 1})
        assert result.structuredContent == {"content": "3\n"}
        assert await ok(client, "read_text_file", {"path": "n.txt", "head": 2}) == "1\n2\n"
        both = await client.call_tool("read_text_file", {"path": "n.txt", "head": 1, "tail": 1})
        assert both.isError is True
        assert "field: head" in text(both)


async def test_read_media_file(api: Api) -> None:
    """Images and audio come back as base64 content of their type with the MIME type."""
    (workspace(api) / "dot.png").write_bytes(PNG)
    (workspace(api) / "beep.wav").write_bytes(b"RIFF\x00\x01")
    (workspace(api) / "data.bin").write_bytes(b"\x00\xff")
    async with connect(api) as client:
        image = await client.call_tool("read_media_file", {"path": "dot.png"})
        assert image.isError is False
        (block,) = image.content
        assert block.type == "image"
        assert block.mimeType == "image/png"
        assert base64.b64decode(block.data) == PNG
        assert image.structuredContent is not None
        assert image.structuredContent["content"][0]["mimeType"] == "image/png"
        audio = await client.call_tool("read_media_file", {"path": "beep.wav"})
        assert audio.content[0].type == "audio"
        assert audio.content[0].mimeType == "audio/wav"
        other = await client.call_tool("read_media_file", {"path": "data.bin"})
        assert other.isError is False
        assert other.content[0].type == "resource"
        assert other.structuredContent is not None
        assert other.structuredContent["content"][0] == {
            "type": "blob",
            "data": base64.b64encode(b"\x00\xff").decode(),
            "mimeType": "application/octet-stream",
        }


async def test_read_multiple_files_reports_failures_in_place(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "a.txt", "content": "A"})
        await ok(client, "write_file", {"path": "b.txt", "content": "B"})
        out = await ok(
            client, "read_multiple_files", {"paths": ["a.txt", "missing.txt", "/workspace/b.txt"]}
        )
    parts = out.split("\n---\n")
    assert parts[0] == "a.txt:\nA\n"
    assert parts[1].startswith("missing.txt: Error - NOT_FOUND")
    assert parts[2] == "/workspace/b.txt:\nB\n"


async def test_edit_file_dry_run_diff_then_apply(api: Api) -> None:
    source = "def f():\n    return 1\n\n\nprint(f())\n"
    edits = [{"oldText": "return 1", "newText": "return 2"}]
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "f.py", "content": source})
        (workspace(api) / "f.py").chmod(0o600)
        preview = await ok(client, "edit_file", {"path": "f.py", "edits": edits, "dryRun": True})
        assert preview.startswith("```diff\nIndex: /workspace/f.py\n" + "=" * 67 + "\n")
        assert "--- /workspace/f.py\toriginal\n+++ /workspace/f.py\tmodified\n" in preview
        assert "@@ -1,5 +1,5 @@\n def f():\n-    return 1\n+    return 2\n" in preview
        assert await ok(client, "read_text_file", {"path": "f.py"}) == source
        # Whole lines match even with other indentation; the file's indentation wins.
        edits.append({"oldText": "  print(f())", "newText": "  print(f() + 1)"})
        applied = await ok(client, "edit_file", {"path": "f.py", "edits": edits})
        assert "+print(f() + 1)" in applied
        after = await ok(client, "read_text_file", {"path": "f.py"})
        assert after == "def f():\n    return 2\n\n\nprint(f() + 1)\n"
    assert (workspace(api) / "f.py").stat().st_mode & 0o777 == 0o600


async def test_edit_file_without_match_changes_nothing(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "g.txt", "content": "keep\n"})
        edits = [{"oldText": "keep", "newText": "x"}, {"oldText": "absent", "newText": "y"}]
        result = await client.call_tool("edit_file", {"path": "g.txt", "edits": edits})
        assert result.isError is True
        assert "edits[1]" in text(result)
        assert await ok(client, "read_text_file", {"path": "g.txt"}) == "keep\n"


async def test_directories_sizes_and_tree(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "create_directory", {"path": "src/pkg/deep"})
        await ok(client, "write_file", {"path": "src/pkg/mod.py", "content": "x" * 8192})
        await ok(client, "write_file", {"path": "src/small.txt", "content": "hi"})
        await ok(client, "create_directory", {"path": "src/node_modules/lib"})
        listing = await ok(client, "list_directory", {"path": "src"})
        assert listing.splitlines() == ["[DIR] node_modules", "[DIR] pkg", "[FILE] small.txt"]
        sized = await ok(client, "list_directory_with_sizes", {"path": "src/pkg", "sortBy": "size"})
        lines = sized.splitlines()
        assert lines[0].startswith("[FILE] mod.py")
        assert lines[0].endswith("8.00 KB")
        assert lines[1].startswith("[DIR] deep")
        assert lines[-2:] == ["Total: 1 files, 1 directories", "Combined size: 8.00 KB"]
        tree_text = await ok(
            client, "directory_tree", {"path": "src", "excludePatterns": ["node_modules"]}
        )
    assert json.loads(tree_text) == [
        {
            "name": "pkg",
            "type": "directory",
            "children": [
                {"name": "deep", "type": "directory", "children": []},
                {"name": "mod.py", "type": "file"},
            ],
        },
        {"name": "small.txt", "type": "file"},
    ]


async def test_search_files_globs_and_excludes(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "create_directory", {"path": "src"})
        await ok(client, "create_directory", {"path": "build"})
        for path in ("a.py", "src/b.py", "src/c.txt", "build/d.py"):
            await ok(client, "write_file", {"path": path, "content": ""})
        here = await ok(client, "search_files", {"path": ".", "pattern": "*.py"})
        assert here.splitlines() == ["/workspace/a.py"]
        deep = await ok(
            client,
            "search_files",
            {"path": "/workspace", "pattern": "**/*.py", "excludePatterns": ["build"]},
        )
        assert deep.splitlines() == ["/workspace/a.py", "/workspace/src/b.py"]
        none = await ok(client, "search_files", {"path": "src", "pattern": "*.rs"})
        assert none == "No matches found"
        bad = await client.call_tool("search_files", {"path": ".", "pattern": "[oops"})
        assert bad.isError is True
        assert "pattern" in text(bad)


async def test_move_file(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "one.txt", "content": "1"})
        await ok(client, "write_file", {"path": "two.txt", "content": "2"})
        moved = await ok(client, "move_file", {"source": "one.txt", "destination": "three.txt"})
        assert moved == "Successfully moved one.txt to three.txt"
        assert await ok(client, "read_text_file", {"path": "three.txt"}) == "1"
        taken = await client.call_tool(
            "move_file", {"source": "three.txt", "destination": "two.txt"}
        )
        assert taken.isError is True
        assert "already exists" in text(taken)
        assert await ok(client, "read_text_file", {"path": "two.txt"}) == "2"
        await ok(client, "create_directory", {"path": "d"})
        into = await client.call_tool("move_file", {"source": "d", "destination": "d/e"})
        assert into.isError is True
        escape = await client.call_tool("move_file", {"source": "two.txt", "destination": "../x"})
        assert escape.isError is True
        assert "destination" in text(escape)
    events = [e for e in audit_events(api) if e["event"] == "file.moved"]
    assert [(e["path"], e["destination"]) for e in events] == [("one.txt", "three.txt")]
    assert verify_file(api.state / "audit.log").ok


async def test_get_file_info_and_allowed_directories(api: Api) -> None:
    async with connect(api) as client:
        await ok(client, "write_file", {"path": "i.txt", "content": "12345"})
        info = await client.call_tool("get_file_info", {"path": "i.txt"})
        assert info.isError is False
        lines = dict(line.split(": ", 1) for line in text(info).splitlines())
        assert lines["size"] == "5"
        assert lines["isFile"] == "true"
        assert lines["isDirectory"] == "false"
        assert lines["permissions"] == "644"
        assert {"created", "modified", "accessed"} <= set(lines)
        assert info.structuredContent is not None
        assert info.structuredContent["type"] == "file"
        allowed = await ok(client, "list_allowed_directories", {})
        assert allowed.splitlines()[-1] == "/workspace"


async def test_policy_denials_are_tool_errors_with_reasons(api: Api) -> None:
    """The agent role may write under src/ but delete only under out/ and tmp/."""
    async with connect(api, "agent") as client:
        await ok(client, "create_directory", {"path": "src"})
        await ok(client, "write_file", {"path": "src/a.py", "content": "a"})
        denied = await client.call_tool("write_file", {"path": "README.md", "content": "x"})
        assert denied.isError is True
        assert "PERMISSION_DENIED" in text(denied)
        assert "reason: file write of 'README.md' is not allowed" in text(denied)
        move = await client.call_tool("move_file", {"source": "src/a.py", "destination": "tmp/a"})
        assert move.isError is True
        assert "file delete of 'src/a.py'" in text(move)
        assert await ok(client, "read_text_file", {"path": "src/a.py"}) == "a"
        edit = await client.call_tool(
            "edit_file",
            {"path": "README.md", "edits": [{"oldText": "a", "newText": "b"}]},
        )
        assert edit.isError is True
    denials = [e for e in audit_events(api) if e["event"] == "policy.decision" and not e["allow"]]
    assert {e["input"]["file"]["path"] for e in denials} >= {"README.md", "src/a.py"}


async def test_walk_skips_directories_the_policy_refuses(api: Api) -> None:
    """A protected directory (.ssh) below the start is left out, and the caller is told."""
    (workspace(api) / ".ssh").mkdir()
    (workspace(api) / ".ssh" / "id_rsa").write_text("secret")
    (workspace(api) / "ok.txt").write_text("fine")
    async with connect(api) as client:
        tree = await ok(client, "directory_tree", {"path": "."})
        found = await ok(client, "search_files", {"path": ".", "pattern": "**/id_rsa"})
    body, note = tree.rsplit("\n", 1)
    assert json.loads(body) == [
        {"name": ".ssh", "type": "directory", "children": []},
        {"name": "ok.txt", "type": "file"},
    ]
    assert note == "(not listed, denied by policy: /workspace/.ssh)"
    assert found.splitlines()[0] == "No matches found"


async def test_symlinks_are_not_followed(api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    (workspace(api) / "link").symlink_to(outside)
    async with connect(api) as client:
        read = await client.call_tool("read_text_file", {"path": "link"})
        assert read.isError is True
        assert "host secret" not in text(read)
        edit = await client.call_tool(
            "edit_file", {"path": "link", "edits": [{"oldText": "host", "newText": "x"}]}
        )
        assert edit.isError is True
        moved = await ok(client, "move_file", {"source": "link", "destination": "link2"})
        assert moved.startswith("Successfully")
    assert (workspace(api) / "link2").is_symlink()
    assert outside.read_text() == "host secret"
