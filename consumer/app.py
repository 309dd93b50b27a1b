"""The worker process: settings -> logging -> HTTP side-port -> model -> engine -> worker.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT: drain, commit, leave the group),
1 when the service cannot start or fails while running (one clear log line), 2 for
invalid settings (one line per problem on stderr). A second signal exits at once
with 128 + the signal number.

The HTTP side-port starts first, so ``/health/live`` answers while the model loads
and ``/health/ready`` says why the worker is not ready yet.

An engine that fails for good (broken model, stalled GPU) makes the service step aside:
the worker stops fetching, leaves the requests it could not score uncommitted (the group
hands them to healthy workers), leaves the group, and the process exits 1 so that its
supervisor restarts it. Meanwhile ``/health/live`` and ``/health/ready`` answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiokafka.errors import KafkaError

from consumer.engine.api import EngineError, RerankEngine
from consumer.logging_setup import configure_logging
from consumer.service.gpu_stats import refresh_gpu_memory
from consumer.service.http_server import HealthServer
from consumer.service.metrics import Metrics
from consumer.settings import Settings, SettingsError, load_settings
from consumer.tracing_setup import TracingUnavailable, tracer_provider

if TYPE_CHECKING:
    from consumer.runtime.loader import LoadedModel

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
# After the drain timeout the worker gets this much longer to commit and leave its
# group before the service gives up on it.
STOP_GRACE_S = 10.0
# How often the service looks whether the engine has failed.
ENGINE_WATCH_S = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")


class ServiceError(Exception):
    """The service cannot start or go on; the message says why in one line."""


class Worker(Protocol):
    """What the service needs from the Kafka worker (``consumer.service.worker.Worker``)."""

    @property
    def not_ready_reasons(self) -> list[str]: ...

    async def run(self) -> None: ...

    def request_stop(self) -> None: ...


@dataclass(frozen=True)
class Parts:
    """How the service builds its parts; tests replace them with fakes.

    ``load_model`` runs in a thread and raises :class:`ServiceError` when the model
    cannot be loaded; the other two run on the event loop.
    """

    load_model: Callable[[Settings], LoadedModel]
    make_engine: Callable[[LoadedModel, Settings, Metrics], RerankEngine]
    make_worker: Callable[[Settings, RerankEngine, Metrics], Worker]


def load_real_model(settings: Settings) -> LoadedModel:
    """Load the configured model (imports torch: call it off the event loop)."""
    from consumer.runtime.loader import ModelLoadError, load_model

    try:
        return load_model(settings.model_options())
    except ModelLoadError as exc:
        raise ServiceError(str(exc)) from exc


def make_real_engine(model: LoadedModel, settings: Settings, metrics: Metrics) -> RerankEngine:
    """The batching engine over a loaded model."""
    from consumer.engine.engine import Engine

    return Engine.for_model(model, settings.engine_settings(), metrics)


def make_kafka_worker(settings: Settings, engine: RerankEngine, metrics: Metrics) -> Worker:
    """The Kafka consumer/producer pipeline."""
    from consumer.service.worker import Worker as KafkaWorker

    return KafkaWorker(settings.worker_config(), engine, metrics)


REAL_PARTS = Parts(
    load_model=load_real_model, make_engine=make_real_engine, make_worker=make_kafka_worker
)


class Service:
    """One worker process's lifecycle; :meth:`run` returns the exit code."""

    def __init__(self, settings: Settings, parts: Parts, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self._parts = parts
        self._model: LoadedModel | None = None
        self._engine: RerankEngine | None = None
        self._worker: Worker | None = None
        self._main: asyncio.Task[Any] | None = None
        self._signals = 0
        self._stopping = False
        self._gave_up = False
        self._give_up_timer: asyncio.TimerHandle | None = None
        self.http: HealthServer | None = None

    # --- health ----------------------------------------------------------------------

    def liveness(self) -> list[str]:
        """Why the process should be restarted; empty while it is alive and well."""
        failure = self._engine.failure if self._engine is not None else None
        return [f"engine failed: {failure}"] if failure is not None else []

    def readiness(self) -> list[str]:
        """Why the worker should not get traffic yet; empty when it is ready."""
        if self._worker is not None:  # it also checks the engine
            return self._worker.not_ready_reasons
        reasons = ["stopping"] if self._stopping else []
        if self._model is None:
            reasons.append("model loading")
        elif self._engine is None or not self._engine.ready:
            reasons.append("model warming up")
        reasons.append("Kafka consumer not started")
        return reasons

    def _refresh_gauges(self) -> None:
        """Before each scrape: the ready gauge (what /health/ready would say), GPU memory."""
        self.metrics.ready.set(0 if self.readiness() else 1)
        if self._model is not None:
            refresh_gpu_memory(self.metrics.gpu_memory, self._model.device)

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until a stop signal (or a failure); returns the process exit code."""
        self._main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        started = time.monotonic()
        try:
            code = await self._serve()
        except asyncio.CancelledError:
            if not (self._stopping or self._gave_up):
                raise  # cancelled by someone else: not ours to swallow
            code = EXIT_FAILED if self._gave_up else EXIT_OK
        except ServiceError as exc:
            log.error("%s", exc)
            code = EXIT_FAILED
        except Exception as exc:
            if isinstance(exc, KafkaError):  # e.g. no broker, not authorized: one line will do
                log.error("Kafka failed: %s", _named(exc))
            else:
                log.exception("the worker failed")
            code = EXIT_FAILED
        finally:
            if self._give_up_timer is not None:
                self._give_up_timer.cancel()
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
        log.info(
            "rerank worker stopped: exit code %d after %.1f s",
            code,
            time.monotonic() - started,
            extra={"exit_code": code},
        )
        return code

    async def _serve(self) -> int:
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            self.http = HealthServer(
                settings.http_host,
                settings.http_port,
                self.readiness,
                self.metrics.registry,
                on_scrape=self._refresh_gauges,
                liveness=self.liveness,
            )
            try:
                await self.http.start()
            except OSError as exc:
                raise ServiceError(
                    f"cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc}"
                ) from exc
            stack.push_async_callback(self.http.stop)

            self._model = await self._load_model()
            engine = self._parts.make_engine(self._model, settings, self.metrics)
            self._engine = engine
            stack.push_async_callback(engine.close)
            await self._start_engine(engine)
            if settings.gc_freeze:
                frozen = freeze_heap()
                log.info("froze %d objects out of the garbage collector's reach", frozen)

            worker = self._parts.make_worker(settings, engine, self.metrics)
            self._worker = worker
            if self._stopping:  # a signal came while starting
                return EXIT_OK
            watch = asyncio.create_task(self._step_aside_when_failed(engine, worker))
            try:
                await worker.run()
            finally:
                watch.cancel()
            if engine.failure is not None:
                raise ServiceError(f"stepped aside: the engine failed: {engine.failure}")
            if not self._stopping:
                raise ServiceError("the Kafka worker stopped without being asked to")
        return EXIT_OK

    async def _step_aside_when_failed(self, engine: RerankEngine, worker: Worker) -> None:
        """When the engine fails, stop the worker: its unscored requests go to others."""
        while engine.failure is None:
            await asyncio.sleep(ENGINE_WATCH_S)
        log.error(
            "the engine failed; stepping aside: no more requests are taken, unscored ones "
            "stay uncommitted for the other workers, and the process exits 1",
            extra={"reason": engine.failure},
        )
        worker.request_stop()

    async def _load_model(self) -> LoadedModel:
        started = time.monotonic()
        model = await run_in_daemon_thread(self._parts.load_model, self.settings)
        log.info("model %s loaded in %.1f s", model.name, time.monotonic() - started)
        return model

    async def _start_engine(self, engine: RerankEngine) -> None:
        try:
            await engine.start()
        except EngineError as exc:
            raise ServiceError(f"the engine cannot start: {exc}") from exc

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            # The operator insists: no drain, no commit (uncommitted work is redelivered).
            print(f"{name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self._stopping = True
        if self._worker is not None:
            log.info(
                "%s: draining in-flight requests (up to %.0f s), then leaving the group",
                name,
                self.settings.drain_timeout_s,
            )
            self._worker.request_stop()
            self._give_up_timer = asyncio.get_running_loop().call_later(
                self.settings.drain_timeout_s + STOP_GRACE_S, self._give_up
            )
        else:
            log.info("%s while starting: stopping", name)
            self._cancel_main()

    def _give_up(self) -> None:
        log.error(
            "the worker did not stop within %.0f s; stopping without it",
            self.settings.drain_timeout_s + STOP_GRACE_S,
        )
        self._gave_up = True
        self._cancel_main()

    def _cancel_main(self) -> None:
        if self._main is not None:
            self._main.cancel()


def freeze_heap() -> int:
    """Move every object alive now out of the collector's reach; returns how many.

    The model, the tokenizer and the libraries leave several hundred thousand long-lived
    objects. Each full (generation 2) collection walked them all: pauses of 0.47-0.55 s
    on an H200 host under load, in the middle of serving (the e2e benchmark's GC probe,
    docs/benchmarks.md). Frozen, they are skipped; garbage made while serving is still
    collected.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn(*args)`` in a daemon thread and await its result.

    Unlike the default executor, a daemon thread does not hold up the exit of a process
    told to stop in the middle of a model load.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="rerank-model-load", daemon=True).start()
    return await future


