"""OpenTelemetry tracing: one trace per request, W3C trace context in and out.

The gateway owns its :class:`~opentelemetry.sdk.trace.TracerProvider` (no
global provider is installed): :func:`make_tracing` builds it from
``tracing:`` in the config and every component gets the :class:`Tracing`
through its constructor.  With tracing off the provider is the API's no-op
one, so spans cost a few attribute look-ups and record nothing; a caller's
``traceparent`` is still honoured, so its trace id reaches the audit record.

Span tree of one ``POST /v1/commands`` (names are stable, see
docs/observability.md)::

    POST /v1/commands            (SERVER; gRPC: mcp.McpService/ExecuteCommand)
    ├── auth.authenticate
    ├── policy.decide            mcp.policy.engine/.action/.allow/.decision_id
    │   └── audit.write          mcp.audit.event = policy.decision
    ├── audit.write              task.queued
    └── task.run                 (the task, parented on the request)
        ├── task.queue_wait
        ├── sandbox.spawn        bwrap started, confined, released
        ├── command.run          the command itself, until it exits
        └── audit.write          task.completed / failed / ...

``output.stream`` covers a reader following a task's output.

Incoming context: the ``traceparent``/``tracestate`` HTTP headers (REST and
MCP), the same keys in gRPC metadata, and ``params._meta.traceparent`` of an
MCP JSON-RPC message, which wins over the HTTP header (the MCP convention
for context that must survive proxies and stdio bridges).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import __version__
from gateway.config import TracingConfig

__all__ = ["SpanKind", "Tracing", "current_trace_ids", "make_tracing"]

_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = ("traceparent", "tracestate")


def extract(carrier: Mapping[str, str]) -> Context:
    """The W3C trace context in ``carrier`` (keys compared case-insensitively)."""
    lowered = {k.lower(): v for k, v in carrier.items() if k.lower() in _FIELDS}
    return _PROPAGATOR.extract(lowered)


def extract_meta(meta: object, fallback: Context | None = None) -> Context | None:
    """Context from an MCP ``_meta`` object, or ``fallback`` when it carries none."""
    if not isinstance(meta, Mapping):
        return fallback
    carrier = {k: v for k, v in meta.items() if k in _FIELDS and isinstance(v, str)}
    if "traceparent" not in carrier:
        return fallback
    ctx = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return fallback  # malformed: keep the transport's context
    return ctx


def current_trace_ids() -> dict[str, str]:
    """``{"trace_id", "span_id"}`` of the current span, or {} when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


class _CurrentSpan(contextlib.AbstractContextManager[Span]):
    """The current span, unchanged: what a span of a disabled tracer amounts to."""

    def __enter__(self) -> Span:
        return trace.get_current_span()

    def __exit__(self, *exc: object) -> None:
        return None


class Tracing:
    """The gateway's tracer and the provider that exports its spans."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self.provider = provider or trace.NoOpTracerProvider()
        self.tracer: Tracer = self.provider.get_tracer("gateway", __version__)
        self.enabled = isinstance(self.provider, TracerProvider)

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """A span made current for the block; an exception marks it as an error.

        ``parent`` replaces the current context (an extracted remote one).
        Exceptions are recorded by type and message only: their text is ours
        (McpError messages), never a command's output.  With tracing off and
        no remote parent to make current, nothing is recorded or changed:
        the block gets the current (non-recording) span at no cost.
        """
        if not self.enabled and parent is None:
            return _CurrentSpan()
        return self._span(name, kind, parent, attributes)

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        kind: SpanKind,
        parent: Context | None,
        attributes: Mapping[str, Any] | None,
    ) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
            name,
            context=parent,
            kind=kind,
            attributes=dict(attributes) if attributes else None,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                if not isinstance(exc, GeneratorExit):
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise

    def shutdown(self) -> None:
        """Flush queued spans (bounded by the exporter timeout) and stop exporting."""
        if isinstance(self.provider, TracerProvider):
            self.provider.shutdown()


def make_exporter(config: TracingConfig) -> SpanExporter:
    """The OTLP exporter ``config`` asks for (TLS files read now, at start-up)."""
    headers = dict(config.headers)
    if config.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        credentials = None
        if not config.insecure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=config.ca_file.read_bytes() if config.ca_file else None,
                private_key=config.key_file.read_bytes() if config.key_file else None,
                certificate_chain=config.cert_file.read_bytes() if config.cert_file else None,
            )
        return GrpcExporter(
            endpoint=config.endpoint,
            insecure=config.insecure,
            credentials=credentials,
            headers=headers,
            timeout=config.timeout_s,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    base = config.endpoint.rstrip("/")
    return HttpExporter(
        endpoint=base if base.endswith("/v1/traces") else base + "/v1/traces",
        headers=headers,
        timeout=config.timeout_s,
        certificate_file=str(config.ca_file) if config.ca_file else None,
        client_certificate_file=str(config.cert_file) if config.cert_file else None,
        client_key_file=str(config.key_file) if config.key_file else None,
    )


def make_tracing(config: TracingConfig, processor: SpanProcessor | None = None) -> Tracing:
    """A :class:`Tracing` for ``config``: no-op when disabled, else batched OTLP export.

    ``processor`` replaces the batch exporter (tests pass an in-memory one).
    """
    if not config.enabled:
        return Tracing()
    resource = Resource.create(
        {
            "service.name": config.service_name,
            "service.version": __version__,
            **config.resource,
        }
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
    )
    # Batched: export never sits on a request's path; a full queue drops spans.
    provider.add_span_processor(processor or BatchSpanProcessor(make_exporter(config)))
    return Tracing(provider)
