"""MCP authorization: JWT access tokens of an authorization server, RFC 9728 metadata.

A real gateway on a loopback port with ``auth.oauth`` configured; tokens are
signed in the test with keys whose public half is the gateway's JWKS.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.app import build_app
from tests.conftest import make_config
from tests.integration.mcp_sdk import connect

pytestmark = pytest.mark.integration

ISSUER = "https://as.example.test"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
STRANGER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WELL_KNOWN = "/.well-known/oauth-protected-resource"


def _free_port() -> int:
    # The audience is the gateway's own URL, so the port must be known first.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    """A running gateway whose audience is its own /mcp URL."""

    def __init__(self, server: TestServer, http: aiohttp.ClientSession, state: Path) -> None:
        self.server = server
        self.http = http
        self.state = state
        self.audience = str(server.make_url("/mcp"))

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def token(
        self,
        *,
        key: Any = RSA_KEY,
        alg: str = "RS256",
        kid: str | None = "rsa-1",
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": self.audience,
            "sub": "agent-7",
            "iat": now,
            "exp": now + 300,
            "scope": "gateway:exec openid",
            **claims,
        }
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)

    def audit(self) -> list[dict[str, Any]]:
        lines = (self.state / "audit.log").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture
async def gw(state_dir: Path) -> AsyncIterator[Gateway]:
    port = _free_port()
    jwks = {
        "keys": [
            {**RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True), "kid": "rsa-1"},
            {**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), "kid": "ec-1"},
        ]
    }
    (state_dir.parent / "jwks.json").write_text(json.dumps(jwks))
    config = make_config(
        state_dir,
        auth={
            "oauth": {
                "issuer": ISSUER,
                "audience": f"http://127.0.0.1:{port}/mcp",
                "jwks_file": str(state_dir.parent / "jwks.json"),
                "scopes_supported": ["gateway:exec"],
                "roles_claim": "scope",
                "role_map": {"gateway:exec": ["developer"]},
            }
        },
    )
    server = TestServer(build_app(config), host="127.0.0.1", port=port)
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield Gateway(server, http, state_dir)
    await server.close()


async def test_valid_token_through_the_sdk_client(gw: Gateway) -> None:
    """A signed token for this audience lists tools and runs echo via the MCP SDK."""
    async with connect(gw, token=gw.token()) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert "shell_execute" in tools
        result = await session.call_tool("shell_execute", {"command": ["echo", "via", "jwt"]})
        assert result.isError is False
        assert result.structuredContent is not None
        assert result.structuredContent["stdout"] == "via jwt\n"
    decisions = [r for r in gw.audit() if r["event"] == "policy.decision"]
    executed = [r for r in decisions if r["action"] == "command.execute"]
    assert executed
    # sub is the subject; the scope claim mapped through role_map gives the roles.
    assert (executed[-1]["subject"], executed[-1]["roles"], executed[-1]["auth"]) == (
        "agent-7",
        ["developer"],
        "jwt",
    )


async def test_static_tokens_keep_working(gw: Gateway) -> None:
    """Configured static bearer tokens authenticate alongside JWTs."""
    headers = {"Authorization": "Bearer alice-token"}
    body = {"command": "echo", "args": ["static"], "wait": True}
    async with gw.http.post(gw.url("/v1/commands"), json=body, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["stdout"] == "static\n"


async def test_missing_token_points_at_the_metadata(gw: Gateway) -> None:
    """No token: 401 whose challenge names the metadata document, which is public."""
    async with gw.http.post(gw.url("/mcp"), json={"jsonrpc": "2.0", "id": 1}) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
    metadata = f"http://{gw.server.host}:{gw.server.port}{WELL_KNOWN}/mcp"
    assert challenge == f'Bearer resource_metadata="{metadata}"'
    for url in (metadata, gw.url(WELL_KNOWN)):
        async with gw.http.get(url) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc["resource"] == gw.audience
        assert doc["authorization_servers"] == [ISSUER]
        assert doc["bearer_methods_supported"] == ["header"]
        assert doc["scopes_supported"] == ["gateway:exec"]
    async with gw.http.get(gw.url("/v1/tasks/x")) as resp:
        assert resp.status == 401
        assert "resource_metadata=" in resp.headers["WWW-Authenticate"]


def _alg_none(gw: Gateway) -> str:
    claims = {"iss": ISSUER, "aud": gw.audience, "sub": "agent-7", "exp": int(time.time()) + 60}
    return jwt.encode(claims, "", algorithm="none")


BAD_TOKENS: dict[str, tuple[Callable[[Gateway], str], str]] = {
    "expired": (lambda gw: gw.token(exp=int(time.time()) - 600), "token expired"),
    "wrong_audience": (
        lambda gw: gw.token(aud="https://other.example.test/mcp"),
        "audience",
    ),
    "wrong_issuer": (lambda gw: gw.token(iss="https://evil.example.test"), "issuer"),
    "bad_signature": (lambda gw: gw.token(key=STRANGER_KEY), "bad token signature"),
    "unknown_kid": (lambda gw: gw.token(kid="rotated-away"), "unknown signing key"),
    "alg_none": (_alg_none, "alg 'none'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_rejected_token_runs_nothing(gw: Gateway, case: str) -> None:
    """Each bad token: 401 invalid_token naming the reason, audited, and no command ran."""
    make, reason = BAD_TOKENS[case]
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "shell_execute", "arguments": {"command": ["touch", "ran"]}},
    }
    headers = {
        "Authorization": f"Bearer {make(gw)}",
        "Accept": "application/json, text/event-stream",
    }
    async with gw.http.post(gw.url("/mcp"), json=call, headers=headers) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        body = await resp.json()
    assert 'error="invalid_token"' in challenge
    assert "resource_metadata=" in challenge
    assert reason in challenge
    assert body["error"]["code"] == "UNAUTHENTICATED"
    assert reason in body["error"]["message"]
    records = gw.audit()
    rejected = [r for r in records if r["event"] == "request.rejected"]
    assert rejected
    assert reason in rejected[-1]["message"]
    assert rejected[-1]["code"] == "UNAUTHENTICATED"
    assert not [r for r in records if r["event"] == "policy.decision"]
    assert not list((gw.state / "workspaces").rglob("ran"))
