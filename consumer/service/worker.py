"""The Kafka side of the service: consume requests, answer them, commit what is done.

One :class:`Worker` is one member of the consumer group. Its fetch loop keeps calling
``getmany`` (so heartbeats and the poll interval never lapse while the model is busy),
decodes each record, and hands it to its own task; a record's offset is finished once
its reply or dead-letter record is acknowledged by the broker, and only offsets below
which everything is finished are committed (at-least-once).

Flow control: above ``inflight_high_pairs`` (query, document) pairs in flight every
assigned partition is paused; below ``inflight_low_pairs`` they resume.

Rebalances: on revoke the worker waits (bounded) for the revoked partitions' in-flight
requests, commits what is done, cancels the rest (the new owner gets them again).
When membership was lost (session expired, poll interval exceeded) it commits nothing.

The engine's lifecycle is the caller's: start it before :meth:`Worker.run`, close it
after ``run`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.engine.api import RerankEngine
from consumer.service.backpressure import FlowChange, PairGate
from consumer.service.delivery import Delivery
from consumer.service.metrics import Metrics
from consumer.service.offsets import PartitionOffsets
from consumer.service.processing import Decoded, RequestProcessor
from consumer.service.reply_router import ClientTopicLookup, ReplyRouter
from consumer.service.worker_config import WorkerConfig
from producer_sdk.connect_check import bootstrap_failure

log = logging.getLogger(__name__)

_POLL_TIMEOUT_MS = 200
_COMMIT_TIMEOUT_S = 10.0
_LAG_TIMEOUT_S = 5.0
_FETCH_ERROR_BACKOFF_S = 1.0
_REVOKE_POLL_S = 0.01
_PRODUCER_BATCH_BYTES = 256 * 1024


class _PartitionWork:
    """The in-flight requests and offsets of one assignment of one partition."""

    __slots__ = ("offsets", "tasks")

    def __init__(self) -> None:
        self.offsets = PartitionOffsets()
        self.tasks: set[asyncio.Task[None]] = set()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._worker._on_assigned(set(assigned))


class Worker:
    """One consumer-group member answering rerank requests with ``engine``."""

    def __init__(
        self, config: WorkerConfig, engine: RerankEngine, metrics: Metrics | None = None
    ) -> None:
        self._config = config
        self._engine = engine
        self._metrics = metrics if metrics is not None else Metrics()
        self._gate = PairGate(config.inflight_high_pairs, config.inflight_low_pairs)
        self._work: dict[TopicPartition, _PartitionWork] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._commit_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._processor: RequestProcessor | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._polling = False
        self._last_poll = time.monotonic()
        self._started = False
        self._stop_requested = False
        self._stopped = False
        self._in_group = False
        self._pairs_per_record = 1.0  # running average, sizes each poll to the room left
        self._missing_topics: list[str] = []
        self._fetch_error: str | None = None

    # ------------------------------------------------------------------ health

    @property
    def in_group(self) -> bool:
        """True while the worker is a member of its group with a current assignment."""
        return self._in_group

    @property
    def not_ready_reasons(self) -> list[str]:
        """Why the worker cannot take requests now; empty when it can."""
        reasons: list[str] = []
        if self._stop_requested or self._stopped:
            reasons.append("stopping")
        elif not self._started:
            reasons.append("not connected to Kafka yet")
        elif not self._in_group:
            reasons.append("not in the consumer group (joining or rebalancing)")
        reasons.extend(f"topic {topic!r} does not exist" for topic in self._missing_topics)
        if self._fetch_error is not None:
            reasons.append(f"fetching failed: {self._fetch_error}")
        if not self._engine.ready:
            reasons.append("engine not ready")
        return reasons

    @property
    def ready(self) -> bool:
        """True when the worker takes and answers requests."""
        return not self.not_ready_reasons

    @property
    def seconds_since_poll(self) -> float:
        """Seconds since the fetch loop last polled Kafka (0 while a poll is waiting)."""
        if self._polling:
            return 0.0
        return time.monotonic() - self._last_poll

    @property
    def in_flight_pairs(self) -> int:
        """(query, document) pairs accepted and not yet answered."""
        return self._gate.pairs

    @property
    def paused(self) -> bool:
        """True while fetching is paused by backpressure."""
        return self._gate.paused

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """Partitions currently assigned to this worker."""
        return frozenset(self._work)

    # --------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop fetching, drain, commit, leave the group and return."""
        if self._stop_requested:
            return
        self._stop_requested = True
        log.info("worker stop requested", extra={"in_flight_requests": len(self._tasks)})
        # A poll can wait for a whole rebalance; interrupting it loses nothing, because
        # records are only taken once getmany returns.
        if self._polling and self._fetch_task is not None:
            self._fetch_task.cancel()

    async def run(self) -> None:
        """Consume and answer requests until :meth:`request_stop`."""
        config = self._config
        self._producer = self._make_producer()
        self._consumer = self._make_consumer()
        router = ReplyRouter(
            config.reply_topic,
            config.allowed_reply_pattern,
            ClientTopicLookup(self._producer.client),
            config.reply_topic_wait_s,
            config.missing_topic_ttl_s,
        )
        delivery = Delivery(self._producer, router, config.dlq_topic, self._metrics)
        self._processor = RequestProcessor(
            self._engine, delivery, config.limits, config.default_max_age_s
        )
        background: list[asyncio.Task[None]] = []
        try:
            await self._connect()
            await self._check_topics()
            self._consumer.subscribe([config.request_topic], listener=_Listener(self))
            self._started = True
            log.info(
                "worker started",
                extra={
                    "request_topic": config.request_topic,
                    "group_id": config.group_id,
                    "reply_topic": config.reply_topic,
                    "dlq_topic": config.dlq_topic,
                },
            )
            background = [
                asyncio.create_task(self._commit_loop()),
                asyncio.create_task(self._lag_loop()),
            ]
            self._fetch_task = asyncio.create_task(self._fetch_loop())
            await self._fetch_task
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._close()

    async def _connect(self) -> None:
        """Start the producer and consumer; a failed bootstrap says why (e.g. a SASL login)."""
        assert self._producer is not None and self._consumer is not None
        try:
            await self._producer.start()
            await self._consumer.start()
        except KafkaConnectionError as exc:
            config = self._config
            reason = await bootstrap_failure(
                config.bootstrap_servers, config.security, config.client_id
            )
            raise KafkaConnectionError(f"cannot connect to Kafka: {reason or exc}") from exc

    def _make_producer(self) -> AIOKafkaProducer:
        config = self._config
        return AIOKafkaProducer(
            bootstrap_servers=config.bootstrap_servers,
            client_id=f"{config.client_id}-producer",
            acks="all",
            enable_idempotence=True,
            linger_ms=config.producer_linger_ms,
            max_batch_size=_PRODUCER_BATCH_BYTES,
            **config.security.aiokafka_kwargs(),
        )

    def _make_consumer(self) -> AIOKafkaConsumer:
        config = self._config
        return AIOKafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.group_id,
            client_id=f"{config.client_id}-consumer",
            enable_auto_commit=False,
            # A new group answers what is already waiting; deadlines drop stale requests.
            auto_offset_reset="earliest",
            # Requests of aborted transactions are never answered.
            isolation_level="read_committed",
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            max_poll_interval_ms=config.max_poll_interval_ms,
            **config.security.aiokafka_kwargs(),
        )

    async def _check_topics(self) -> None:
        """Note topics the worker needs that do not exist (it stays not ready)."""
        assert self._producer is not None
        config = self._config
        try:
            cluster = await self._producer.client.fetch_all_metadata()
        except KafkaError as exc:
            log.warning("could not check topics", extra={"error": repr(exc)})
            return
        needed = (config.request_topic, config.reply_topic, config.dlq_topic)
        missing = [t for t in needed if cluster.partitions_for_topic(t) is None]
        for topic in set(missing) - set(self._missing_topics):
            log.error("topic does not exist", extra={"topic_name": topic})
        self._missing_topics = missing

    async def _drain(self) -> None:
        """Let in-flight requests finish (bounded), then commit what is done."""
        pending = set(self._tasks)
        if pending:
            log.info("draining in-flight requests", extra={"in_flight_requests": len(pending)})
            _, still_running = await asyncio.wait(pending, timeout=self._config.drain_timeout_s)
            if still_running:
                log.warning(
                    "drain timed out; unanswered requests will be redelivered",
                    extra={"abandoned_requests": len(still_running)},
                )
                await _cancel_all(still_running)
        if self._in_group:
            await self._commit(dict(self._work))

    async def _close(self) -> None:
        self._stopped = True
        self._in_group = False
        await _cancel_all(set(self._tasks))
        if self._consumer is not None:
            try:
                await self._consumer.stop()  # leaves the group
            except Exception:
                log.exception("stopping the consumer failed")
        if self._producer is not None:
            try:
                await self._producer.stop()
            except Exception:
                log.exception("stopping the producer failed")
        for tp in list(self._work):
            self._forget_partition(tp)
        log.info("worker stopped")

    # -------------------------------------------------------------- fetching

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stop_requested:
            self._polling = True
            try:
                batches = await consumer.getmany(
                    timeout_ms=_POLL_TIMEOUT_MS, max_records=self._poll_size()
                )
            except asyncio.CancelledError:
                if self._stop_requested:
                    return
                raise
            except KafkaError as exc:
                self._polling = False
                self._last_poll = time.monotonic()
                self._on_fetch_error(exc)
                await asyncio.sleep(_FETCH_ERROR_BACKOFF_S)
                continue
            finally:
                self._polling = False
            self._last_poll = now = time.monotonic()
            self._fetch_error = None
            for tp, records in batches.items():
                work = self._work.get(tp)
                if work is None:  # revoked meanwhile: the new owner fetches these
                    continue
                for record in records:
                    self._accept(work, record, now)
            self._apply_flow()

    def _poll_size(self) -> int:
        """Records to take in one poll: about what fits below the high mark.

        Taking a whole poll's worth regardless would overshoot the mark by up to
        ``max_poll_records`` requests; one request's worth is the most it overshoots now.
        """
        fits = int(self._gate.room / self._pairs_per_record)
        return max(1, min(self._config.max_poll_records, fits))

    def _on_fetch_error(self, exc: KafkaError) -> None:
        message = repr(exc)
        if message != self._fetch_error:
            log.error("fetching requests failed", extra={"error": message})
        self._fetch_error = message

    def _accept(
        self, work: _PartitionWork, record: ConsumerRecord[Any, Any], received: float
    ) -> None:
        processor = self._processor
        assert processor is not None
        work.offsets.register(record.offset)
        decoded = processor.decode(record)
        weight = processor.weight(decoded)
        self._gate.add(weight)
        self._pairs_per_record += (weight - self._pairs_per_record) * 0.1
        task = asyncio.create_task(processor.process(record, decoded, received))
        self._tasks.add(task)
        work.tasks.add(task)
        task.add_done_callback(partial(self._finished, work, record, decoded, weight))

    def _finished(
        self,
        work: _PartitionWork,
        record: ConsumerRecord[Any, Any],
        decoded: Decoded,
        weight: int,
        task: asyncio.Task[None],
    ) -> None:
        self._tasks.discard(task)
        work.tasks.discard(task)
        self._gate.remove(weight)
        if task.cancelled():
            pass  # given up (rebalance, drain timeout): stays uncommitted, redelivered
        elif (exc := task.exception()) is not None:
            # process() dead-letters a record whose answering failed, so this is a bug in
            # that fallback itself: keep the offset unfinished (commits of this partition
            # stop here, so the request is redelivered rather than lost) and say so loudly.
            log.error(
                "request processing failed",
                exc_info=exc,
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "correlation_id": getattr(decoded, "correlation_id", None),
                },
            )
        else:
            work.offsets.done(record.offset)
        self._apply_flow()

    def _apply_flow(self) -> None:
        change = self._gate.change()
        self._metrics.in_flight_pairs.set(self._gate.pairs)
        if change is None or self._consumer is None:
            return
        partitions = list(self._work)
        if change is FlowChange.PAUSE:
            self._consumer.pause(*partitions)
            self._metrics.paused.set(1)
            log.debug("fetching paused", extra={"in_flight_pairs": self._gate.pairs})
        else:
            self._consumer.resume(*partitions)
            self._metrics.paused.set(0)
            log.debug("fetching resumed", extra={"in_flight_pairs": self._gate.pairs})

    # --------------------------------------------------------------- commits

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.commit_interval_s)
            await self._commit(dict(self._work))

    async def _commit(self, work: dict[TopicPartition, _PartitionWork]) -> None:
        """Commit every finished prefix in ``work``; failures are logged, not raised."""
        consumer = self._consumer
        assert consumer is not None
        if self._membership_lost():
            return  # the partitions may be someone else's by now: see _on_revoked
        offsets = {tp: w.offsets.uncommitted for tp, w in work.items()}
        to_commit = {tp: offset for tp, offset in offsets.items() if offset is not None}
        if not to_commit:
            return
        async with self._commit_lock:
            try:
                await asyncio.wait_for(consumer.commit(to_commit), _COMMIT_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                # Usually a rebalance in progress; the next commit (or the revoke) covers it.
                log.warning(
                    "offset commit failed",
                    extra={"error": repr(exc), "partitions": _names(to_commit)},
                )
                return
        for tp, offset in to_commit.items():
            work[tp].offsets.mark_committed(offset)

    # ------------------------------------------------------------- rebalance

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._work[tp] = _PartitionWork()
        if self._gate.paused and self._consumer is not None and assigned:
            self._consumer.pause(*assigned)
        self._in_group = True
        log.info("partitions assigned", extra={"partitions": _names(assigned)})

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._in_group = False
        if not revoked:  # the first join, or a member that had no partitions
            return
        work = {tp: self._work.pop(tp) for tp in revoked if tp in self._work}
        if self._membership_lost():
            # Another member may own these partitions already: committing could move
            # its offsets, so commit nothing; everything unfinished is redelivered.
            log.warning("partitions lost", extra={"partitions": _names(revoked)})
            await _cancel_all({t for w in work.values() for t in w.tasks})
            self._forget_lag(revoked)
            return
        deadline = time.monotonic() + self._config.revoke_timeout_s
        while any(w.tasks for w in work.values()) and time.monotonic() < deadline:
            await asyncio.sleep(_REVOKE_POLL_S)
        abandoned = {t for w in work.values() for t in w.tasks}
        await self._commit(work)
        await _cancel_all(abandoned)
        self._forget_lag(revoked)
        log.info(
            "partitions revoked",
            extra={"partitions": _names(revoked), "abandoned_requests": len(abandoned)},
        )

    def _membership_lost(self) -> bool:
        """True when the group no longer knows this member (session or poll timeout).

        aiokafka has no on_partitions_lost; it resets the member's generation before
        calling on_partitions_revoked in that case, which is what this reads.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", None)
        return isinstance(generation, int) and generation < 0

    def _forget_partition(self, tp: TopicPartition) -> None:
        self._work.pop(tp, None)
        self._forget_lag([tp])

    def _forget_lag(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    # -------------------------------------------------------------------- lag

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.lag_interval_s)
            if self._missing_topics:  # created since? readiness follows
                await self._check_topics()
            try:
                await asyncio.wait_for(self._update_lag(), _LAG_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                log.debug("lag update failed", extra={"error": repr(exc)})

    async def _update_lag(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        partitions = list(self._work)
        if not partitions:
            return
        # end_offsets asks the broker: a paused partition's fetch highwater would be stale.
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            if tp not in self._work:
                continue
            try:
                position = await consumer.position(tp)
            except KafkaError:
                continue
            lag = max(0, ends[tp] - position)
            self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}-{tp.partition}" for tp in partitions)
