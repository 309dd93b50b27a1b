"""The Kafka side of the service as one façade: consume requests, answer them, commit
what is done.

One :class:`Worker` is one member of the consumer group. It only composes and delegates:

* :mod:`consumer.service.connection` starts the clients, waiting for the broker;
* :mod:`consumer.service.fetching` polls and hands records to
  :mod:`consumer.service.intake`, which lets them in (the pair gate, flow control,
  :mod:`consumer.service.careful`'s start after a crash) and runs each in its own task;
* :mod:`consumer.service.processing` decodes a record into its context and answers it;
  :mod:`consumer.service.responder` delivers the answer;
* the delivery mode (:mod:`consumer.service.delivery_mode`) decides how answers and
  commits reach Kafka; :mod:`consumer.service.rebalance` sets partitions up and lets
  them go; :mod:`consumer.service.tracing` wraps the parts when tracing is on.

A request the engine could not score because the engine failed is not answered: it
stays uncommitted, and the worker's supervisor (the service) stops the worker, so the
group hands the partition to a healthy member.

The engine's lifecycle is the caller's: start it before :meth:`Worker.run`, close it
after ``run`` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from opentelemetry.trace import TracerProvider

from consumer.engine.api import RerankEngine
from consumer.service.careful import CarefulStart
from consumer.service.connection import ConnectPolicy, KafkaConnector
from consumer.service.delivery_mode import DeliveryMode, delivery_mode
from consumer.service.failures import NotAuthorized
from consumer.service.fetching import FetchLoop
from consumer.service.intake import Intake, cancel_all, uncount_attempts
from consumer.service.kafka_clients import make_consumer, make_offsets_reader, make_producer
from consumer.service.lag import EndOffsets, LagReporter
from consumer.service.membership import StallGuard, membership_lost
from consumer.service.metrics import Metrics
from consumer.service.oldest_first import Lookahead
from consumer.service.partitions import Hold, PartitionWork
from consumer.service.processing import RequestProcessor
from consumer.service.rebalance import Rebalance
from consumer.service.reply_router import ClientTopicLookup, ReplyRouter
from consumer.service.responder import ReplyRetry, Responder
from consumer.service.tracing import worker_tracing
from consumer.service.worker_config import WorkerConfig

__all__ = ["NotAuthorized", "Worker"]

log = logging.getLogger(__name__)

# Stopping a client waits on the broker; a broker that does not answer must not hold
# the process past its drain.
_CLIENT_STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class _Running:
    """The parts that exist once the clients have started."""

    consumer: Any
    producer: Any
    mode: DeliveryMode
    fetch: FetchLoop
    rebalance: Rebalance
    lag: LagReporter
    guard: StallGuard


class Worker:
    """One consumer-group member answering rerank requests with ``engine``.

    Requests are traced (OpenTelemetry, :mod:`consumer.service.tracing`) when
    ``tracer_provider``, or else the global provider, is an SDK one; decided once.
    """

    def __init__(
        self,
        config: WorkerConfig,
        engine: RerankEngine,
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._config = config
        self._engine = engine
        self._metrics = metrics if metrics is not None else Metrics()
        self._tracing = worker_tracing(tracer_provider, config.group_id, config.client_id)
        self._partitions: dict[TopicPartition, PartitionWork] = {}
        # records taken from the consumer, not yet let in: oldest first when room is short
        self._lookahead = Lookahead()
        self._end_offsets = EndOffsets(lambda: make_offsets_reader(config))
        window = config.inflight_high_pairs + config.max_poll_records
        self._careful = CarefulStart(config.max_record_attempts, window, self._end_offsets)
        self._intake = Intake(
            config,
            self._partitions,
            self._careful,
            self._metrics,
            lambda: self._lookahead.size,
        )
        self._connector = KafkaConnector(
            lambda: (make_producer(config), make_consumer(config)),
            config.bootstrap_servers,
            config.security,
            config.client_id,
            ConnectPolicy(timeout_s=config.connect_timeout_s),
        )
        self._running: _Running | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[tuple[Any, Any]] | None = None
        self._stop_requested = False
        self._stopped = False
        self._missing_topics: list[str] = []
        # what stopped the worker that only an operator can fix (run() raises it)
        self._fatal: Exception | None = None

    # ------------------------------------------------------------------ health

    @property
    def in_group(self) -> bool:
        """True while the worker is a member of its group with a current assignment."""
        return self._running is not None and self._running.rebalance.in_group

    @property
    def not_ready_reasons(self) -> list[str]:
        """Why the worker cannot take requests now; empty when it can."""
        reasons: list[str] = []
        running = self._running
        if self._fatal is not None:
            reasons.append(f"failed: {self._fatal}")
        elif self._stop_requested or self._stopped:
            reasons.append("stopping")
        elif self._connector.waiting_reason is not None:
            reasons.append(self._connector.waiting_reason)
        elif running is None:
            reasons.append("not connected to Kafka yet")
        elif not running.rebalance.in_group:
            reasons.append("not in the consumer group (joining or rebalancing)")
        reasons.extend(f"topic {topic!r} does not exist" for topic in self._missing_topics)
        if running is not None:
            if running.fetch.error is not None:
                reasons.append(f"fetching failed: {running.fetch.error}")
            reasons.extend(running.mode.not_ready_reasons())
        if self._engine.failure is not None:
            reasons.append(f"engine failed: {self._engine.failure}")
        elif not self._engine.ready:
            reasons.append("engine not ready")
        return reasons

    @property
    def ready(self) -> bool:
        """True when the worker takes and answers requests."""
        return not self.not_ready_reasons

    @property
    def seconds_since_poll(self) -> float:
        """Seconds since the fetch loop last polled Kafka (0 while a poll is waiting)."""
        return self._running.fetch.seconds_since_poll if self._running is not None else 0.0

    @property
    def in_flight_pairs(self) -> int:
        """(query, document) pairs accepted and not yet answered."""
        return self._intake.gate.pairs

    @property
    def paused(self) -> bool:
        """True while fetching is paused by backpressure."""
        return self._intake.gate.paused

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """Partitions currently assigned to this worker."""
        return frozenset(self._partitions)

    def holds(self, tp: TopicPartition) -> list[Hold]:
        """Why fetching from ``tp`` is held (empty: it is not)."""
        work = self._partitions.get(tp)
        return work.holds if work is not None else []

    # --------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop fetching, drain, commit, leave the group and return."""
        if self._stop_requested:
            return
        self._stop_requested = True
        log.info("worker stop requested", extra={"in_flight_requests": len(self._intake.tasks)})
        # A poll can wait for a whole rebalance; interrupting it loses nothing, because
        # records are only taken once getmany returns. Waiting for a broker: stop waiting.
        running = self._running
        if running is not None and running.fetch.polling and self._fetch_task is not None:
            self._fetch_task.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()

    def fail(self, error: Exception) -> None:
        """Stop because of ``error``, which only an operator can fix: :meth:`run` drains
        like a stop, then raises it."""
        if self._fatal is None:
            self._fatal = error
        self.request_stop()

    async def run(self) -> None:
        """Consume and answer requests until :meth:`request_stop` (or :meth:`fail`)."""
        background: list[asyncio.Task[None]] = []
        try:
            clients = await self._connect()
            if clients is None:
                return
            running = await self._start(*clients)
            background = [
                asyncio.create_task(running.mode.committer.run(lambda: dict(self._partitions))),
                asyncio.create_task(self._lag_loop(running.lag)),
                asyncio.create_task(running.guard.run()),
            ]
            self._fetch_task = asyncio.create_task(running.fetch.run(lambda: self._stop_requested))
            await self._fetch_task
            await self._drain(running)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._close()
        if self._fatal is not None:
            raise self._fatal

    async def _connect(self) -> tuple[Any, Any] | None:
        """Started (producer, consumer), waiting for the broker; None when stopped meanwhile."""
        self._connect_task = asyncio.create_task(self._connector.connect())
        try:
            clients = await self._connect_task
        except asyncio.CancelledError:
            if self._stop_requested:
                return None
            raise
        finally:
            self._connect_task = None
        if self._stop_requested:
            await _stop_clients(("consumer", clients[1].stop), ("producer", clients[0].stop))
            return None
        return clients

    async def _start(self, producer: Any, consumer: Any) -> _Running:
        """Compose the parts over the started clients and join the group."""
        config = self._config
        lost = _membership_check(consumer)
        guard = StallGuard(consumer, config.session_timeout_ms / 1000)
        mode = delivery_mode(config, consumer, producer, self._metrics, lost, self.fail, guard)
        tracing = self._tracing
        router = ReplyRouter(
            config.reply_topic,
            config.allowed_reply_pattern,
            ClientTopicLookup(producer.client),
            config.reply_topic_wait_s,
            config.missing_topic_ttl_s,
        )
        responder = Responder(
            tracing.sender(mode.sender),
            router,
            self._engine.model_name,
            config.dlq_topic,
            self._metrics,
            ReplyRetry(reply_timeout_s=config.reply_timeout_s),
            on_dead_letter_blocked=self._intake.on_dead_letter_blocked,
            on_fatal=self.fail,
        )
        processor = RequestProcessor(
            tracing.engine(self._engine), responder, config.limits, config.default_max_age_s
        )
        self._intake.bind(consumer, tracing.processor(processor), mode)
        lag = LagReporter(consumer, self._metrics, self._lookahead.first_offset, self._end_offsets)
        rebalance = Rebalance(
            mode,
            self._partitions,
            self._intake,
            self._careful,
            self._lookahead,
            lag.forget,
            lost,
            config.revoke_timeout_s,
        )
        fetch = FetchLoop(
            consumer,
            self._intake,
            self._partitions,
            self._lookahead,
            config.max_poll_records,
            guard,
        )
        self._running = _Running(consumer, producer, mode, fetch, rebalance, lag, guard)
        await self._check_topics(producer)
        consumer.subscribe([config.request_topic], listener=rebalance)
        log.info(
            "worker started",
            extra={
                "request_topic": config.request_topic,
                "group_id": config.group_id,
                "group_instance_id": config.group_instance_id,
                "reply_topic": config.reply_topic,
                "dlq_topic": config.dlq_topic,
                "delivery": config.delivery,
            },
        )
        return self._running

    async def _check_topics(self, producer: Any) -> None:
        """Note topics the worker needs that do not exist (it stays not ready)."""
        config = self._config
        try:
            cluster = await producer.client.fetch_all_metadata()
        except KafkaError as exc:
            log.warning("could not check topics", extra={"error": repr(exc)})
            return
        needed = (config.request_topic, config.reply_topic, config.dlq_topic)
        missing = [t for t in needed if cluster.partitions_for_topic(t) is None]
        for topic in set(missing) - set(self._missing_topics):
            log.error("topic does not exist", extra={"topic_name": topic})
        self._missing_topics = missing

    async def _drain(self, running: _Running) -> None:
        """Let in-flight requests finish (bounded), then commit what is done."""
        await self._intake.drain(self._config.drain_timeout_s)
        if running.rebalance.in_group:
            work = dict(self._partitions)
            await running.mode.committer.commit(work)
            await uncount_attempts(running.mode.committer, work)

    async def _close(self) -> None:
        self._stopped = True
        running = self._running
        await cancel_all(set(self._intake.tasks))
        stops: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if running is not None:
            running.rebalance.in_group = False
            # The consumer leaves the group (unless it is a static member).
            stops += [("consumer", running.consumer.stop), ("producer", running.producer.stop)]
        stops.append(("offsets reader", self._end_offsets.close))
        await _stop_clients(*stops)
        if running is not None:
            await running.mode.close()
            running.lag.forget(list(self._partitions))
        self._partitions.clear()
        log.info("worker stopped")

    async def _lag_loop(self, lag: LagReporter) -> None:
        async def recheck_topics() -> None:
            if self._missing_topics and self._running is not None:  # created since?
                await self._check_topics(self._running.producer)

        await lag.run(self._config.lag_interval_s, lambda: list(self._partitions), recheck_topics)


def _membership_check(consumer: Any) -> Callable[[], bool]:
    """Whether the group no longer knows ``consumer``'s member (session or poll timeout)."""
    return lambda: membership_lost(consumer)


async def _stop_clients(*stops: tuple[str, Callable[[], Awaitable[None]]]) -> None:
    for name, stop in stops:
        try:
            async with asyncio.timeout(_CLIENT_STOP_TIMEOUT_S):
                await stop()
        except TimeoutError:
            log.error("stopping the Kafka %s timed out; going on without it", name)
        except Exception:
            log.exception("stopping the Kafka %s failed", name)
