"""The worker's HTTP side-port: liveness, readiness and Prometheus metrics.

- ``GET /health/live``: 200 when the event loop answers and ``liveness()`` returns no
  reasons, else 503 with ``{"status": "not_live", "reasons": [...]}`` (the engine
  failed or stalled: restart the process).
- ``GET /health/ready``: 200 when ``readiness()`` returns no reasons, else 503 with
  ``{"status": "not_ready", "reasons": [...]}`` (model loading, not in the group, ...).
- ``GET /metrics``: the Prometheus text exposition of ``registry``.

The server knows nothing about the engine or the Kafka worker: the caller passes the
liveness and readiness functions and a registry, so tests can pass fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Readiness = Callable[[], list[str]]


class HealthServer:
    """Serves the health and metrics endpoints on ``host:port`` (port 0: any free port).

    ``on_scrape`` runs before each ``/metrics`` answer, to refresh gauges that are
    cheaper to read on demand (GPU memory).
    """

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        registry: CollectorRegistry,
        on_scrape: Callable[[], None] | None = None,
        liveness: Readiness | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._readiness = readiness
        self._liveness = liveness or list
        self._registry = registry
        self._on_scrape = on_scrape
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    def make_app(self) -> web.Application:
        """The aiohttp application (also usable with ``aiohttp.test_utils.TestServer``)."""
        app = web.Application()
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        return app

    @property
    def port(self) -> int:
        """The port actually bound (differs from the setting when that was 0)."""
        if self._bound_port is None:
            raise RuntimeError("the HTTP server is not started")
        return self._bound_port

    @property
    def serving(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._runner is not None

    async def start(self) -> None:
        """Bind and start serving; raises ``OSError`` when the port is taken."""
        runner = web.AppRunner(self.make_app(), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = _bound_port(runner, self._port)
        log.info("HTTP side-port listening on %s:%d", self._host, self._bound_port)

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _live(self, request: web.Request) -> web.Response:
        return _check(self._liveness, "live", "not_live")

    async def _ready(self, request: web.Request) -> web.Response:
        return _check(self._readiness, "ready", "not_ready")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._on_scrape is not None:
            try:
                self._on_scrape()
            except Exception:  # stale gauges beat a failed scrape
                log.exception("refreshing metrics before a scrape failed")
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _check(check: Readiness, ok: str, not_ok: str) -> web.Response:
    try:
        reasons = list(check())
    except Exception as exc:  # a broken check must answer "not ok", not 500
        log.exception("health check failed")
        reasons = [f"health check failed: {exc}"]
    if reasons:
        return web.json_response({"status": not_ok, "reasons": reasons}, status=503)
    return web.json_response({"status": ok})


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
