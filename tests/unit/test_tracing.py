"""Tracing set-up, context extraction, log format choice and the new metrics helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway import config as config_mod
from gateway.logs import resolve_format
from gateway.metrics import Metrics
from gateway.tracing import current_trace_ids, extract, extract_meta, make_tracing

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = f"00-{TRACE}-{SPAN}-01"


def tracing_config(**kw: object) -> config_mod.TracingConfig:
    return config_mod.parse({"tracing": kw}, env={}).tracing


def test_disabled_tracing_records_nothing_but_keeps_the_callers_trace_id() -> None:
    """Off by default: no provider, yet a remote parent's ids stay visible (for audit)."""
    tracing = make_tracing(tracing_config())
    assert not tracing.enabled
    with tracing.span("x", parent=extract({"traceparent": PARENT})):
        assert current_trace_ids()["trace_id"] == TRACE
    with tracing.span("y"):
        assert current_trace_ids() == {}


def test_enabled_tracing_exports_spans_with_resource_and_parent() -> None:
    """Spans carry the service resource and continue the extracted parent."""
    exporter = InMemorySpanExporter()
    tracing = make_tracing(
        tracing_config(enabled=True, resource={"deployment.environment": "unit"}),
        processor=SimpleSpanProcessor(exporter),
    )
    with (
        tracing.span("root", kind=SpanKind.SERVER, parent=extract({"TraceParent": PARENT})),
        tracing.span("child", attributes={"a": 1}),
    ):
        pass
    with pytest.raises(ValueError, match="boom"), tracing.span("failing"):
        raise ValueError("boom")
    tracing.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"root", "child", "failing"}
    root, child = spans["root"], spans["child"]
    assert format(root.context.trace_id, "032x") == TRACE
    assert root.parent is not None
    assert format(root.parent.span_id, "016x") == SPAN
    assert child.parent is not None
    assert child.parent.span_id == root.context.span_id
    assert root.resource.attributes["service.name"] == "mcp-gateway"
    assert root.resource.attributes["deployment.environment"] == "unit"
    assert not spans["failing"].status.is_ok
    assert spans["failing"].status.description == "ValueError: boom"


def test_sample_ratio_zero_drops_new_traces_but_honours_sampled_parents() -> None:
    """Head sampling applies to new traces; a sampled caller keeps its trace."""
    exporter = InMemorySpanExporter()
    tracing = make_tracing(
        tracing_config(enabled=True, sample_ratio=0.0), processor=SimpleSpanProcessor(exporter)
    )
    with tracing.span("new"):
        pass
    with tracing.span("continued", parent=extract({"traceparent": PARENT})):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["continued"]


@pytest.mark.parametrize(
    ("meta", "uses_meta"),
    [
        ({"traceparent": PARENT}, True),
        ({"traceparent": "garbage"}, False),
        ({"traceparent": 7}, False),
        ({"progressToken": 1}, False),
        ("not an object", False),
        (None, False),
    ],
)
def test_mcp_meta_context_or_fallback(meta: object, uses_meta: bool) -> None:
    """Only a well-formed _meta.traceparent replaces the transport's context."""
    fallback = extract({})
    ctx = extract_meta(meta, fallback)
    assert (ctx is not fallback) == uses_meta


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ({"protocol": "zipkin"}, "tracing.protocol"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio"),
        ({"cert_file": "c.pem", "insecure": False}, "tracing.cert_file"),
        ({"ca_file": "ca.pem"}, "tracing.insecure"),
        ({"endpoint": ""}, "tracing.endpoint"),
        ({"bogus": 1}, "tracing.bogus"),
    ],
)
def test_bad_tracing_config_names_the_key(tracing: dict[str, object], message: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.parse({"tracing": tracing}, env={})


def test_tracing_tls_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    doc = {"tracing": {"insecure": False, "ca_file": "ca.pem"}}
    config = config_mod.parse(doc, env={}, base=tmp_path)
    assert config.tracing.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("fmt", "env", "expected"),
    [
        ("auto", {"JOURNAL_STREAM": "8:1234"}, "json"),
        ("auto", {}, "console"),
        ("console", {"JOURNAL_STREAM": "8:1234"}, "console"),
        ("json", {}, "json"),
    ],
)
def test_log_format_auto_means_json_under_systemd(
    fmt: str, env: dict[str, str], expected: str
) -> None:
    assert resolve_format(fmt, env) == expected


def _value(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_vrrp_role_is_one_hot_and_ready_publishes_each_check() -> None:
    metrics = Metrics()
    assert _value(metrics, "mcp_vrrp_role", {"role": "unknown"}) == 1
    metrics.set_vrrp_role("master")
    roles = {r: _value(metrics, "mcp_vrrp_role", {"role": r}) for r in ("master", "unknown")}
    assert roles == {"master": 1, "unknown": 0}
    with pytest.raises(ValueError, match="unknown VRRP role"):
        metrics.set_vrrp_role("leader")
    metrics.set_ready({"sandbox": True, "policy": False, "disk": True})
    assert _value(metrics, "mcp_ready", {"check": "all"}) == 0
    assert _value(metrics, "mcp_ready", {"check": "policy"}) == 0
    assert _value(metrics, "mcp_ready", {"check": "sandbox"}) == 1
