"""Traces reach a real OTLP receiver (Jaeger) with the documented shape and propagation."""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import certs
from gateway.audit import verify_file
from gateway.proto import mcp_pb2, mcp_pb2_grpc
from tests.conftest import USERS, make_config
from tests.integration.conftest import Api
from tests.integration.gateway_proc import GatewayProcess
from tests.integration.jaeger import Jaeger
from tests.integration.test_mcp import INIT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = USERS["alice"][0]
# The SDK's standard knob: export every 200 ms instead of every 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


class Spans:
    """A Jaeger trace, indexed for shape assertions."""

    def __init__(self, trace: dict[str, Any]) -> None:
        self.trace = trace
        self.spans: list[dict[str, Any]] = trace["spans"]
        self.by_id = {s["spanID"]: s for s in self.spans}

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["operationName"] == name]

    def one(self, name: str) -> dict[str, Any]:
        found = self.named(name)
        assert len(found) == 1, (name, [s["operationName"] for s in self.spans])
        return found[0]

    @staticmethod
    def parent_id(span: dict[str, Any]) -> str | None:
        refs = [r for r in span["references"] if r["refType"] == "CHILD_OF"]
        return refs[0]["spanID"] if refs else None

    def parent(self, span: dict[str, Any]) -> dict[str, Any] | None:
        pid = self.parent_id(span)
        return None if pid is None else self.by_id.get(pid)

    @staticmethod
    def tags(span: dict[str, Any]) -> dict[str, Any]:
        return {t["key"]: t["value"] for t in span["tags"]}

    def service(self, span: dict[str, Any]) -> str:
        name: str = self.trace["processes"][span["processID"]]["serviceName"]
        return name


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    j = Jaeger(tmp_path_factory.mktemp("jaeger"))
    j.start()
    try:
        yield j
    finally:
        j.stop()


@pytest.fixture(scope="module")
def gateway(jaeger: Jaeger, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("traced")
    state = workdir / "state"
    state.mkdir()
    config = make_config(
        state,
        tracing={
            "enabled": True,
            "endpoint": f"http://127.0.0.1:{jaeger.otlp_port}",
            "protocol": "grpc",
            "insecure": True,
            "resource": {"deployment.environment": "test"},
        },
    )
    gw = GatewayProcess(config, workdir)
    gw.start(env=FAST_EXPORT)
    try:
        yield gw
    finally:
        gw.stop()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _post(url: str, body: object, headers: dict[str, str]) -> tuple[int, Any, Any]:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        return resp.status, resp.headers, json.loads(resp.read())


def _traced_true(gw: GatewayProcess) -> tuple[str, int, Any]:
    """Run ``true`` (wait) under a fresh sampled trace; (trace id, status, headers)."""
    trace_id, _, header = _traceparent()
    status, headers, _ = _post(
        gw.url + "/v1/commands",
        {"command": "true", "wait": True},
        {"Authorization": f"Bearer {TOKEN}", "traceparent": header},
    )
    return trace_id, status, headers


def _audit_records(gw: GatewayProcess, trace_id: str) -> list[dict[str, Any]]:
    path = Path(gw.config_path.parent / "state" / "audit.log")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("trace_id") == trace_id]


def test_rest_exec_trace_has_the_documented_shape(gateway: GatewayProcess, jaeger: Jaeger) -> None:
    """POST /v1/commands continues the caller's trace; every stage is a span in place."""
    trace_id, caller_span, header = _traceparent()
    status, headers, body = _post(
        gateway.url + "/v1/commands",
        {"command": "echo", "args": ["traced"], "wait": True},
        {"Authorization": f"Bearer {TOKEN}", "traceparent": header},
    )
    assert status == 200
    assert body["stdout"] == "traced\n"
    assert headers["X-Trace-Id"] == trace_id
    need = {"POST /v1/commands", "auth.authenticate", "policy.decide", "audit.write"}
    need |= {"task.run", "task.queue_wait", "sandbox.spawn", "command.run"}
    spans = Spans(jaeger.trace(trace_id, need))

    root = spans.one("POST /v1/commands")
    assert spans.parent_id(root) == caller_span  # the caller's span is the parent
    assert spans.service(root) == "mcp-gateway"
    root_tags = spans.tags(root)
    assert root_tags["http.route"] == "/v1/commands"
    assert root_tags["http.response.status_code"] == 200
    assert root_tags["span.kind"] == "server"

    for name in ("auth.authenticate", "policy.decide", "task.run"):
        assert spans.parent(spans.one(name)) is root, name
    decide = spans.one("policy.decide")
    decide_tags = spans.tags(decide)
    assert decide_tags["mcp.policy.engine"] == "embedded"
    assert decide_tags["mcp.policy.allow"] is True
    assert decide_tags["mcp.policy.action"] == "command.execute"
    assert len(decide_tags["mcp.policy.decision_id"]) == 32

    task = spans.one("task.run")
    for name in ("task.queue_wait", "sandbox.spawn", "command.run"):
        assert spans.parent(spans.one(name)) is task, name
    assert spans.tags(spans.one("command.run"))["process.exit.code"] == 0
    assert spans.tags(task)["mcp.task.id"] == body["task_id"]

    writes = {spans.tags(s)["mcp.audit.event"]: spans.parent(s) for s in spans.named("audit.write")}
    assert writes["policy.decision"] is decide
    assert writes["task.queued"] is root
    assert writes["task.completed"] is task
    # Spans are ordered in time: spawn ends before the command starts.
    spawn, run = spans.one("sandbox.spawn"), spans.one("command.run")
    assert spawn["startTime"] + spawn["duration"] <= run["startTime"]

    # The audit records of this request carry its trace id.
    events = [r["event"] for r in _audit_records(gateway, trace_id)]
    assert events[:2] == ["policy.decision", "task.queued"]
    assert {"task.running", "task.completed"} <= set(events)


