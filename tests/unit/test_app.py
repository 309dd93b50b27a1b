"""The service lifecycle with fakes of our own parts (model, engine, worker).

Real signals, the real model and the real Kafka worker are covered by
tests/integration/test_service_process.py; here the signal handler is called directly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from consumer.app import EXIT_FAILED, EXIT_OK, Parts, Service, ServiceError
from consumer.engine.api import EngineError, RerankEngine, ScoreRequest, ScoreResult
from consumer.service.metrics import Metrics
from consumer.settings import Settings, settings_from

WAIT_S = 5.0


@dataclass
class FakeModel:
    name: str = "fake/reranker"
    device: str = "cpu"


class FakeEngine:
    def __init__(self, fail_start: bool = False) -> None:
        self.fail_start = fail_start
        self.started = False
        self.closed = False
        self.failed: str | None = None

    @property
    def model_name(self) -> str:
        return "fake/reranker"

    @property
    def ready(self) -> bool:
        return self.started and not self.closed

    @property
    def in_flight_pairs(self) -> int:
        return 0

    @property
    def failure(self) -> str | None:
        return self.failed

    def fail(self, reason: str) -> None:
        self.failed = reason

    async def start(self) -> None:
        if self.fail_start:
            raise EngineError("warm-up failed: out of memory")
        self.started = True

    async def score(self, request: ScoreRequest) -> ScoreResult:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed = True


class FakeWorker:
    def __init__(self, engine: RerankEngine, fail: Exception | None = None) -> None:
        self.engine = engine
        self.fail = fail
        self.stop_requests = 0
        self.joined = asyncio.Event()
        self._stop = asyncio.Event()
        self.finished = False

    @property
    def not_ready_reasons(self) -> list[str]:
        if not self.joined.is_set():
            return ["not in the consumer group (joining or rebalancing)"]
        return [] if self.engine.ready else ["engine not ready"]

    def request_stop(self) -> None:
        self.stop_requests += 1
        self._stop.set()

    async def run(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.joined.set()
        await self._stop.wait()
        self.finished = True


@dataclass
class FakeParts:
    """Builds fakes and remembers them; the model load waits for ``release_load``."""

    load_error: Exception | None = None
    engine_fails: bool = False
    worker_fails: Exception | None = None
    release_load: threading.Event = field(default_factory=threading.Event)
    engines: list[FakeEngine] = field(default_factory=list)
    workers: list[FakeWorker] = field(default_factory=list)

    def parts(self) -> Parts:
        return Parts(load_model=self._load, make_engine=self._engine, make_worker=self._worker)

    def _load(self, settings: Settings) -> Any:
        self.release_load.wait()
        if self.load_error is not None:
            raise self.load_error
        return FakeModel()

    def _engine(self, model: Any, settings: Settings, metrics: Metrics) -> RerankEngine:
        self.engines.append(FakeEngine(self.engine_fails))
        return self.engines[-1]

    def _worker(self, settings: Settings, engine: RerankEngine, metrics: Metrics) -> FakeWorker:
        self.workers.append(FakeWorker(engine, self.worker_fails))
        return self.workers[-1]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as client:
        yield client


def make_service(fakes: FakeParts, **overrides: Any) -> Service:
    settings = settings_from({"http_host": "127.0.0.1", "http_port": 0, **overrides})
    return Service(settings, fakes.parts(), Metrics(CollectorRegistry()))


async def wait_for(condition: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.01)


async def get(session: aiohttp.ClientSession, service: Service, path: str) -> tuple[int, Any]:
    assert service.http is not None
    async with session.get(f"http://127.0.0.1:{service.http.port}{path}") as response:
        return response.status, await response.json()


async def metrics_text(session: aiohttp.ClientSession, service: Service) -> str:
    assert service.http is not None
    async with session.get(f"http://127.0.0.1:{service.http.port}/metrics") as response:
        return await response.text()


async def test_health_answers_during_model_load_then_ready_then_clean_stop(session) -> None:
    fakes = FakeParts()
    service = make_service(fakes)
    running = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: service.http is not None and service.http.serving)

        assert await get(session, service, "/health/live") == (200, {"status": "live"})
        status, body = await get(session, service, "/health/ready")
        assert status == 503
        assert "model loading" in body["reasons"]
        assert "rerank_ready 0.0" in await metrics_text(session, service)

        fakes.release_load.set()
        await wait_for(lambda: fakes.workers and fakes.workers[0].joined.is_set())
        assert await get(session, service, "/health/ready") == (200, {"status": "ready"})
        assert "rerank_ready 1.0" in await metrics_text(session, service)

        service._on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running, WAIT_S) == EXIT_OK
    finally:
        fakes.release_load.set()
        running.cancel()

    worker, engine = fakes.workers[0], fakes.engines[0]
    assert worker.stop_requests == 1
    assert worker.finished
    assert engine.closed
    assert service.http is not None and not service.http.serving  # port released


async def test_model_load_error_is_one_line_and_exit_1(caplog) -> None:
    fakes = FakeParts(load_error=ServiceError("cannot load model '/nope': no such folder"))
    fakes.release_load.set()
    service = make_service(fakes)

    with caplog.at_level(logging.ERROR, logger="consumer.app"):
        code = await asyncio.wait_for(service.run(), WAIT_S)

    assert code == EXIT_FAILED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["cannot load model '/nope': no such folder"]
    assert errors[0].exc_info is None
    assert not fakes.engines


async def test_engine_start_failure_exits_1_and_closes_the_engine(caplog) -> None:
    fakes = FakeParts(engine_fails=True)
    fakes.release_load.set()
    service = make_service(fakes)

    with caplog.at_level(logging.ERROR, logger="consumer.app"):
        code = await asyncio.wait_for(service.run(), WAIT_S)

    assert code == EXIT_FAILED
    assert "out of memory" in caplog.text
    assert fakes.engines[0].closed
    assert not fakes.workers


async def test_a_failing_worker_exits_1_after_cleanup(caplog) -> None:
    fakes = FakeParts(worker_fails=RuntimeError("bug in the fetch loop"))
    fakes.release_load.set()
    service = make_service(fakes)

    with caplog.at_level(logging.ERROR, logger="consumer.app"):
        code = await asyncio.wait_for(service.run(), WAIT_S)

    assert code == EXIT_FAILED
    assert "bug in the fetch loop" in caplog.text
    assert fakes.engines[0].closed


async def test_signal_during_model_load_stops_at_once() -> None:
    fakes = FakeParts()  # the load never finishes on its own
    service = make_service(fakes)
    running = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: service.http is not None and service.http.serving)
        service._on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running, WAIT_S) == EXIT_OK
    finally:
        fakes.release_load.set()  # let the daemon thread end
    assert not fakes.engines


async def test_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr("consumer.app.os._exit", exits.append)
    fakes = FakeParts()
    fakes.release_load.set()
    service = make_service(fakes)
    running = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: fakes.workers and fakes.workers[0].joined.is_set())
        service._on_signal(signal.SIGINT)
        service._on_signal(signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
        assert await asyncio.wait_for(running, WAIT_S) == EXIT_OK
    finally:
        running.cancel()


async def test_a_worker_that_ignores_stop_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("consumer.app.STOP_GRACE_S", 0.0)
    fakes = FakeParts()
    fakes.release_load.set()
    service = make_service(fakes, drain_timeout_s=0.05)
    running = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: fakes.workers and fakes.workers[0].joined.is_set())
        worker = fakes.workers[0]
        worker.request_stop = lambda: None  # type: ignore[method-assign]
        service._on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running, WAIT_S) == EXIT_FAILED
    finally:
        running.cancel()
    assert fakes.engines[0].closed


async def test_a_taken_http_port_is_one_clear_line(caplog) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fakes = FakeParts()
        fakes.release_load.set()
        service = make_service(fakes, http_port=taken.getsockname()[1])
        with caplog.at_level(logging.ERROR, logger="consumer.app"):
            code = await asyncio.wait_for(service.run(), WAIT_S)

    assert code == EXIT_FAILED
    assert "cannot serve HTTP" in caplog.text
    assert not fakes.engines


async def test_a_failed_engine_makes_the_service_step_aside_and_exit_1(session, caplog) -> None:
    """The engine fails for good: not live, not ready, the worker is stopped (its
    unscored requests stay uncommitted for the group) and the process exits 1."""
    fakes = FakeParts()
    fakes.release_load.set()
    service = make_service(fakes)
    running = asyncio.create_task(service.run())
    await wait_for(lambda: fakes.workers and fakes.workers[0].joined.is_set())
    assert (await get(session, service, "/health/live"))[0] == 200
    worker = fakes.workers[0]
    # A worker that takes its time to drain, so the health answers can be read meanwhile.
    stop = worker.request_stop

    def slow_stop() -> None:
        worker.stop_requests += 1
        asyncio.get_running_loop().call_later(0.5, stop)

    worker.request_stop = slow_stop  # type: ignore[method-assign]
    fakes.engines[0].fail("the model failed its check batch")
    await wait_for(lambda: worker.stop_requests >= 1)
    status, body = await get(session, service, "/health/live")
    assert status == 503 and body["reasons"] == ["engine failed: the model failed its check batch"]
    code = await asyncio.wait_for(running, WAIT_S)
    assert code == EXIT_FAILED
    assert any("stepped aside" in r.getMessage() for r in caplog.records)


def test_freeze_heap_puts_live_objects_out_of_the_collectors_reach() -> None:
    import gc

    from consumer.app import freeze_heap

    kept = [{"n": i} for i in range(1000)]
    try:
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("gc_freeze", [True, False])
async def test_the_heap_is_frozen_once_the_engine_is_warm_unless_switched_off(
    monkeypatch: pytest.MonkeyPatch, gc_freeze: bool
) -> None:
    import consumer.app

    calls: list[bool] = []

    def fake_freeze() -> int:
        calls.append(fakes.engines[0].started)
        return 1

    monkeypatch.setattr(consumer.app, "freeze_heap", fake_freeze)
    fakes = FakeParts()
    service = make_service(fakes, gc_freeze=gc_freeze)
    running = asyncio.create_task(service.run())
    try:
        fakes.release_load.set()
        await wait_for(lambda: fakes.workers and fakes.workers[0].joined.is_set())
        service._on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running, WAIT_S) == EXIT_OK
    finally:
        running.cancel()
    assert calls == ([True] if gc_freeze else [])