def _named(exc: BaseException) -> str:
    """``Type: message``; aiokafka's errors already start their text with the type."""
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def _print_problems(problems: Sequence[str]) -> None:
    for problem in problems:
        print(f"rerank-consumer: invalid settings: {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, parts: Parts = REAL_PARTS) -> int:
    """Run the worker; returns the process exit code."""
    try:
        settings = load_settings(argv)
        # The dataclasses check themselves too; their refusals are settings problems.
        settings.worker_config()
        settings.engine_settings()
        settings.model_options()
    except SettingsError as exc:
        _print_problems(exc.problems)
        return EXIT_BAD_SETTINGS
    except ValueError as exc:
        _print_problems([str(exc)])
        return EXIT_BAD_SETTINGS
    configure_logging(settings.log_level, settings.log_format)
    # Progress bars (weights loading) would break the one-record-a-line log output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        tracing = tracer_provider(settings.tracing)
    except TracingUnavailable as exc:
        _print_problems([str(exc)])
        return EXIT_BAD_SETTINGS
    if tracing is not None:
        from opentelemetry import trace

        trace.set_tracer_provider(tracing)  # the worker finds it when it is built
    log.info("rerank worker starting", extra={"settings": settings.masked()})
    try:
        return asyncio.run(_run(settings, parts))
    finally:
        if tracing is not None:
            tracing.shutdown()  # exports the spans still buffered


async def _run(settings: Settings, parts: Parts) -> int:
    return await Service(settings, parts).run()