def test_grpc_metadata_carries_the_trace(gateway: GatewayProcess, jaeger: Jaeger) -> None:
    """traceparent in gRPC metadata makes the RPC span a child of the caller's span."""
    trace_id, caller_span, header = _traceparent()
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = mcp_pb2_grpc.McpServiceStub(channel)
        reply = stub.ExecuteCommand(
            mcp_pb2.CommandRequest(command="echo", args=["rpc"], timeout=30, wait=True),
            metadata=(("authorization", f"Bearer {TOKEN}"), ("traceparent", header)),
            timeout=30,
        )
    assert reply.result.stdout == "rpc\n"
    name = "mcp.McpService/ExecuteCommand"
    spans = Spans(jaeger.trace(trace_id, {name, "policy.decide", "command.run"}))
    rpc = spans.one(name)
    assert spans.parent_id(rpc) == caller_span
    tags = spans.tags(rpc)
    assert (tags["rpc.system"], tags["rpc.method"], tags["span.kind"]) == (
        "grpc",
        "ExecuteCommand",
        "server",
    )
    assert spans.parent(spans.one("policy.decide")) is rpc
    assert spans.parent(spans.parent(spans.one("command.run")) or {}) is rpc


def test_mcp_meta_carries_the_trace(gateway: GatewayProcess, jaeger: Jaeger) -> None:
    """params._meta.traceparent of a tools/call continues the agent's trace."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    _, headers, _ = _post(gateway.url + "/mcp", INIT, auth)
    session = {
        **auth,
        "Mcp-Session-Id": headers["Mcp-Session-Id"],
        "MCP-Protocol-Version": "2025-06-18",
    }
    trace_id, caller_span, header = _traceparent()
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {
            "name": "shell_execute",
            "arguments": {"command": ["echo", "agent"]},
            "_meta": {"traceparent": header},
        },
    }
    _, _, body = _post(gateway.url + "/mcp", call, session)
    assert body["result"]["isError"] is False, body
    name = "tools/call shell_execute"
    spans = Spans(jaeger.trace(trace_id, {name, "policy.decide", "command.run"}))
    tool = spans.one(name)
    assert spans.parent_id(tool) == caller_span
    assert spans.tags(tool)["gen_ai.tool.name"] == "shell_execute"
    assert spans.parent(spans.one("policy.decide")) is tool
    # The HTTP request span lives in its own trace and is linked from the tool span.
    links = [r for r in tool["references"] if r["traceID"] != trace_id]
    assert len(links) == 1, tool["references"]


def test_untraced_request_starts_a_new_trace(gateway: GatewayProcess, jaeger: Jaeger) -> None:
    """Without traceparent the gateway starts the trace and names it in X-Trace-Id."""
    status, headers, _ = _post(
        gateway.url + "/v1/commands",
        {"command": "true", "wait": True},
        {"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    trace_id = headers["X-Trace-Id"]
    spans = Spans(jaeger.trace(trace_id, {"POST /v1/commands", "command.run"}))
    assert spans.parent_id(spans.one("POST /v1/commands")) is None
    assert verify_file(Path(gateway.config_path.parent / "state" / "audit.log")).ok


async def test_trace_id_reaches_the_audit_log_with_tracing_off(api: Api) -> None:
    """Tracing off (the default): a caller's traceparent still lands in the audit records."""
    trace_id, _, header = _traceparent()
    status, body = await api.call(
        "POST",
        "/v1/commands",
        json={"command": "echo", "args": ["x"], "wait": True},
        headers={"traceparent": header},
    )
    assert status == 200, body
    lines = (api.state / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    mine = [r for r in records if r.get("trace_id") == trace_id]
    assert [r["event"] for r in mine][:2] == ["policy.decision", "task.queued"]
    assert all(r["request_id"] == mine[0]["request_id"] for r in mine if "request_id" in r)
    # Requests without a trace context leave no trace_id.
    status, _ = await api.call("POST", "/v1/commands", json={"command": "true", "wait": True})
    assert status == 200
    last = json.loads((api.state / "audit.log").read_text().splitlines()[-1])
    assert "trace_id" not in last


def test_logs_are_json_under_systemd_with_request_and_trace_ids(tmp_path: Path) -> None:
    """logging.format auto + JOURNAL_STREAM: JSON lines carrying request_id and trace_id."""
    state = tmp_path / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state, logging={"format": "auto"}), tmp_path)
    gw.start(env={"JOURNAL_STREAM": "8:12345"})  # what systemd sets for a journald stdout
    try:
        trace_id, status, headers = _traced_true(gw)
        assert status == 200
        rpc_trace_id, _, rpc_header = _traceparent()
        with grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
            stub = mcp_pb2_grpc.McpServiceStub(channel)
            reply = stub.ExecuteCommand(
                mcp_pb2.CommandRequest(command="true", timeout=30, wait=True),
                metadata=(("authorization", f"Bearer {TOKEN}"), ("traceparent", rpc_header)),
                timeout=30,
            )
        assert reply.result.exit_code == 0
    finally:
        gw.stop()
    lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line]
    access = [r for r in lines if r.get("event") == "request" and r.get("route") == "/v1/commands"]
    assert len(access) == 1, lines
    line = access[0]
    assert line["request_id"] == headers["X-Request-Id"]
    assert line["trace_id"] == trace_id
    assert (line["level"], line["status"], line["transport"]) == ("info", 200, "rest")
    assert {"timestamp", "span_id", "duration_ms"} <= set(line)
    # The gRPC access line (written once grpcio has the answer) keeps the RPC's ids too.
    rpc = [r for r in lines if r.get("event") == "request" and r.get("transport") == "grpc"]
    assert len(rpc) == 1, lines
    assert (rpc[0]["method"], rpc[0]["code"], rpc[0]["trace_id"]) == (
        "ExecuteCommand",
        "OK",
        rpc_trace_id,
    )
    decision = [r for r in _audit_records(gw, rpc_trace_id) if r["event"] == "policy.decision"]
    assert [r["request_id"] for r in decision] == [rpc[0]["request_id"]]


