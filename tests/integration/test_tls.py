"""TLS and mTLS on real sockets: ``mcp-gateway serve`` with certificates from gateway.certs."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from gateway import certs
from gateway.proto import mcp_pb2, mcp_pb2_grpc
from tests.conftest import USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

MTLS_SUBJECTS = [
    {"cn": "alice", "subject": "alice", "roles": ["developer"]},
    {"san": "spiffe://example.org/agent", "subject": "agent", "roles": ["agent"]},
]


class Pki:
    """A CA, a server certificate and client certificates, good and bad."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ca = certs.build_ca()
        self.ca = self._write("ca", ca)[0]
        self.server = self._write("server", certs.build_server(ca, ["localhost"], ["127.0.0.1"]))
        self.alice = self._write("alice", certs.build_client(ca, "alice"))
        self.agent = self._write(
            "agent", certs.build_client(ca, "agent-7", uris=["spiffe://example.org/agent"])
        )
        self.mallory = self._write("mallory", certs.build_client(ca, "mallory"))
        now = datetime.datetime.now(datetime.UTC)
        expired = certs.build_client(
            ca,
            "alice",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        self.expired = self._write("expired", expired)
        other_ca = certs.build_ca("Some other CA")
        self.foreign = self._write("foreign", certs.build_client(other_ca, "alice"))

    def _write(self, name: str, issued: certs.Issued) -> tuple[Path, Path]:
        paths = self.root / f"{name}.pem", self.root / f"{name}-key.pem"
        certs.write_pair(issued, *paths)
        return paths

    def client_context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(*map(str, cert))
        return context

    def grpc_credentials(self, cert: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
        if cert is None:
            return grpc.ssl_channel_credentials(self.ca.read_bytes())
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), cert[1].read_bytes(), cert[0].read_bytes()
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _start(pki: Pki, work: Path, client_auth: str) -> GatewayProcess:
    state = work / "state"
    state.mkdir()
    tls = {
        "enabled": True,
        "cert_file": str(pki.server[0]),
        "key_file": str(pki.server[1]),
        "client_ca_file": str(pki.ca),
        "client_auth": client_auth,
        "mtls_subjects": MTLS_SUBJECTS,
    }
    gw = GatewayProcess(make_config(state, tls=tls), work, pki.client_context(pki.alice))
    gw.start()
    return gw


@pytest.fixture(scope="module")
def strict(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """client_auth: required."""
    gw = _start(pki, tmp_path_factory.mktemp("strict"), "required")
    yield gw
    assert gw.stop() == 0


@pytest.fixture(scope="module")
def relaxed(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """client_auth: optional."""
    gw = _start(pki, tmp_path_factory.mktemp("relaxed"), "optional")
    yield gw
    assert gw.stop() == 0


def audit(gw: GatewayProcess) -> list[dict[str, Any]]:
    path = gw.config_path.parent / "state" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def decision(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    return next(
        e
        for e in audit(gw)
        if e["event"] == "policy.decision" and e.get("request_id") == request_id
    )


async def rest_run(
    gw: GatewayProcess, context: ssl.SSLContext, token: str | None = None
) -> tuple[int, dict[str, Any], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.url}/v1/commands",
            json={"command": "echo", "args": ["hi"], "wait": True},
            headers=headers,
            ssl=context,
        ) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return resp.status, body, resp.headers["X-Request-Id"]


def raw_https(gw: GatewayProcess, context: ssl.SSLContext) -> bytes:
    """Handshake, GET /health, read: the bytes, or the SSLError the server's alert gives."""
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return tls.recv(65536)


def grpc_channel(gw: GatewayProcess, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{gw.grpc_port}", creds)


def md(user: str | None) -> tuple[tuple[str, str], ...]:
    return () if user is None else (("authorization", f"Bearer {USERS[user][0]}"),)


async def grpc_run(
    gw: GatewayProcess, creds: grpc.ChannelCredentials, user: str | None = None
) -> mcp_pb2.TaskCreatedResponse:
    async with grpc_channel(gw, creds) as channel:
        stub = mcp_pb2_grpc.McpServiceStub(channel)
        req = mcp_pb2.CommandRequest(command="echo", args=["hi"], wait=True)
        response: mcp_pb2.TaskCreatedResponse = await stub.ExecuteCommand(
            req, metadata=md(user), timeout=30
        )
        return response


async def grpc_error(
    gw: GatewayProcess, creds: grpc.ChannelCredentials, user: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_run(gw, creds, user)
    return info.value


# -- server TLS with tokens --------------------------------------------------------------


async def test_rest_over_tls_with_token(relaxed: GatewayProcess, pki: Pki) -> None:
    """No client certificate (optional): the token authenticates, as before."""
    status, body, request_id = await rest_run(relaxed, pki.client_context(), USERS["bob"][0])
    assert (status, body["stdout"]) == (200, "hi\n")
    record = decision(relaxed, request_id)
    assert (record["subject"], record["auth"], record["transport"]) == ("bob", "token", "rest")


async def test_grpc_over_tls_with_token(relaxed: GatewayProcess, pki: Pki) -> None:
    resp = await grpc_run(relaxed, pki.grpc_credentials(), "bob")
    assert (resp.result.stdout, resp.task_info.owner) == ("hi\n", "bob")


async def test_rest_without_credentials_is_unauthenticated(
    relaxed: GatewayProcess, pki: Pki
) -> None:
    status, body, _ = await rest_run(relaxed, pki.client_context())
    assert status == 401
    assert body["error"]["code"] == "UNAUTHENTICATED"
    assert "missing bearer token" in body["error"]["message"]


# -- mTLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gateway", ["strict", "relaxed"])
async def test_rest_mtls_maps_cn_to_subject(
    gateway: str, pki: Pki, request: pytest.FixtureRequest
) -> None:
    """A verified certificate with CN alice is alice with the mapped roles, auth mtls."""
    gw: GatewayProcess = request.getfixturevalue(gateway)
    status, body, request_id = await rest_run(gw, pki.client_context(pki.alice))
    assert (status, body["stdout"]) == (200, "hi\n")
    record = decision(gw, request_id)
    assert (record["subject"], record["roles"], record["auth"]) == ("alice", ["developer"], "mtls")


async def test_rest_mtls_maps_uri_san(strict: GatewayProcess, pki: Pki) -> None:
    status, _, request_id = await rest_run(strict, pki.client_context(pki.agent))
    record = decision(strict, request_id)
    assert (status, record["subject"], record["roles"], record["auth"]) == (
        200,
        "agent",
        ["agent"],
        "mtls",
    )


async def test_token_wins_over_client_certificate(strict: GatewayProcess, pki: Pki) -> None:
    """Certificate alice + token bob: bob by token; a bad token fails despite the cert."""
    status, _, request_id = await rest_run(strict, pki.client_context(pki.alice), "bob-token")
    assert status == 200
    assert decision(strict, request_id)["subject"] == "bob"
    assert decision(strict, request_id)["auth"] == "token"
    status, body, _ = await rest_run(strict, pki.client_context(pki.alice), "not-a-token")
    assert (status, body["error"]["message"]) == (401, "unknown or revoked token")
    resp = await grpc_run(strict, pki.grpc_credentials(pki.alice), "bob")
    assert resp.task_info.owner == "bob"


async def test_grpc_mtls_maps_cn_to_subject(strict: GatewayProcess, pki: Pki) -> None:
    resp = await grpc_run(strict, pki.grpc_credentials(pki.alice))
    assert (resp.result.stdout, resp.task_info.owner) == ("hi\n", "alice")
    record = next(
        e
        for e in reversed(audit(strict))
        if e["event"] == "policy.decision" and e["transport"] == "grpc"
    )
    assert (record["subject"], record["roles"], record["auth"]) == ("alice", ["developer"], "mtls")


async def test_grpc_optional_does_not_request_client_certificates(
    relaxed: GatewayProcess, pki: Pki
) -> None:
    """grpcio cannot ask for an optional certificate: with "optional", gRPC needs a token."""
    err = await grpc_error(relaxed, pki.grpc_credentials(pki.alice))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in (err.details() or "")


async def test_unmapped_certificate_is_unauthenticated(strict: GatewayProcess, pki: Pki) -> None:
    """A valid certificate that maps to no subject: 401 / UNAUTHENTICATED, saying why."""
    status, body, _ = await rest_run(strict, pki.client_context(pki.mallory))
    assert status == 401
    assert body["error"]["code"] == "UNAUTHENTICATED"
    assert body["error"]["message"] == (
        "client certificate CN=mallory SANs=[] maps to no subject (tls.mtls_subjects)"
    )
    err = await grpc_error(strict, pki.grpc_credentials(pki.mallory))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == body["error"]["message"]
    rejected = [e for e in audit(strict) if e["event"] == "request.rejected"]
    assert any("CN=mallory" in (e["message"] or "") for e in rejected)


# -- refused at the handshake -------------------------------------------------------------


@pytest.mark.parametrize("cert", ["foreign", "expired", None])
def test_rest_handshake_refuses_bad_client_certificates(
    strict: GatewayProcess, pki: Pki, cert: str | None
) -> None:
    """TLS 1.3: the client's side of the handshake completes, then the server verifies
    the certificate, fails the handshake and drops the connection (asyncio does not
    flush the alert): the first read is end-of-file, no HTTP response at all."""
    context = pki.client_context(None if cert is None else getattr(pki, cert))
    assert raw_https(strict, context) == b""
    # The same client with a good certificate gets an answer.
    assert raw_https(strict, pki.client_context(pki.alice)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("cert", ["foreign", "expired", None])
async def test_grpc_handshake_refuses_bad_client_certificates(
    strict: GatewayProcess, pki: Pki, cert: str | None
) -> None:
    """gRPC never gets to the call: UNAVAILABLE, even with a valid token."""
    creds = pki.grpc_credentials(None if cert is None else getattr(pki, cert))
    err = await grpc_error(strict, creds, "alice")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert (err.details() or "").startswith("failed to connect to all addresses")


def test_expired_certificate_also_refused_when_optional(relaxed: GatewayProcess, pki: Pki) -> None:
    """ "optional" means "may send none", not "may send a bad one"."""
    assert raw_https(relaxed, pki.client_context(pki.expired)) == b""
    assert raw_https(relaxed, pki.client_context(pki.foreign)) == b""
    assert raw_https(relaxed, pki.client_context()).startswith(b"HTTP/1.1 200")


def test_plaintext_http_to_tls_port_fails(relaxed: GatewayProcess) -> None:
    """A plaintext request gets no HTTP answer: the server closes the connection."""
    with socket.create_connection(("127.0.0.1", relaxed.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.recv(65536) == b""


async def test_plaintext_grpc_to_tls_port_fails(relaxed: GatewayProcess) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relaxed.grpc_port}") as channel:
        stub = mcp_pb2_grpc.McpServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetTaskStatus(
                mcp_pb2.TaskStatusRequest(task_id="0" * 32), metadata=md("alice"), timeout=10
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (info.value.details() or "").startswith("failed to connect to all addresses")


def test_certs_cli_init_and_issue(tmp_path: Path) -> None:
    """mcp-gateway certs init / issue --server / issue --client write usable PEM pairs."""
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "certs", *args, "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert cli("init").returncode == 0
    server = cli("issue", "--server", "--name", "localhost", "--ip", "127.0.0.1")
    assert server.stdout.split() == [
        str(tmp_path / "server-localhost.pem"),
        str(tmp_path / "server-localhost-key.pem"),
    ]
    assert cli("issue", "--client", "--name", "alice").returncode == 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(
        tmp_path / "server-localhost.pem", tmp_path / "server-localhost-key.pem"
    )
    again = cli("init")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    usage = cli("issue", "--name", "x")
    assert (usage.returncode, usage.stderr.strip()) == (
        2,
        "error: certs issue needs --server or --client, and --name",
    )
