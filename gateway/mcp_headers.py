"""The routing headers of MCP revision 2026-07-28 and their agreement with the body.

Revision 2026-07-28 is stateless: no ``initialize``, no session; every
JSON-RPC message is its own POST, states its revision in
``params._meta["io.modelcontextprotocol/protocolVersion"]`` and repeats in HTTP
headers what an intermediary needs to route or authorize it without parsing
the body: ``MCP-Protocol-Version``, ``Mcp-Method`` and, for ``tools/call``,
``Mcp-Name`` (the tool).  A proxy may decide on the headers while this server
executes the body, so a header that is missing, repeated or disagrees with the
body refuses the message before anything runs (the transport answers
HeaderMismatch, -32020).  Headers sent by a client of a session revision are
held to the same agreement when present.

Pure: headers and the decoded message in, :class:`~gateway.errors.InvalidArgument`
(``field`` names the header or body field) out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from multidict import MultiMapping

from gateway.errors import InvalidArgument

STATELESS_VERSION = "2026-07-28"

VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"

META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
META_CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"

#: Methods whose ``params.name`` an ``Mcp-Name`` header must repeat (the ones
#: this server offers; resources and prompts are not served).
NAMED_METHODS = frozenset({"tools/call"})


def _meta(message: Mapping[str, Any]) -> Mapping[str, Any] | None:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, Mapping) else None
    return meta if isinstance(meta, Mapping) else None


def is_stateless(headers: MultiMapping[str], message: Mapping[str, Any]) -> bool:
    """Does the message claim revision 2026-07-28, in the header or in ``_meta``?

    Either claim is enough: the strict checks of the revision then apply, so a
    body that names the revision cannot slip past them by omitting the header.
    """
    if STATELESS_VERSION in headers.getall(VERSION_HEADER, []):
        return True
    meta = _meta(message)
    return meta is not None and META_VERSION in meta


def _one(headers: MultiMapping[str], name: str) -> str | None:
    values = headers.getall(name, [])
    if len(values) > 1:
        # Intermediaries disagree on which copy counts: refuse rather than guess.
        raise InvalidArgument(f"{name}: sent {len(values)} times, must be sent once", field=name)
    return values[0] if values else None


def check_headers(
    headers: MultiMapping[str], message: Mapping[str, Any], *, stateless: bool
) -> None:
    """Raise :class:`InvalidArgument` unless the routing headers agree with the body.

    ``stateless``: the message is of revision 2026-07-28, where the version and
    method headers (and the name header of a named method) are required;
    otherwise they are checked only when present.
    """
    version = _one(headers, VERSION_HEADER)
    method_header = _one(headers, METHOD_HEADER)
    name_header = _one(headers, NAME_HEADER)
    method = message.get("method")
    params = message.get("params")
    if stateless:
        body_version = (_meta(message) or {}).get(META_VERSION)
        if version is None:
            raise InvalidArgument(f"{VERSION_HEADER}: missing", field=VERSION_HEADER)
        if body_version is None:
            raise InvalidArgument(
                f"params._meta[{META_VERSION!r}]: missing (the {VERSION_HEADER} header "
                f"says {version!r})",
                field=f"params._meta.{META_VERSION}",
            )
        if body_version != version:
            raise InvalidArgument(
                f"{VERSION_HEADER}: {version!r} disagrees with "
                f"params._meta[{META_VERSION!r}] {body_version!r}",
                field=VERSION_HEADER,
            )
    if method_header is None:
        if stateless:
            raise InvalidArgument(f"{METHOD_HEADER}: missing", field=METHOD_HEADER)
    elif method_header != method:
        raise InvalidArgument(
            f"{METHOD_HEADER}: {method_header!r} disagrees with method {method!r}",
            field=METHOD_HEADER,
        )
    if method in NAMED_METHODS:
        name = params.get("name") if isinstance(params, Mapping) else None
        if name_header is None:
            if stateless:
                raise InvalidArgument(
                    f"{NAME_HEADER}: missing (required for {method})", field=NAME_HEADER
                )
        elif name_header != name:
            raise InvalidArgument(
                f"{NAME_HEADER}: {name_header!r} disagrees with params.name {name!r}",
                field=NAME_HEADER,
            )
    elif name_header is not None:
        raise InvalidArgument(
            f"{NAME_HEADER}: not expected for method {method!r}", field=NAME_HEADER
        )


def check_client_meta(params: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidArgument` unless a request of revision 2026-07-28 says
    who the client is and what it can do (it has no ``initialize`` to say it once)."""
    meta = params.get("_meta")
    if not isinstance(meta, Mapping):
        raise InvalidArgument("params._meta: must be an object", field="params._meta")
    info = meta.get(META_CLIENT_INFO)
    field = f"params._meta.{META_CLIENT_INFO}"
    if not isinstance(info, Mapping):
        raise InvalidArgument(f"{field}: must be an object", field=field)
    for key in ("name", "version"):
        if not isinstance(info.get(key), str):
            raise InvalidArgument(f"{field}.{key}: must be a string", field=f"{field}.{key}")
    field = f"params._meta.{META_CLIENT_CAPABILITIES}"
    if not isinstance(meta.get(META_CLIENT_CAPABILITIES), Mapping):
        raise InvalidArgument(f"{field}: must be an object", field=field)