def test_export_over_mtls_to_the_collector(tmp_path: Path) -> None:
    """tracing.insecure false: spans reach a collector that requires TLS client certificates."""
    ca = certs.build_ca()
    pki = tmp_path / "pki"
    pki.mkdir()
    certs.write_pair(ca, pki / "ca.pem", pki / "ca.key")
    certs.write_pair(certs.build_server(ca, ["localhost"], ["127.0.0.1"]), *_pair(pki, "otlp"))
    certs.write_pair(certs.build_client(ca, "mcp-gateway"), *_pair(pki, "gw"))
    jaeger = Jaeger(
        tmp_path,
        otlp_tls={
            "cert_file": str(pki / "otlp.pem"),
            "key_file": str(pki / "otlp.key"),
            "client_ca_file": str(pki / "ca.pem"),
        },
    )
    jaeger.start()
    try:
        state = tmp_path / "state"
        state.mkdir()
        tracing = {
            "enabled": True,
            "endpoint": f"https://127.0.0.1:{jaeger.otlp_port}",
            "insecure": False,
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / "gw.pem"),
            "key_file": str(pki / "gw.key"),
        }
        gw = GatewayProcess(make_config(state, tracing=tracing), tmp_path)
        gw.start(env=FAST_EXPORT)
        try:
            trace_id, status, _ = _traced_true(gw)
            assert status == 200
            spans = Spans(jaeger.trace(trace_id, {"POST /v1/commands", "command.run"}))
            assert spans.tags(spans.one("command.run"))["process.exit.code"] == 0
        finally:
            gw.stop()
    finally:
        jaeger.stop()


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.pem", directory / f"{name}.key"


def test_output_reader_gets_an_output_stream_span(gateway: GatewayProcess, jaeger: Jaeger) -> None:
    """GET /v1/tasks/{id}/output: the reader's request span has an output.stream child."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    _, _, task = _post(
        gateway.url + "/v1/commands", {"command": "echo", "args": ["streamed"], "wait": True}, auth
    )
    trace_id, _, header = _traceparent()
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{gateway.url}/v1/tasks/{task['task_id']}/output",
        headers={**auth, "traceparent": header},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        lines = [json.loads(line) for line in resp.read().splitlines()]
    assert lines[0]["data"] == "streamed\n"
    name = "GET /v1/tasks/{task_id}/output"
    spans = Spans(jaeger.trace(trace_id, {name, "output.stream"}))
    stream = spans.one("output.stream")
    assert spans.parent(stream) is spans.one(name)
    tags = spans.tags(stream)
    assert (tags["mcp.output.chunks"], tags["mcp.output.bytes"]) == (1, len("streamed\n"))
