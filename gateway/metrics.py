"""Prometheus metrics, in a registry owned by the app (no global state).

Names follow the Prometheus conventions (``mcp_`` prefix, base units,
``_total`` on counters, added by the client library), with one documented
exception kept for compatibility: ``mcp_task_latency_ms``.  Labels are
bounded: transport, method (route name or RPC), code (stable error code),
action, result, engine, state, check, role.  Never task ids, subjects, paths
or commands.  docs/observability.md describes each metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 1 ms .. 10 s: tasks are bwrap spawns (~10-20 ms) up to long jobs.
_LATENCY_MS_BUCKETS = (1, 2.5, 5, 10, 15, 20, 30, 50, 75, 100, 250, 500, 1000, 2500, 10000)
_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# 1 ms .. 1 s, the range the gateway's own work lives in (requests without
# wait, decisions, spawns); slower observations land in +Inf.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

VRRP_ROLES = ("master", "backup", "fault", "unknown")
READY_CHECKS = ("all", "sandbox", "policy", "disk")


class Metrics:
    """Every metric the gateway exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.task_latency_ms = Histogram(
            "mcp_task_latency_ms",
            "Wall time of a task from start of the sandbox to its end, in milliseconds.",
            ["state"],
            buckets=_LATENCY_MS_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            "mcp_api_requests",
            "API requests by transport, method and result code.",
            ["transport", "method", "code"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "mcp_policy_decisions",
            "Policy decisions by action and result.",
            ["action", "result"],
            registry=r,
        )
        self.policy_errors = Counter(
            "mcp_policy_errors",
            "Policy engine failures (each one denied the request).",
            ["engine"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "mcp_policy_reloads",
            "Policy reloads by result (a failed reload keeps the old policy).",
            ["result"],
            registry=r,
        )
        self.tasks_running = Gauge("mcp_tasks_running", "Tasks running now.", registry=r)
        self.tasks_queued = Gauge("mcp_tasks_queued", "Tasks waiting for a slot.", registry=r)
        self.tasks_finished = Counter(
            "mcp_tasks_finished", "Tasks that reached a final state.", ["state"], registry=r
        )
        self.sandbox_failures = Counter(
            "mcp_sandbox_failures",
            "Runs where the sandbox itself failed (not the command).",
            registry=r,
        )
        self.sandbox_prestarts = Counter(
            "mcp_sandbox_prestarts",
            "Sandboxes begun while their command was still being decided, by what became "
            "of them: submitted (the task took it over) or discarded (denied or failed before "
            "the task existed; killed before the command).",
            ["result"],
            registry=r,
        )
        self.sandbox_starts = Counter(
            "mcp_sandbox_starts",
            "Commands released in a sandbox, by how it was started: warm (set up ahead, "
            "waiting for a command) or cold (started for the request).",
            ["kind"],
            registry=r,
        )
        self.audit_write_seconds = Histogram(
            "mcp_audit_write_seconds",
            "Time to append and fsync one audit record.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.audit_failures = Counter(
            "mcp_audit_write_failures", "Audit records that could not be written.", registry=r
        )

        self.api_request_seconds = Histogram(
            "mcp_api_request_duration_seconds",
            "API request duration by transport and method (a wait request includes its command).",
            ["transport", "method"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.policy_decision_seconds = Histogram(
            "mcp_policy_decision_duration_seconds",
            "Time for one policy decision, by engine (errors and timeouts included).",
            ["engine"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.task_start_seconds = Histogram(
            "mcp_task_start_duration_seconds",
            "From queueing to the command's release in its sandbox: the gateway's own "
            "latency for a task (queue wait plus sandbox spawn), the latency SLO metric.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.task_queue_wait_seconds = Histogram(
            "mcp_task_queue_wait_seconds",
            "Time a task waited for a free slot.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.tasks_capacity = Gauge(
            "mcp_tasks_capacity",
            "Configured task capacity: kind=concurrent slots, kind=queue waiting places.",
            ["kind"],
            registry=r,
        )
        self.ready = Gauge(
            "mcp_ready",
            "1 when the readiness check passes (check=all) or one of its parts passes.",
            ["check"],
            registry=r,
        )
        self.vrrp_role = Gauge(
            "mcp_vrrp_role",
            "This node's VRRP role as keepalived last reported it (one-hot by role).",
            ["role"],
            registry=r,
        )
        self.build_info = Gauge(
            "mcp_build_info",
            "Always 1; labels carry the gateway version and the policy engine.",
            ["version", "policy_engine"],
            registry=r,
        )
        self.set_vrrp_role("unknown")

    def set_vrrp_role(self, role: str) -> None:
        """Mark ``role`` (one of :data:`VRRP_ROLES`) as current, the others 0."""
        if role not in VRRP_ROLES:
            raise ValueError(f"unknown VRRP role {role!r}")
        for name in VRRP_ROLES:
            self.vrrp_role.labels(role=name).set(1 if name == role else 0)

    def set_ready(self, checks: dict[str, bool]) -> None:
        """Publish a readiness result: each part and the overall verdict."""
        for name in READY_CHECKS:
            if name == "all":
                self.ready.labels(check="all").set(1 if all(checks.values()) else 0)
            elif name in checks:
                self.ready.labels(check=name).set(1 if checks[name] else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
