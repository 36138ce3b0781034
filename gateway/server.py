"""Running the gateway: listeners, signals and ordered shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl

import structlog
from aiohttp import web

from gateway.app import Components, build_app
from gateway.config import Config
from gateway.errors import McpError
from gateway.grpc_server import start_grpc
from gateway.grpc_server import stop as stop_grpc
from gateway.notify import Notifier
from gateway.rest import AUTH, GATEWAY
from gateway.tls import grpc_server_credentials, rest_ssl_context

log = structlog.get_logger("gateway.server")

# Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 10_000


async def serve(
    config: Config, parts: Components | None = None, notifier: Notifier | None = None
) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code.

    Shutdown order: stop accepting, give running tasks the grace period
    (the app's cleanup does that), then close the audit log last.  Under
    systemd (``Type=notify``) it reports READY once both listeners serve,
    pings the watchdog from the event loop, and reports RELOADING/READY
    around a SIGHUP policy reload and STOPPING at shutdown.
    """
    notifier = notifier or Notifier()
    app = build_app(config, parts)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
    except McpError as exc:  # start-up checks failed: refuse to serve
        log.error("gateway failed to start", error=exc.message, code=str(exc.code))
        return 1
    except Exception:  # an unexpected failure: the operator needs the trace
        log.exception("gateway failed to start")
        return 1
    tls = config.tls
    try:
        ssl_context = rest_ssl_context(tls) if tls.enabled else None
        grpc_credentials = grpc_server_credentials(tls) if tls.enabled else None
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.error("cannot load TLS certificates", error=str(exc))
        await runner.cleanup()
        return 1
    site = web.TCPSite(
        runner,
        config.server.host,
        config.server.port,
        reuse_address=True,
        ssl_context=ssl_context,
    )
    try:
        await site.start()
    except OSError as exc:
        log.error(
            "cannot listen", host=config.server.host, port=config.server.port, error=exc.strerror
        )
        await runner.cleanup()
        return 1
    log.info(
        "gateway listening",
        host=config.server.host,
        port=config.server.port,
        tls=tls.enabled,
        client_auth=tls.client_auth if tls.client_ca_file else "off",
    )
    try:
        grpc_server, grpc_port = await start_grpc(
            app[GATEWAY], app[AUTH], config.grpc.host, config.grpc.port, grpc_credentials
        )
    except (OSError, RuntimeError) as exc:
        log.error(
            "cannot listen (grpc)", host=config.grpc.host, port=config.grpc.port, error=str(exc)
        )
        await runner.cleanup()
        return 1
    log.info("grpc listening", host=config.grpc.host, port=grpc_port, tls=tls.enabled)
    # Everything made so far lives as long as the process: keep it out of
    # the cyclic collector's way, and collect the young generation less often
    # (each request allocates many short-lived objects, few of them cyclic).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    status = f"serving REST on {config.server.host}:{config.server.port}, gRPC on port {grpc_port}"

    async def reload() -> bool:
        notifier.reloading()
        try:
            return await app[GATEWAY].reload_policy("SIGHUP")
        finally:
            notifier.ready(status)

    def on_hup() -> None:
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    notifier.ready(status)
    async with notifier.pinging():
        await stop.wait()
        log.info("shutting down")
        notifier.stopping()
    # gRPC health goes NOT_SERVING and in-flight RPCs get the grace period
    # while the gateway (tasks, audit) is still open.
    await stop_grpc(grpc_server, config.server.shutdown_grace_s)
    await runner.shutdown()
    await runner.cleanup()
    return 0
