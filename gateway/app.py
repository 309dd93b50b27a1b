"""The gateway's HTTP side: each rerank call becomes one request through Kafka.

Routes: ``POST /v2/rerank`` and ``/v1/rerank`` (Cohere), ``POST /rerank`` (TEI with
``texts``, the wire contract with ``documents``), ``GET /health/live``,
``/health/ready`` and ``/metrics``.

Errors carry the status each API uses: invalid input 400 (Cohere) or 422 (TEI, native),
413 too large, 401 without the bearer token, 429 when ``max_concurrency`` calls are in
flight, 504 when the service said the deadline passed, 503 with ``Retry-After`` when no
reply came in time, no worker is in the group, or Kafka is not reachable.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.shapes import (
    COHERE_V1,
    COHERE_V2,
    BadRequest,
    Failure,
    RerankCall,
    Shape,
    shape_of_root_rerank,
)
from producer_sdk.client import RerankClient
from producer_sdk.errors import (
    DeliveryError,
    InvalidArgument,
    MalformedReply,
    RerankError,
    RerankErrorReply,
    RerankTimeout,
)
from producer_sdk.result import RerankResult

log = logging.getLogger(__name__)

_REPLY_CODES = {
    "invalid_request": Failure.INVALID,
    "payload_too_large": Failure.TOO_LARGE,
    "deadline_exceeded": Failure.DEADLINE,
}


class WorkerPresence(Protocol):
    """What the gateway knows of the workers' group (:class:`gateway.workers.WorkerWatch`)."""

    members: int | None  # None: not known

    @property
    def none_there(self) -> bool: ...


class CallFailed(Exception):
    """A call that ends in an error answer."""

    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


