"""Assembles the gateway from a :class:`~gateway.config.Config`.

Components are built in ``cleanup_ctx`` order (audit, store, policy,
sandbox, tasks) and torn down in reverse; any seam can be replaced through
:class:`Components` for tests of the adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from gateway import __version__
from gateway.audit import AuditLog, AuditSink
from gateway.auth import TokenAuthenticator
from gateway.config import Config
from gateway.errors import Unavailable
from gateway.ha import VrrpRole
from gateway.mcp import add_mcp_routes
from gateway.metrics import Metrics
from gateway.opa import OpaEngine
from gateway.policy import EmbeddedEngine, PolicyEngine
from gateway.reload import PolicyReloader, Reloadable
from gateway.rest import AUTH, GATEWAY, PUBLIC, add_metadata_routes, add_routes, error_middleware
from gateway.sandbox import BwrapSandbox, Sandbox, kill_orphans
from gateway.service import Gateway
from gateway.store import SqliteTaskStore
from gateway.tasks import TaskManager
from gateway.tracing import Tracing, make_tracing
from gateway.workspace import Workspaces

log = structlog.get_logger("gateway.app")


@dataclasses.dataclass
class Components:
    """Optional replacements for the production seams."""

    policy: PolicyEngine | None = None
    sandbox: Sandbox | None = None
    audit: AuditSink | None = None
    tracing: Tracing | None = None


def make_policy(config: Config) -> PolicyEngine:
    policy = config.policy
    if policy.engine == "opa":
        token = None
        if policy.opa_token_file is not None:
            try:
                token = policy.opa_token_file.read_text().strip() or None
            except OSError as exc:
                raise Unavailable(f"cannot read policy.opa_token_file: {exc}") from exc
        policy_dir = policy.dir if policy.dir.is_dir() else None
        return OpaEngine(
            policy.opa_url, timeout_s=policy.timeout_s, token=token, policy_dir=policy_dir
        )
    return EmbeddedEngine(policy.dir, timeout_s=policy.timeout_s, opa_binary=policy.opa_binary)


def make_sandbox(config: Config, tracing: Tracing | None = None) -> BwrapSandbox:
    return BwrapSandbox(
        bwrap_path=str(config.sandbox.bwrap),
        cgroup_parent=config.sandbox.cgroup_parent,
        tracing=tracing,
        warm=config.sandbox.warm.per_subject,
        warm_total=config.sandbox.warm.total,
        warm_idle_s=config.sandbox.warm.idle_s,
    )


# OPA may still be starting when the gateway does (both units start together).
POLICY_STARTUP_WAIT_S = 20.0


async def _wait_for_policy(policy: PolicyEngine, wait_s: float) -> None:
    """``policy.check()``, retried while the engine is unavailable for up to ``wait_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    delay = 0.1
    while True:
        try:
            await policy.check()
        except Unavailable as exc:
            if loop.time() + delay > deadline:
                raise
            log.warning("policy engine not ready yet; waiting", error=exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        else:
            return


@contextlib.asynccontextmanager
async def open_gateway(config: Config, parts: Components | None = None) -> AsyncIterator[Gateway]:
    """Build every component, run start-up checks, and close them in reverse."""
    parts = parts or Components()
    metrics = Metrics()
    tracing = parts.tracing or make_tracing(config.tracing)
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    audit = parts.audit or AuditLog(
        config.audit_path,
        redact=config.audit.redact,
        also_journald=config.audit.journald,
        on_latency=metrics.audit_write_seconds.observe,
        on_sync_failure=metrics.audit_failures.inc,
        tracing=tracing,
    )
    store = SqliteTaskStore(config.state_dir / "tasks.db")
    policy = parts.policy or make_policy(config)
    metrics.build_info.labels(version=__version__, policy_engine=policy.name).set(1)
    owned_sandbox: BwrapSandbox | None = None
    sandbox: Sandbox
    if parts.sandbox is None:
        sandbox = owned_sandbox = make_sandbox(config, tracing)
    else:
        sandbox = parts.sandbox
    workspaces = Workspaces(
        config.state_dir / "workspaces",
        max_read_bytes=config.files.max_read_bytes,
        max_write_bytes=config.files.max_write_bytes,
        max_list_entries=config.files.max_list_entries,
    )
    tasks = TaskManager(
        sandbox,
        store,
        audit,
        max_concurrent=config.tasks.max_concurrent,
        max_queue=config.tasks.max_queue,
        retention_s=config.tasks.retention_s,
        metrics=metrics,
        tracing=tracing,
    )
    try:
        # Fail closed: a gateway whose sandbox does not work must not serve.
        details = await sandbox.self_test()
        log.info("sandbox self-test passed", **{k: str(v) for k, v in details.items()})
        await _wait_for_policy(policy, POLICY_STARTUP_WAIT_S)
        await audit.write("gateway.started", {"policy_engine": policy.name})
        # Holding the audit log's lock, this process owns the state directory:
        # sandboxes still bound to its workspaces belong to a gateway that died.
        orphans = await asyncio.to_thread(
            kill_orphans, str(config.sandbox.bwrap), str(workspaces.root)
        )
        if orphans:
            log.warning("killed sandboxes left by a previous gateway", pids=orphans)
            await audit.write("sandbox.orphans_killed", {"pids": orphans})
        await tasks.start()
        reloader = (
            PolicyReloader(policy, config.policy.dir, metrics)
            if isinstance(policy, Reloadable)
            else None
        )
        gateway = Gateway(
            config,
            policy=policy,
            sandbox=sandbox,
            audit=audit,
            tasks=tasks,
            workspaces=workspaces,
            metrics=metrics,
            reloader=reloader,
            tracing=tracing,
        )
        async with contextlib.AsyncExitStack() as stack:
            if config.ha.vrrp_state_file is not None:
                vrrp = VrrpRole(config.ha.vrrp_state_file, metrics)
                await stack.enter_async_context(vrrp.watching(config.ha.poll_interval_s))
                gateway.vrrp_role = vrrp.refresh
            if reloader is not None:
                await stack.enter_async_context(reloader.watching(config.policy.watch_interval_s))
            yield gateway
    finally:
        await tasks.close(config.server.shutdown_grace_s)
        with contextlib.suppress(Exception):
            await audit.write("gateway.stopped", {})
        await policy.close()
        store.close()
        if owned_sandbox is not None:
            await owned_sandbox.settle()
            owned_sandbox.close()
        await audit.close()
        if parts.tracing is None:
            # Flushes the spans still queued (bounded by tracing.timeout_s).
            await asyncio.to_thread(tracing.shutdown)


def build_app(config: Config, parts: Components | None = None) -> web.Application:
    """The aiohttp application: REST routes over a gateway built at start-up."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.server.max_body_bytes
    )
    app[AUTH] = TokenAuthenticator.from_config(config)
    public = set(config.server.public_paths)
    if config.auth.oauth is not None:
        public.update(add_metadata_routes(app, config.auth.oauth))
    app[PUBLIC] = frozenset(public)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with open_gateway(config, parts) as gateway:
            app[GATEWAY] = gateway
            yield

    app.cleanup_ctx.append(lifecycle)
    add_routes(app)
    add_mcp_routes(app)
    return app
