"""A stdio MCP server that forwards to a gateway's ``/mcp`` (``mcp-gateway mcp-stdio``).

For MCP clients that only start local servers: the bridge speaks MCP on
stdin/stdout with the SDK's server and stdio transport, and forwards
``tools/list`` and ``tools/call`` through one SDK client session over
Streamable HTTP, authenticated with a bearer token and/or a TLS client
certificate.  Results pass through unchanged (``isError`` included); the
gateway does every check, so the bridge validates nothing itself.  Progress
(``_meta.progressToken``) is forwarded back, cancellation forward.

Nothing but protocol messages may reach stdout: logs go to stderr.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.session import ProgressFnT

from gateway import __version__
from gateway.errors import InvalidArgument

MCP_PATH = "/mcp"
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class BridgeOptions:
    """Where the gateway is and how to authenticate to it."""

    url: str
    token: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


def endpoint(url: str) -> str:
    """The ``/mcp`` URL of a gateway given its base URL or the endpoint itself (pure)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(f"url must be an http(s) URL, not {url!r}", field="url")
    path = parts.path.rstrip("/")
    if not path.endswith(MCP_PATH):
        path += MCP_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped); InvalidArgument if unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the token file: {exc}", field="token-file") from None
    if not token or any(c.isspace() for c in token):
        raise InvalidArgument("the token file must hold one token", field="token-file")
    return token


def tls_context(options: BridgeOptions) -> ssl.SSLContext | bool:
    if options.key is not None and options.cert is None:
        raise InvalidArgument("--key needs --cert", field="key")
    if options.ca is None and options.cert is None:
        return True  # httpx default: the system trust store
    try:
        context = ssl.create_default_context(cafile=str(options.ca) if options.ca else None)
        if options.cert is not None:
            key = str(options.key) if options.key else None
            context.load_cert_chain(str(options.cert), key)
    except (OSError, ssl.SSLError) as exc:
        field = "ca" if options.ca and "cafile" in str(exc).lower() else "cert"
        raise InvalidArgument(f"cannot load TLS files: {exc}", field=field) from None
    return context


def http_client(options: BridgeOptions) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    # No read timeout: a tools/call answers when its command ends, which the
    # gateway bounds by the command timeout.
    return httpx.AsyncClient(
        headers=headers,
        verify=tls_context(options),
        timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=None),
    )


@contextlib.asynccontextmanager
async def upstream(options: BridgeOptions) -> AsyncIterator[tuple[ClientSession, Any]]:
    """An initialized client session to the gateway, and its initialize result."""
    async with (
        http_client(options) as http,
        streamable_http_client(endpoint(options.url), http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        yield session, init


def bridge_server(session: ClientSession, instructions: str | None) -> Server[Any, Any]:
    """An SDK server whose tools are the gateway's, called through ``session``."""
    server: Server[Any, Any] = Server(
        "mcp-gateway-stdio", version=__version__, instructions=instructions
    )

    @server.list_tools()  # type: ignore[no-untyped-call,untyped-decorator]
    async def list_tools() -> list[types.Tool]:
        return (await session.list_tools()).tools

    @server.call_tool(validate_input=False)  # type: ignore[untyped-decorator]
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        ctx = server.request_context
        token = ctx.meta.progressToken if ctx.meta is not None else None
        forward: ProgressFnT | None = None
        if token is not None:

            async def forward(progress: float, total: float | None, message: str | None) -> None:
                await ctx.session.send_progress_notification(
                    token, progress, total, message, related_request_id=str(ctx.request_id)
                )

        # The id the client session gives the upstream request: send_request
        # takes it before its first await, so nothing can come in between.
        upstream_id = session._request_id  # no public accessor
        try:
            return await session.call_tool(name, arguments, progress_callback=forward)
        except anyio.get_cancelled_exc_class():
            # The local client cancelled: tell the gateway, which kills the command.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await session.send_notification(
                    types.ClientNotification(
                        types.CancelledNotification(
                            params=types.CancelledNotificationParams(
                                requestId=upstream_id, reason="cancelled by the local client"
                            )
                        )
                    )
                )
            raise

    return server


async def run(options: BridgeOptions) -> None:
    """Serve MCP on stdin/stdout until the client closes it."""
    async with upstream(options) as (session, init):
        server = bridge_server(session, init.instructions)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