class Gateway:
    """The aiohttp application around one SDK client.

    ``reranker()`` returns the connected client, or None while there is none (the
    gateway then answers 503 and is not ready).
    """

    def __init__(
        self,
        settings: GatewaySettings,
        reranker: Callable[[], RerankClient | None],
        metrics: GatewayMetrics,
        workers: WorkerPresence | None = None,
    ) -> None:
        self._settings = settings
        self._reranker = reranker
        self._metrics = metrics
        self._workers = workers
        self._in_flight = 0
        self.stopping = False

    def make_app(self) -> web.Application:
        """The application; body size is limited by aiohttp (413 past the limit)."""
        app = web.Application(client_max_size=self._settings.max_body_bytes)
        app.router.add_post("/v2/rerank", self._route(lambda _body: COHERE_V2))
        app.router.add_post("/v1/rerank", self._route(lambda _body: COHERE_V1))
        app.router.add_post("/rerank", self._route(shape_of_root_rerank))
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/health", self._ready)
        app.router.add_get("/metrics", self._metrics_page)
        return app

    def not_ready_reasons(self) -> list[str]:
        """Why the gateway cannot pass calls on now; empty when it can."""
        reasons = []
        if self.stopping:
            reasons.append("stopping")
        if self._reranker() is None:
            reasons.append("not connected to Kafka")
        return reasons

    # -- rerank calls --------------------------------------------------------------------

    def _route(
        self, pick_shape: Callable[[Any], Shape]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._serve(request, pick_shape)

        return handle

    async def _serve(
        self, request: web.Request, pick_shape: Callable[[Any], Shape]
    ) -> web.Response:
        started = time.monotonic()
        shape = pick_shape(None)
        try:
            self._authorize(request)
            body = await self._read_json(request)
            shape = pick_shape(body)
            call = _parse(shape, body)
            # the caller's W3C trace context goes on in the request record, so the
            # worker's spans join the caller's trace
            context = otel_context.attach(propagate.extract(request.headers))
            try:
                result = await self._rerank(call)
            finally:
                otel_context.detach(context)
            answer = shape.render(call, result)
            response = web.Response(body=orjson.dumps(answer), content_type="application/json")
        except CallFailed as failed:
            response = self._error(shape, failed)
        self._metrics.requests.labels(shape.name, str(response.status)).inc()
        self._metrics.duration.labels(shape.name).observe(time.monotonic() - started)
        return response

    def _authorize(self, request: web.Request) -> None:
        token = self._settings.api_token
        if token is None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise CallFailed(Failure.UNAUTHORIZED, "a valid bearer token is required")

    async def _read_json(self, request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self._settings.max_body_bytes
            raise CallFailed(Failure.TOO_LARGE, f"the body is over {limit} bytes") from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise CallFailed(Failure.INVALID, f"the body is not valid JSON: {error}") from None

    async def _rerank(self, call: RerankCall) -> RerankResult:
        reranker = self._reranker()
        if reranker is None or self.stopping:
            raise CallFailed(Failure.UNAVAILABLE, "the gateway is not connected to Kafka")
        if self._workers is not None and self._workers.none_there:
            raise CallFailed(Failure.UNAVAILABLE, "no rerank worker is running")
        if self._in_flight >= self._settings.max_concurrency:
            raise CallFailed(Failure.OVERLOADED, "too many calls in flight; try again shortly")
        self._in_flight += 1
        self._metrics.in_flight.inc()
        try:
            return await reranker.rerank(
                call.query, call.documents, **_options(call, self._settings)
            )
        except RerankError as error:
            raise _failure_of(error) from None
        finally:
            self._in_flight -= 1
            self._metrics.in_flight.dec()

    def _error(self, shape: Shape, failed: CallFailed) -> web.Response:
        status = shape.status(failed.failure)
        headers = {}
        if failed.failure in (Failure.OVERLOADED, Failure.UNAVAILABLE):
            headers["Retry-After"] = str(self._settings.retry_after_s)
        if failed.failure is Failure.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        if status >= 500:
            log.warning("rerank call failed", extra={"status": status, "reason": failed.message})
        body = orjson.dumps(shape.error(failed.failure, failed.message))
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    # -- health and metrics --------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _ready(self, request: web.Request) -> web.Response:
        reasons = self.not_ready_reasons()
        if reasons:
            return web.json_response({"status": "not_ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})

    async def _metrics_page(self, request: web.Request) -> web.Response:
        members = self._workers.members if self._workers is not None else None
        self._metrics.workers.set(-1 if members is None else members)
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _parse(shape: Shape, body: Any) -> RerankCall:
    try:
        return shape.parse(body)
    except BadRequest as error:
        raise CallFailed(Failure.INVALID, str(error)) from None


def _options(call: RerankCall, settings: GatewaySettings) -> dict[str, Any]:
    # Documents are not asked back from the worker: the gateway has them already.
    options: dict[str, Any] = {
        "instruction": call.instruction,
        "top_n": call.top_n,
        "raw_scores": call.raw_scores,
        "timeout": settings.timeout_s,
        "split_long_documents": call.split_long_documents,
    }
    if call.truncate is not None:  # None: the service's default (it truncates)
        options["truncate"] = call.truncate
    return options


def _failure_of(error: RerankError) -> CallFailed:
    """The answer an SDK error turns into."""
    if isinstance(error, RerankErrorReply):
        failure = _REPLY_CODES.get(error.code)
        if failure is None:
            failure = Failure.UNAVAILABLE if error.retriable else Failure.INTERNAL
        return CallFailed(failure, error.message)
    if isinstance(error, InvalidArgument):
        return CallFailed(Failure.INVALID, str(error))
    if isinstance(error, RerankTimeout):
        return CallFailed(Failure.UNAVAILABLE, f"no reply from the rerank service: {error}")
    if isinstance(error, MalformedReply):
        return CallFailed(Failure.BAD_REPLY, str(error))
    if isinstance(error, DeliveryError) and not error.retriable:
        return CallFailed(Failure.INTERNAL, f"the request could not be sent: {error}")
    return CallFailed(Failure.UNAVAILABLE, str(error))
