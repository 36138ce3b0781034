"""Prometheus metrics, in a registry owned by the app (no global state).

Labels are bounded: transport, method, route template, code, action, result.
Never task ids, paths or commands.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 1 ms .. 10 s: tasks are bwrap spawns (~10-20 ms) up to long jobs.
_LATENCY_MS_BUCKETS = (1, 2.5, 5, 10, 15, 20, 30, 50, 75, 100, 250, 500, 1000, 2500, 10000)
_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


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
        self.audit_write_seconds = Histogram(
            "mcp_audit_write_seconds",
            "Time to append and fsync one audit record.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.audit_failures = Counter(
            "mcp_audit_write_failures", "Audit records that could not be written.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
