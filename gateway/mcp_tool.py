"""What an MCP tool is: its arguments model, schemas, hints and result shapes.

The tool modules (:mod:`gateway.mcp_files`, :mod:`gateway.mcp_commands`)
build :class:`Tool` values from these pieces; :mod:`gateway.mcp` only
dispatches to them.  A tool returns a ``CallToolResult`` dictionary; an
:class:`~gateway.errors.McpError` it raises becomes a result with
``isError: true`` (see :func:`tool_error`), never a protocol error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from gateway.errors import McpError
from gateway.models import Subject
from gateway.service import Gateway, RequestContext
from gateway.workspace import ROOT, normalize_path

#: Where the sandbox mounts the caller's workspace; tools accept paths below it.
WORKSPACE = "/workspace"

STRICT = ConfigDict(extra="forbid", strict=True)

Result = dict[str, Any]

#: The output schema of tools whose structured result is ``{"content": text}``
#: (the reference filesystem server's shape).
TEXT_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "string"}},
    "required": ["content"],
}


#: Sends ``notifications/progress``: (progress, total or None, message).
Progress = Callable[[float, float | None, str], Awaitable[None]]


@dataclass(slots=True)
class ToolCall:
    """One ``tools/call``: who asks, through which request, on which gateway.

    ``progress`` is set when the client asked for progress (``_meta.progressToken``)
    and the answer is a stream that can carry it.
    """

    request: web.Request
    gateway: Gateway
    subject: Subject
    ctx: RequestContext
    progress: Progress | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    args: type[BaseModel]
    run: Callable[[ToolCall, Any], Awaitable[Result]]
    annotations: dict[str, bool]
    output_schema: dict[str, Any] | None = None
    #: Policy actions a call needs; the tool list shows only tools whose
    #: actions the subject may perform (see :mod:`gateway.mcp`).
    actions: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "inputSchema": schema(self.args),
            "annotations": self.annotations,
        }
        if self.output_schema is not None:
            view["outputSchema"] = self.output_schema
        return view


def schema(model: type[BaseModel]) -> dict[str, Any]:
    view = model.model_json_schema()
    view.pop("title", None)
    view.setdefault("properties", {})
    return view


def hints(
    *, read_only: bool, destructive: bool = False, idempotent: bool = True
) -> dict[str, bool]:
    return {
        "readOnlyHint": read_only,
        "destructiveHint": destructive,
        "idempotentHint": idempotent,
        "openWorldHint": False,
    }


def text_result(
    text: str, *, error: bool = False, structured: dict[str, Any] | None = None
) -> Result:
    result: Result = {"content": [{"type": "text", "text": text}], "isError": error}
    if structured is not None:
        result["structuredContent"] = structured
    return result


def content_result(text: str) -> Result:
    """Text plus the same text as ``{"content": text}`` (for :data:`TEXT_OUTPUT`)."""
    return text_result(text, structured={"content": text})


def tool_error(exc: McpError) -> Result:
    lines = [f"{exc.code}: {exc.message}"]
    if exc.field:
        lines[0] += f" (field: {exc.field})"
    lines += [f"reason: {r}" for r in exc.reasons]
    return text_result("\n".join(lines), error=True)


def ws_path(path: str, *, field: str = "path") -> str:
    """The normalized workspace-relative form of ``path`` (``/workspace/x`` or ``x``).

    ``"."`` is the workspace root.  Raises InvalidArgument naming ``field``.
    """
    if path == WORKSPACE:
        return ROOT
    return normalize_path(path.removeprefix(WORKSPACE + "/"), field=field)


def shown(rel: str) -> str:
    """How a workspace-relative path is shown to the agent: absolute under /workspace."""
    return WORKSPACE if rel in (ROOT, "") else f"{WORKSPACE}/{rel}"
