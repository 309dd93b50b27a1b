"""The gateway process: HTTP server, SDK client and worker watch, started and stopped together.

SIGTERM or SIGINT: stop taking calls, let those in flight finish (at most 30 s), then return.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from gateway.app import Gateway
from gateway.connection import ClientHolder
from gateway.limits import limit_connections
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.workers import WorkerWatch

log = logging.getLogger("gateway")

# In-flight calls get this long to finish after a stop signal.
_SHUTDOWN_GRACE_S = 30.0


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain and close."""
    watch = _worker_watch(settings)
    holder = ClientHolder(settings, before_ready=watch.look if watch is not None else None)
    gateway = Gateway(settings, holder.get, GatewayMetrics(), watch)
    # No access log: one line per call is noise at this rate; /metrics counts the calls.
    runner = web.AppRunner(
        gateway.make_app(),
        handle_signals=False,
        shutdown_timeout=_SHUTDOWN_GRACE_S,
        access_log=None,
        # aiohttp closes a connection that brings no whole request for this long, from
        # its start too: the deadline of a request's line and headers
        keepalive_timeout=settings.header_timeout_s,
    )
    await runner.setup()
    assert runner.server is not None
    limit_connections(runner.server, settings.max_connections)
    await web.TCPSite(runner, settings.host, settings.port).start()
    log.info("rerank-gateway listening on %s:%d", settings.host, settings.port)
    holder.start()
    if watch is not None:
        watch.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping: finishing the calls in flight")
        gateway.stopping = True
        await runner.cleanup()
        if watch is not None:
            await watch.stop()
        await holder.close()
        log.info("rerank-gateway stopped")


def _worker_watch(settings: GatewaySettings) -> WorkerWatch | None:
    if settings.check_workers_s <= 0:
        return None
    return WorkerWatch(
        settings.bootstrap_servers,
        settings.group_id,
        settings.security.aiokafka_kwargs(),
        settings.check_workers_s,
    )


async def run(settings: GatewaySettings) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)
