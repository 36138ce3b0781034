"""The filesystem tools, under the names and shapes of the reference MCP filesystem server.

Every tool works on the caller's workspace (shown as ``/workspace``) through
:class:`~gateway.service.Gateway` file methods, so each read, list, write or
move is decided by policy and audited like its REST and gRPC counterparts.
Structured results are ``{"content": text}`` as in the reference server,
except where a richer shape is documented (``read_media_file``,
``get_file_info``).
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import posixpath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from gateway.edits import Edit, apply_edits, fenced, normalize_newlines, unified_diff
from gateway.errors import FailedPrecondition, InvalidArgument, McpError
from gateway.globs import compile_glob, excluded
from gateway.mcp_tool import (
    STRICT,
    TEXT_OUTPUT,
    WORKSPACE,
    Result,
    Tool,
    ToolCall,
    content_result,
    hints,
    shown,
    text_result,
    ws_path,
)
from gateway.service import Walk
from gateway.workspace import ROOT, FileEntry

#: Extensions read_media_file knows; anything else is application/octet-stream.
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".svg": "image/svg+xml",
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".ogg": "audio/ogg",
    ".flac": "audio/flac",
}
MAX_MULTIPLE_FILES = 64

_PathField = Annotated[StrictStr, Field(description="path below /workspace (or relative to it)")]
_Patterns = Annotated[
    list[StrictStr],
    Field(max_length=64, description="glob patterns of paths to leave out"),
]


class PathArgs(BaseModel):
    model_config = STRICT
    path: _PathField


class ReadTextFileArgs(PathArgs):
    head: Annotated[StrictInt | None, Field(ge=0, description="only the first N lines")] = None
    tail: Annotated[StrictInt | None, Field(ge=0, description="only the last N lines")] = None


class ReadMultipleFilesArgs(BaseModel):
    model_config = STRICT
    paths: Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_MULTIPLE_FILES)]


class WriteFileArgs(PathArgs):
    content: StrictStr


class EditArgs(BaseModel):
    model_config = STRICT
    oldText: Annotated[StrictStr, Field(description="text to search for (exact, or whole lines)")]  # noqa: N815
    newText: Annotated[StrictStr, Field(description="text to put in its place")]  # noqa: N815


class EditFileArgs(PathArgs):
    edits: Annotated[list[EditArgs], Field(min_length=1, max_length=256)]
    dryRun: Annotated[  # noqa: N815
        StrictBool, Field(description="preview the diff without writing")
    ] = False


class ListWithSizesArgs(PathArgs):
    sortBy: Annotated[  # noqa: N815
        Literal["name", "size"], Field(description="sort by name or by size (largest first)")
    ] = "name"


class DirectoryTreeArgs(PathArgs):
    excludePatterns: _Patterns = []  # noqa: N815


class MoveFileArgs(BaseModel):
    model_config = STRICT
    source: _PathField
    destination: _PathField


class SearchFilesArgs(PathArgs):
    pattern: Annotated[
        StrictStr,
        Field(
            min_length=1,
            description="glob relative to path: '*.py' here, '**/*.py' at any depth",
        ),
    ]
    excludePatterns: _Patterns = []  # noqa: N815


class NoArgs(BaseModel):
    model_config = STRICT


# -- helpers --------------------------------------------------------------------------


def _kind(entry: FileEntry) -> str:
    return "[DIR]" if entry.type == "dir" else "[FILE]"


def format_size(size: int) -> str:
    """Sizes as the reference server prints them: ``512 B``, ``1.50 KB``..."""
    units = ("B", "KB", "MB", "GB", "TB")
    if size <= 0:
        return "0 B"
    power = min(int(math.log(size, 1024)), len(units) - 1)
    if power == 0:
        return f"{size} B"
    return f"{size / 1024**power:.2f} {units[power]}"


def _relative(start: str, rel: str) -> str:
    return rel if start == ROOT else rel[len(start) + 1 :]


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat()


async def _walk(call: ToolCall, start: str, patterns: list[str]) -> Walk:
    for index, pattern in enumerate(patterns):
        compile_glob(pattern, field=f"excludePatterns[{index}]")
    return await call.gateway.walk(
        call.subject,
        start,
        call.ctx,
        skip=lambda rel: excluded(patterns, _relative(start, rel)),
    )


def _walk_notes(walk: Walk) -> list[str]:
    notes = [f"(not listed, denied by policy: {shown(d)})" for d in walk.denied]
    if walk.truncated:
        notes.append("(truncated: too many entries)")
    return notes


# -- tools ----------------------------------------------------------------------------


async def read_text_file(call: ToolCall, args: ReadTextFileArgs) -> Result:
    if args.head is not None and args.tail is not None:
        raise InvalidArgument("give either head or tail, not both", field="head")
    data = await call.gateway.read_file(call.subject, ws_path(args.path), call.ctx)
    text = data.decode("utf-8", errors="replace")
    if args.head is not None:
        text = "".join(text.splitlines(keepends=True)[: args.head])
    elif args.tail is not None:
        text = "".join(text.splitlines(keepends=True)[-args.tail :]) if args.tail else ""
    return content_result(text)


async def read_media_file(call: ToolCall, args: PathArgs) -> Result:
    rel = ws_path(args.path)
    data = await call.gateway.read_file(call.subject, rel, call.ctx)
    mime = MEDIA_TYPES.get(posixpath.splitext(rel)[1].lower(), "application/octet-stream")
    encoded = base64.b64encode(data).decode("ascii")
    kind = mime.split("/", 1)[0] if mime.startswith(("image/", "audio/")) else "blob"
    item: dict[str, Any] = {"type": kind, "data": encoded, "mimeType": mime}
    if kind == "blob":
        # MCP content has no "blob" type: other bytes go out as an embedded resource.
        block: dict[str, Any] = {
            "type": "resource",
            "resource": {"uri": f"file://{shown(rel)}", "mimeType": mime, "blob": encoded},
        }
    else:
        block = item
    return {"content": [block], "structuredContent": {"content": [item]}, "isError": False}


async def read_multiple_files(call: ToolCall, args: ReadMultipleFilesArgs) -> Result:
    parts = []
    for path in args.paths:
        try:
            data = await call.gateway.read_file(call.subject, ws_path(path), call.ctx)
        except McpError as exc:
            parts.append(f"{path}: Error - {exc.code}: {exc.message}")
            continue
        parts.append(f"{path}:\n{data.decode('utf-8', errors='replace')}\n")
    return content_result("\n---\n".join(parts))


async def write_file(call: ToolCall, args: WriteFileArgs) -> Result:
    rel = ws_path(args.path)
    await call.gateway.write_file(call.subject, rel, args.content.encode(), call.ctx)
    return content_result(f"Successfully wrote to {args.path}")


async def edit_file(call: ToolCall, args: EditFileArgs) -> Result:
    rel = ws_path(args.path)
    data = await call.gateway.read_file(call.subject, rel, call.ctx)
    try:
        before = normalize_newlines(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise FailedPrecondition(f"{args.path!r} is not UTF-8 text; it cannot be edited") from None
    after = apply_edits(before, [Edit(e.oldText, e.newText) for e in args.edits])
    diff = fenced(unified_diff(shown(rel), before, after))
    if not args.dryRun:
        info = await call.gateway.stat_file(call.subject, rel, call.ctx)
        await call.gateway.write_file(call.subject, rel, after.encode(), call.ctx, mode=info.mode)
    return content_result(diff)


async def create_directory(call: ToolCall, args: PathArgs) -> Result:
    await call.gateway.make_directory(call.subject, ws_path(args.path), call.ctx)
    return content_result(f"Successfully created directory {args.path}")


async def list_directory(call: ToolCall, args: PathArgs) -> Result:
    entries = await call.gateway.list_files(call.subject, ws_path(args.path), call.ctx)
    lines = [f"{_kind(e)} {e.name}" for e in entries]
    if entries.truncated:
        lines.append("(truncated: too many entries)")
    return content_result("\n".join(lines))


async def list_directory_with_sizes(call: ToolCall, args: ListWithSizesArgs) -> Result:
    entries = list(await call.gateway.list_files(call.subject, ws_path(args.path), call.ctx))
    if args.sortBy == "size":
        entries.sort(key=lambda e: -e.size)
    lines = [
        f"{_kind(e)} {e.name:<30} {'' if e.type == 'dir' else format_size(e.size):>10}"
        for e in entries
    ]
    files = [e for e in entries if e.type != "dir"]
    lines += [
        "",
        f"Total: {len(files)} files, {len(entries) - len(files)} directories",
        f"Combined size: {format_size(sum(e.size for e in files))}",
    ]
    return content_result("\n".join(lines))


async def directory_tree(call: ToolCall, args: DirectoryTreeArgs) -> Result:
    start = ws_path(args.path)
    walk = await _walk(call, start, args.excludePatterns)
    root: list[dict[str, Any]] = []
    children: dict[str, list[dict[str, Any]]] = {start: root}
    for rel, entry in walk.entries:
        node: dict[str, Any] = {
            "name": entry.name,
            "type": "directory" if entry.type == "dir" else "file",
        }
        if entry.type == "dir":
            node["children"] = children[rel] = []
        parent = posixpath.dirname(rel) or ROOT
        children[parent].append(node)
    text = json.dumps(root, indent=2, ensure_ascii=False)
    return content_result("\n".join([text, *_walk_notes(walk)]))


async def move_file(call: ToolCall, args: MoveFileArgs) -> Result:
    source = ws_path(args.source, field="source")
    destination = ws_path(args.destination, field="destination")
    await call.gateway.move_file(call.subject, source, destination, call.ctx)
    return content_result(f"Successfully moved {args.source} to {args.destination}")


async def search_files(call: ToolCall, args: SearchFilesArgs) -> Result:
    start = ws_path(args.path)
    pattern = compile_glob(args.pattern)
    walk = await _walk(call, start, args.excludePatterns)
    found = [shown(rel) for rel, _ in walk.entries if pattern.fullmatch(_relative(start, rel))]
    text = "\n".join(found) if found else "No matches found"
    return content_result("\n".join([text, *_walk_notes(walk)]))


_INFO_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "content": {"type": "string"},
        "path": {"type": "string"},
        "type": {"type": "string", "enum": ["file", "dir", "symlink", "other"]},
        "size": {"type": "integer"},
        "mode": {"type": "string"},
        "mtime": {"type": "number"},
        "atime": {"type": "number"},
        "ctime": {"type": "number"},
    },
    "required": ["content", "path", "type", "size", "mode", "mtime"],
}


async def get_file_info(call: ToolCall, args: PathArgs) -> Result:
    rel = ws_path(args.path)
    entry = await call.gateway.stat_file(call.subject, rel, call.ctx)
    # Linux stat has no birth time; "created" is the inode change time.
    lines = {
        "size": entry.size,
        "created": _iso(entry.ctime),
        "modified": _iso(entry.mtime),
        "accessed": _iso(entry.atime),
        "isDirectory": str(entry.type == "dir").lower(),
        "isFile": str(entry.type == "file").lower(),
        "permissions": f"{entry.mode:03o}",
    }
    text = "\n".join(f"{k}: {v}" for k, v in lines.items())
    structured = {
        "content": text,
        "path": shown(rel),
        "type": entry.type,
        "size": entry.size,
        "mode": f"{entry.mode:o}",
        "mtime": entry.mtime,
        "atime": entry.atime,
        "ctime": entry.ctime,
    }
    return text_result(text, structured=structured)


async def list_allowed_directories(call: ToolCall, args: NoArgs) -> Result:
    return content_result(f"Allowed directories:\n{WORKSPACE}")


_READ = hints(read_only=True)
_MEDIA_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "content": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["image", "audio", "blob"]},
                    "data": {"type": "string"},
                    "mimeType": {"type": "string"},
                },
                "required": ["type", "data", "mimeType"],
            },
        }
    },
    "required": ["content"],
}

FILE_TOOLS: tuple[Tool, ...] = (
    Tool(
        "read_text_file",
        "Read a file of the workspace as UTF-8 text (invalid bytes replaced); head or tail "
        "limit it to the first or last N lines.",
        ReadTextFileArgs,
        read_text_file,
        _READ,
        TEXT_OUTPUT,
        ("file.read",),
    ),
    Tool(
        "read_media_file",
        "Read an image or audio file of the workspace: base64 data and its MIME type.",
        PathArgs,
        read_media_file,
        _READ,
        _MEDIA_OUTPUT,
        ("file.read",),
    ),
    Tool(
        "read_multiple_files",
        "Read several text files at once; each comes with its path, and a failed read "
        "(missing, denied) is reported in place without failing the others.",
        ReadMultipleFilesArgs,
        read_multiple_files,
        _READ,
        TEXT_OUTPUT,
        ("file.read",),
    ),
    Tool(
        "write_file",
        "Create a file or replace it entirely (atomically); the parent directory must exist.",
        WriteFileArgs,
        write_file,
        hints(read_only=False, destructive=True, idempotent=True),
        TEXT_OUTPUT,
        ("file.write",),
    ),
    Tool(
        "edit_file",
        "Replace text in a file: each edit's oldText (exact, or the same lines ignoring "
        "indentation) becomes newText, in order. Returns a git-style diff; dryRun only "
        "previews it.",
        EditFileArgs,
        edit_file,
        hints(read_only=False, destructive=True, idempotent=False),
        TEXT_OUTPUT,
        ("file.read", "file.write"),
    ),
    Tool(
        "create_directory",
        "Create a directory and any missing parents; succeeds if it already exists.",
        PathArgs,
        create_directory,
        hints(read_only=False, destructive=False, idempotent=True),
        TEXT_OUTPUT,
        ("file.write",),
    ),
    Tool(
        "list_directory",
        "List a directory as lines '[FILE] name' and '[DIR] name'.",
        PathArgs,
        list_directory,
        _READ,
        TEXT_OUTPUT,
        ("file.list",),
    ),
    Tool(
        "list_directory_with_sizes",
        "List a directory with file sizes and a summary; sortBy 'name' or 'size'.",
        ListWithSizesArgs,
        list_directory_with_sizes,
        _READ,
        TEXT_OUTPUT,
        ("file.list",),
    ),
    Tool(
        "directory_tree",
        "The tree below a directory as JSON: [{name, type: file|directory, children}] "
        "(children only for directories); excludePatterns leave paths out.",
        DirectoryTreeArgs,
        directory_tree,
        _READ,
        TEXT_OUTPUT,
        ("file.list",),
    ),
    Tool(
        "move_file",
        "Move or rename a file or directory within the workspace; fails if the destination exists.",
        MoveFileArgs,
        move_file,
        hints(read_only=False, destructive=True, idempotent=False),
        TEXT_OUTPUT,
        ("file.delete", "file.write"),
    ),
    Tool(
        "search_files",
        "Find files and directories below path whose path relative to it matches a glob "
        "('*.py' directly in it, '**/*.py' at any depth); returns /workspace paths.",
        SearchFilesArgs,
        search_files,
        _READ,
        TEXT_OUTPUT,
        ("file.list",),
    ),
    Tool(
        "get_file_info",
        "Size, times, type and permissions of a file or directory (symlinks not followed).",
        PathArgs,
        get_file_info,
        _READ,
        _INFO_OUTPUT,
        ("file.read",),
    ),
    Tool(
        "list_allowed_directories",
        "The directories this server may access: the caller's workspace, /workspace.",
        NoArgs,
        list_allowed_directories,
        _READ,
        TEXT_OUTPUT,
    ),
)
