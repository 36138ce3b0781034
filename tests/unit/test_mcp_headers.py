"""The routing headers of revision 2026-07-28 against the JSON-RPC body (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.errors import InvalidArgument
from gateway.mcp_headers import META_VERSION, check_client_meta, check_headers, is_stateless

pytestmark = pytest.mark.unit

CLIENT = {
    "io.modelcontextprotocol/clientInfo": {"name": "c", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def message(method: str = "tools/call", name: Any = "shell_execute") -> dict[str, Any]:
    params: dict[str, Any] = {"_meta": {META_VERSION: "2026-07-28", **CLIENT}}
    if method == "tools/call":
        params["name"] = name
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def mirrored(body: dict[str, Any]) -> CIMultiDict[str]:
    headers = CIMultiDict({"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": body["method"]})
    if body["method"] == "tools/call":
        headers["Mcp-Name"] = body["params"]["name"]
    return headers


def test_mirrored_headers_pass() -> None:
    for body in (message(), message("tools/list"), message("server/discover")):
        check_headers(mirrored(body), body, stateless=True)


def _without(name: str) -> CIMultiDict[str]:
    headers = mirrored(message())
    del headers[name]
    return headers


def _with(name: str, value: str, *, add: bool = False) -> CIMultiDict[str]:
    headers = mirrored(message())
    if add:
        headers.add(name, value)
    else:
        headers[name] = value
    return headers


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        (_without("MCP-Protocol-Version"), "MCP-Protocol-Version"),
        (_without("Mcp-Method"), "Mcp-Method"),
        (_without("Mcp-Name"), "Mcp-Name"),
        (_with("MCP-Protocol-Version", "2025-11-25"), "MCP-Protocol-Version"),
        (_with("Mcp-Method", "tools/list"), "Mcp-Method"),
        (_with("Mcp-Method", "TOOLS/CALL"), "Mcp-Method"),
        (_with("Mcp-Name", "write_file"), "Mcp-Name"),
        (_with("Mcp-Name", "shell_execute", add=True), "Mcp-Name"),
        (_with("Mcp-Method", "tools/call", add=True), "Mcp-Method"),
        (_with("MCP-Protocol-Version", "2026-07-28", add=True), "MCP-Protocol-Version"),
    ],
)
def test_missing_repeated_or_different_header_is_refused(
    headers: CIMultiDict[str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_headers(headers, message(), stateless=True)
    assert caught.value.field == field
    assert field in caught.value.message


def test_body_version_missing_or_different() -> None:
    body = message()
    del body["params"]["_meta"][META_VERSION]
    with pytest.raises(InvalidArgument, match=META_VERSION):
        check_headers(mirrored(message()), body, stateless=True)
    body["params"]["_meta"][META_VERSION] = "2025-11-25"
    with pytest.raises(InvalidArgument, match="disagrees"):
        check_headers(mirrored(message()), body, stateless=True)


def test_name_header_only_for_named_methods() -> None:
    body = message("tools/list")
    headers = mirrored(body)
    headers["Mcp-Name"] = "x"
    with pytest.raises(InvalidArgument, match="not expected"):
        check_headers(headers, body, stateless=True)


def test_non_string_tool_name_never_matches() -> None:
    body = message(name=5)
    headers = mirrored(message())
    headers["Mcp-Name"] = "5"
    with pytest.raises(InvalidArgument, match="Mcp-Name"):
        check_headers(headers, body, stateless=True)


def test_session_revisions_check_only_what_is_sent() -> None:
    body = message()
    del body["params"]["_meta"]
    check_headers(CIMultiDict(), body, stateless=False)
    with pytest.raises(InvalidArgument, match="Mcp-Method"):
        check_headers(CIMultiDict({"Mcp-Method": "ping"}), body, stateless=False)


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        (CIMultiDict({"MCP-Protocol-Version": "2026-07-28"}), {}, True),
        (CIMultiDict(), message(), True),
        (CIMultiDict({"MCP-Protocol-Version": "2025-11-25"}), message(), True),
        (CIMultiDict({"MCP-Protocol-Version": "2025-11-25"}), {"params": {}}, False),
        (CIMultiDict(), {"params": {"_meta": {"progressToken": 1}}}, False),
        (CIMultiDict(), {"params": "x"}, False),
    ],
)
def test_is_stateless(headers: CIMultiDict[str], body: dict[str, Any], expected: bool) -> None:
    assert is_stateless(headers, body) is expected


names = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@given(method=st.sampled_from(["tools/call", "tools/list", "ping"]), name=names, other=names)
def test_any_changed_header_is_refused(method: str, name: str, other: str) -> None:
    """Mirrored headers pass; replacing any one with a different value fails."""
    body = message(method, name)
    headers = mirrored(body)
    check_headers(headers, body, stateless=True)
    for key in list(headers):
        if headers[key] == other:
            continue
        changed = copy.copy(headers)
        changed[key] = other
        with pytest.raises(InvalidArgument):
            check_headers(changed, body, stateless=True)


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        (None, "params._meta"),
        ({"io.modelcontextprotocol/clientCapabilities": {}}, "clientInfo"),
        ({**CLIENT, "io.modelcontextprotocol/clientInfo": {"name": "c"}}, "clientInfo.version"),
        ({**CLIENT, "io.modelcontextprotocol/clientCapabilities": []}, "clientCapabilities"),
    ],
)
def test_client_meta_names_the_field(meta: dict[str, Any] | None, field: str) -> None:
    params: dict[str, Any] = {} if meta is None else {"_meta": meta}
    with pytest.raises(InvalidArgument) as caught:
        check_client_meta(params)
    assert caught.value.field is not None
    assert caught.value.field.endswith(field)
    check_client_meta({"_meta": CLIENT})
