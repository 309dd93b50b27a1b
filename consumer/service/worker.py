"""The Kafka side of the service: consume requests, answer them, commit what is done.

One :class:`Worker` is one member of the consumer group. Its fetch loop keeps calling
``getmany`` (so heartbeats and the poll interval never lapse while the model is busy),
decodes each record, and hands it to its own task; a record's offset is finished once
its reply or dead-letter record is acknowledged by the broker, and only offsets below
which everything is finished are committed (at-least-once,
:mod:`consumer.service.committer`).

Flow control: above ``inflight_high_pairs`` (query, document) pairs in flight every
assigned partition is paused; below ``inflight_low_pairs`` they resume. A partition is
also paused on its own while it is held (:mod:`consumer.service.partitions`).

Rebalances: on revoke the worker waits (bounded) for the revoked partitions' in-flight
requests, commits what is done, cancels the rest (the new owner gets them again).
When membership was lost (session expired, poll interval exceeded) it commits nothing.

A request the engine could not score because the engine failed is not answered: it
stays uncommitted, and the worker's supervisor (the service) stops the worker, so the
group hands the partition to a healthy member.

The engine's lifecycle is the caller's: start it before :meth:`Worker.run`, close it
after ``run`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.structs import ConsumerRecord, TopicPartition
from opentelemetry.trace import TracerProvider

from consumer.engine.api import RerankEngine
from consumer.service.attempts import Head, read_committed_offset, read_heads
from consumer.service.backpressure import PairGate
from consumer.service.committer import Committer, names
from consumer.service.connection import ConnectPolicy, KafkaConnector
from consumer.service.delivery import AckedSender, Delivery, RetryPolicy, Sender
from consumer.service.kafka_clients import (
    make_consumer,
    make_offsets_reader,
    make_producer,
    make_transactional_producer,
    transactional_id,
)
from consumer.service.lag import EndOffsets, LagReporter
from consumer.service.membership import confirm_membership, membership_lost
from consumer.service.metrics import Metrics
from consumer.service.oldest_first import Lookahead
from consumer.service.partitions import Hold, PartitionWork
from consumer.service.processing import Decoded, RequestProcessor
from consumer.service.reply_router import ClientTopicLookup, ReplyRouter
from consumer.service.tracing import WorkerTracing
from consumer.service.transactions import (
    PRODUCER_FAILURES,
    PartitionTransactions,
    TransactionalCommitter,
    TransactionalSender,
)
from consumer.service.worker_config import WorkerConfig

log = logging.getLogger(__name__)

# Failures that only an operator can fix (ACLs, credentials): stop instead of retrying.
_NOT_AUTHORIZED = (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
_POLL_TIMEOUT_MS = 200
_FETCH_ERROR_BACKOFF_S = 1.0
_REVOKE_POLL_S = 0.01
# Stopping a client waits on the broker; a broker that does not answer must not hold
# the process past its drain.
_CLIENT_STOP_TIMEOUT_S = 15.0


class NotAuthorized(KafkaError):
    """The broker refuses this worker's principal something it needs (an ACL, a login)."""


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker._on_assigned(set(assigned))


class Worker:
    """One consumer-group member answering rerank requests with ``engine``.

    Requests are traced (OpenTelemetry, :mod:`consumer.service.tracing`) when
    ``tracer_provider``, or else the global provider, is an SDK one; decided here, once.
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
        self._tracing = WorkerTracing.create(tracer_provider, config.group_id, config.client_id)
        self._gate = PairGate(
            config.inflight_high_pairs,
            config.inflight_low_pairs,
            config.inflight_target_s,
            config.inflight_min_pairs,
        )
        self._work: dict[TopicPartition, PartitionWork] = {}
        # records taken from the consumer, not yet let in: oldest first when room is short
        self._lookahead = Lookahead()
        self._resumed = asyncio.Event()  # set when partitions resume or are set up
        self._tasks: set[asyncio.Task[bool]] = set()
        # partitions whose last owner died on (or left mid-) the record at the committed
        # position: while any, one record at a time (consumer.service.attempts)
        self._suspects: set[TopicPartition] = set()
        self._connector = KafkaConnector(
            lambda: (make_producer(config), make_consumer(config)),
            config.bootstrap_servers,
            config.security,
            config.client_id,
            ConnectPolicy(timeout_s=config.connect_timeout_s),
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._committer: Committer | TransactionalCommitter | None = None
        # exactly-once mode: each assigned partition's transactional producer and outbox
        self._txns: dict[TopicPartition, PartitionTransactions] = {}
        self._lag: LagReporter | None = None
        self._end_offsets = EndOffsets(lambda: make_offsets_reader(config))
        self._processor: RequestProcessor | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[tuple[Any, Any]] | None = None
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
        elif self._connector.waiting_reason is not None:
            reasons.append(self._connector.waiting_reason)
        elif not self._started:
            reasons.append("not connected to Kafka yet")
        elif not self._in_group:
            reasons.append("not in the consumer group (joining or rebalancing)")
        reasons.extend(f"topic {topic!r} does not exist" for topic in self._missing_topics)
        if self._fetch_error is not None:
            reasons.append(f"fetching failed: {self._fetch_error}")
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

    def holds(self, tp: TopicPartition) -> list[Hold]:
        """Why fetching from ``tp`` is held (empty: it is not)."""
        work = self._work.get(tp)
        return work.holds if work is not None else []

    # --------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop fetching, drain, commit, leave the group and return."""
        if self._stop_requested:
            return
        self._stop_requested = True
        log.info("worker stop requested", extra={"in_flight_requests": len(self._tasks)})
        # A poll can wait for a whole rebalance; interrupting it loses nothing, because
        # records are only taken once getmany returns. Waiting for a broker: stop waiting.
        if self._polling and self._fetch_task is not None:
            self._fetch_task.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()

    async def run(self) -> None:
        """Consume and answer requests until :meth:`request_stop`."""
        background: list[asyncio.Task[None]] = []
        try:
            if not await self._connect():
                return
            await self._start_processing()
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

    async def _connect(self) -> bool:
        """Start both clients, waiting for the broker; False when stopped meanwhile."""
        self._connect_task = asyncio.create_task(self._connector.connect())
        try:
            self._producer, self._consumer = await self._connect_task
        except asyncio.CancelledError:
            if self._stop_requested:
                return False
            raise
        finally:
            self._connect_task = None
        return not self._stop_requested

    async def _start_processing(self) -> None:
        assert self._producer is not None and self._consumer is not None
        config = self._config
        router = ReplyRouter(
            config.reply_topic,
            config.allowed_reply_pattern,
            ClientTopicLookup(self._producer.client),
            config.reply_topic_wait_s,
            config.missing_topic_ttl_s,
        )
        sender: Sender = (
            TransactionalSender(self._txns) if config.exactly_once else AckedSender(self._producer)
        )
        engine = self._engine
        if self._tracing is not None:
            sender = self._tracing.sender(sender, config.dlq_topic)
            engine = self._tracing.engine(engine)
        delivery = Delivery(
            sender,
            router,
            config.dlq_topic,
            self._metrics,
            RetryPolicy(reply_timeout_s=config.reply_timeout_s),
            on_dead_letter_blocked=self._on_dead_letter_blocked,
        )
        self._processor = RequestProcessor(
            engine, delivery, config.limits, config.default_max_age_s
        )
        if config.exactly_once:
            self._committer = TransactionalCommitter(
                self._txns, config.commit_interval_s, self._membership_lost, self._metrics
            )
        else:
            self._committer = Committer(
                self._consumer, config.commit_interval_s, self._membership_lost
            )
        self._lag = LagReporter(
            self._consumer, self._metrics, self._lookahead.first_offset, self._end_offsets
        )
        await self._check_topics()
        self._consumer.subscribe([config.request_topic], listener=_Listener(self))
        self._started = True
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
        if self._in_group and self._committer is not None:
            await self._committer.commit(dict(self._work))

    async def _close(self) -> None:
        self._stopped = True
        self._in_group = False
        await _cancel_all(set(self._tasks))
        # The consumer leaves the group (unless it is a static member).
        stops: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self._consumer is not None:
            stops.append(("consumer", self._consumer.stop))
        if self._producer is not None:
            stops.append(("producer", self._producer.stop))
        stops.append(("offsets reader", self._end_offsets.close))
        for name, stop in stops:
            try:
                async with asyncio.timeout(_CLIENT_STOP_TIMEOUT_S):
                    await stop()
            except TimeoutError:
                log.error("stopping the Kafka %s timed out; going on without it", name)
            except Exception:
                log.exception("stopping the Kafka %s failed", name)
        await self._stop_transactions(set(self._txns))
        if self._lag is not None:
            self._lag.forget(list(self._work))
        self._work.clear()
        log.info("worker stopped")

    # -------------------------------------------------------------- fetching

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stop_requested:
            self._polling = True
            try:
                batches = await self._poll(consumer)
            except asyncio.CancelledError:
                if self._stop_requested:
                    return
                raise
            except _NOT_AUTHORIZED as exc:
                raise NotAuthorized(
                    f"not authorized: {exc}; this worker's principal lacks an ACL "
                    "(docs/operations.md, Kafka ACLs)"
                ) from exc
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
                if work is None:
                    if tp in consumer.assignment():
                        # assigned, its set-up still running: fetch these again later
                        self._lookahead.rewind(consumer, tp, records[0].offset)
                    continue  # else revoked meanwhile: the new owner fetches these
                for record in records:
                    if self._suspects and self._tasks:
                        # working carefully: one record at a time; the rest is fetched again
                        self._lookahead.rewind(consumer, tp, record.offset)
                        break
                    if not await self._accept(tp, work, record, now):
                        break  # revoked meanwhile: the new owner fetches the rest
            self._apply_flow()

    async def _poll(
        self, consumer: AIOKafkaConsumer
    ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        """One poll's records: a plain poll while all it takes fits below the high mark,
        else oldest first across partitions (:mod:`consumer.service.oldest_first`)."""
        size = self._poll_size()
        if size >= self._config.max_poll_records and not self._lookahead.holding():
            return await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS, max_records=size)
        self._resumed.clear()
        await self._lookahead.refill(consumer, self._open_partitions(consumer))
        taken = self._lookahead.take(size, self._open_partitions(consumer))
        if taken:
            return taken
        if self._open_partitions(consumer):
            fetched = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS, max_records=size)
        else:
            # Every partition is paused and records wait in the lookahead, which a poll of
            # the consumer would not see come free: wait for a resume instead.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_TIMEOUT_MS / 1000):
                    await self._resumed.wait()
            fetched = await consumer.getmany(max_records=size)  # a poll all the same
        self._lookahead.add(fetched)
        return self._lookahead.take(self._poll_size(), self._open_partitions(consumer))

    def _open_partitions(self, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        """Partitions whose records may be let in now: set up and not paused."""
        return (consumer.assignment() - consumer.paused()) & self._work.keys()

    def _poll_size(self) -> int:
        """Records to take in one poll: about what fits below the high mark (one at a time
        while working carefully).

        Taking a whole poll's worth regardless would overshoot the mark by up to
        ``max_poll_records`` requests; one request's worth is the most it overshoots now.
        """
        if self._suspects:
            return 1
        fits = int(self._gate.room / self._pairs_per_record)
        return max(1, min(self._config.max_poll_records, fits))

    def _on_fetch_error(self, exc: KafkaError) -> None:
        message = repr(exc)
        if message != self._fetch_error:
            log.error("fetching requests failed", extra={"error": message})
        self._fetch_error = message

    async def _accept(
        self,
        tp: TopicPartition,
        work: PartitionWork,
        record: ConsumerRecord[Any, Any],
        received: float,
    ) -> bool:
        """Start answering ``record``; False when its partition was revoked meanwhile."""
        processor, committer = self._processor, self._committer
        assert processor is not None and committer is not None
        head = work.take_head(record.offset)
        poison = head is not None and head.attempts >= self._config.max_record_attempts
        if not poison and (head is not None or self._suspects):
            # The record at the committed position: count the attempt before anything of
            # this assignment runs (whichever record kills the process, this one is the
            # one a next owner cannot get past).
            attempts = head.attempts + 1 if head is not None else 1
            await committer.commit_attempt(tp, work, record.offset, attempts)
            if self._work.get(tp) is not work:
                return False
        work.offsets.register(record.offset)
        work.limit_backlog(self._config.max_uncommitted_records)
        if poison:
            assert head is not None
            decoded: Decoded | None = None  # a poison record is not even decoded again
            weight = 1
            work_done = processor.give_up(record, head.attempts)
        elif self._tracing is None:
            decoded = processor.decode(record)
            weight = processor.weight(decoded)
            work_done = processor.process(record, decoded, received)
        else:
            decoded, work_done = self._tracing.request(record, processor, received)
            weight = processor.weight(decoded)
        self._gate.add(weight)
        self._pairs_per_record += (weight - self._pairs_per_record) * 0.1
        task = asyncio.create_task(work_done)
        self._tasks.add(task)
        work.tasks.add(task)
        task.add_done_callback(partial(self._finished, work, record, decoded, weight))
        return True

    def _finished(
        self,
        work: PartitionWork,
        record: ConsumerRecord[Any, Any],
        decoded: Decoded | None,
        weight: int,
        task: asyncio.Task[bool],
    ) -> None:
        self._tasks.discard(task)
        work.tasks.discard(task)
        self._gate.remove(weight, answered=not task.cancelled())
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
        elif task.result():
            work.offsets.done(record.offset)
            work.limit_backlog(self._config.max_uncommitted_records)
            self._past_head(work, record)
            if self._committer is not None:
                self._committer.progress()
        # else: not answered (the engine failed): stays uncommitted for another worker
        self._apply_flow()

    def _past_head(self, work: PartitionWork, record: ConsumerRecord[Any, Any]) -> None:
        """A suspect partition is past the records its last owner may have had in flight."""
        tp = TopicPartition(record.topic, record.partition)
        if tp in self._suspects and work.careful_done:
            self._suspects.discard(tp)
            if not self._suspects:
                log.info("past every record the last owners did not finish: full speed again")

    def _on_dead_letter_blocked(self, tp: TopicPartition, blocked: bool) -> None:
        work = self._work.get(tp)
        if work is None:  # revoked meanwhile
            return
        if blocked:
            work.hold(Hold.DEAD_LETTER_BLOCKED)
        else:
            work.release(Hold.DEAD_LETTER_BLOCKED)
        self._apply_flow()

    def _apply_flow(self) -> None:
        """Pause exactly the partitions that must not be fetched from; resume the rest."""
        gate_change = self._gate.change()
        self._metrics.in_flight_pairs.set(self._gate.pairs)
        self._metrics.in_flight_window.set(self._gate.high)
        self._metrics.paused.set(1 if self._gate.paused else 0)
        consumer = self._consumer
        if consumer is None:
            return
        if gate_change is not None:
            what = "paused" if self._gate.paused else "resumed"
            log.debug("fetching %s", what, extra={"in_flight_pairs": self._gate.pairs})
        assigned = set(self._work)
        # working carefully: nothing new while a record is in flight
        if self._gate.paused or (self._suspects and self._tasks):
            wanted = assigned
        else:
            wanted = {tp for tp, work in self._work.items() if work.held}
        paused = consumer.paused() & assigned
        if wanted - paused:
            consumer.pause(*(wanted - paused))
        if paused - wanted:
            consumer.resume(*(paused - wanted))
            self._resumed.set()

    # --------------------------------------------------------------- commits

    async def _commit_loop(self) -> None:
        assert self._committer is not None
        await self._committer.run(lambda: dict(self._work))

    # ------------------------------------------------------------- rebalance

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self._set_up(assigned)
        except Exception:
            # aiokafka logs a failing listener and carries on: the partitions would stay
            # assigned with no work set up, their records fetched again and again and
            # never answered. Work them without the last owner's attempt counts instead.
            log.exception(
                "setting up assigned partitions failed; working them without the attempt "
                "counts of their last owner",
                extra={"partitions": names(assigned)},
            )
            self._set_up_plainly(assigned)
        self._in_group = True
        self._resumed.set()
        self._apply_flow()
        log.info("partitions assigned", extra={"partitions": names(assigned)})

    async def _set_up(self, assigned: set[TopicPartition]) -> None:
        if self._config.exactly_once:
            await self._start_transactions(assigned)
        heads = await read_heads(self._consumer, assigned)
        if self._config.exactly_once:
            self._start_at(heads)
        work = {tp: PartitionWork(heads.get(tp)) for tp in assigned}
        try:
            await self._be_careful_with({tp: w for tp, w in work.items() if w.suspect})
        finally:
            # Published only now: the fetch loop works a partition's records once it is
            # in _work, and a suspect one must be worked carefully from its first record.
            self._work.update(work)

    def _start_at(self, heads: Mapping[TopicPartition, Head]) -> None:
        """Fetch each partition from its head, read once its producer had its id.

        The consumer's own start may be older: it read the committed offset before the
        last owner's final transaction was finished (consumer.service.transactions). From
        there the records up to the head would be scored again only for their answers to
        be dropped, and the record at the head would not count as its attempt.
        """
        assert self._consumer is not None
        for tp, head in heads.items():
            self._consumer.seek(tp, head.offset)

    def _set_up_plainly(self, assigned: set[TopicPartition]) -> None:
        """What a failed :meth:`_set_up` left out: work with no head, and in exactly-once
        mode a producer that starts at the partition's first commit."""
        for tp in assigned:
            self._work.setdefault(tp, PartitionWork(None))
            if self._config.exactly_once and tp not in self._txns:
                txns = self._new_transactions(tp)
                txns.broken = True  # its first transaction starts a fresh producer
                self._txns[tp] = txns

    async def _be_careful_with(self, suspects: dict[TopicPartition, PartitionWork]) -> None:
        """The last owners of ``suspects`` did not finish the record at the committed
        position: one record at a time, across all partitions, until past every record
        they may have had in flight (what existed then, at most a full in-flight window)."""
        if not suspects:
            return
        try:
            async with asyncio.timeout(10):
                # not the consumer's connection: a fetch long-poll of the partitions held
                # before this rebalance may still be waiting there
                ends = await self._end_offsets(list(suspects))
        except (KafkaError, TimeoutError):
            ends = {}
        window = self._config.inflight_high_pairs + self._config.max_poll_records
        for tp, work in suspects.items():
            assert work.head is not None
            work.careful_until = min(ends.get(tp, work.head.offset + 1), work.head.offset + window)
            self._suspects.add(tp)
            log.warning(
                "the last owner did not finish the record at the committed position; working "
                "one record at a time until past what it may have had in flight",
                extra={
                    "partitions": names([tp]),
                    "offset": work.head.offset,
                    "attempts": work.head.attempts,
                    "careful_until": work.careful_until,
                },
            )

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._in_group = False
        if not revoked:  # the first join, or a member that had no partitions
            return
        work = {tp: self._work.pop(tp) for tp in revoked if tp in self._work}
        self._lookahead.drop(revoked)
        self._suspects -= revoked
        if self._membership_lost():
            # Another member may own these partitions already: committing could move
            # its offsets, so commit nothing; everything unfinished is redelivered.
            log.warning("partitions lost", extra={"partitions": names(revoked)})
            await _cancel_all({t for w in work.values() for t in w.tasks})
            await self._stop_transactions(revoked)
            self._forget_lag(revoked)
            return
        deadline = time.monotonic() + self._config.revoke_timeout_s
        while any(w.tasks for w in work.values()) and time.monotonic() < deadline:
            await asyncio.sleep(_REVOKE_POLL_S)
        abandoned = {t for w in work.values() for t in w.tasks}
        if self._committer is not None:
            await self._committer.commit(work)
        await _cancel_all(abandoned)
        await self._stop_transactions(revoked)
        self._forget_lag(revoked)
        log.info(
            "partitions revoked",
            extra={"partitions": names(revoked), "abandoned_requests": len(abandoned)},
        )

    async def _start_transactions(self, assigned: set[TopicPartition]) -> None:
        """One transactional producer per partition; starting it fences the last owner's."""
        for tp in assigned:
            txns = self._new_transactions(tp)
            try:
                await txns.start()
            except PRODUCER_FAILURES as exc:
                # Raised out of this callback it would leave the partition assigned with no
                # work set up: its records fetched again and again, never answered.
                txns.broken = True  # its first transaction starts a fresh producer
                log.warning(
                    "could not start a transactional producer; retrying at the first commit",
                    extra={"partitions": names([tp]), "error": repr(exc)},
                )
            self._txns[tp] = txns

    def _new_transactions(self, tp: TopicPartition) -> PartitionTransactions:
        tid = transactional_id(self._config, tp.topic, tp.partition)
        return PartitionTransactions(
            tp,
            partial(make_transactional_producer, self._config, tid),
            self._config.group_id,
            partial(read_committed_offset, self._consumer, tp),
            partial(confirm_membership, self._consumer, tp),
        )

    async def _stop_transactions(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            txns = self._txns.pop(tp, None)
            if txns is not None:
                await txns.stop()

    def _membership_lost(self) -> bool:
        """True when the group no longer knows this member (session or poll timeout)."""
        return membership_lost(self._consumer)

    def _forget_lag(self, partitions: Iterable[TopicPartition]) -> None:
        if self._lag is not None:
            self._lag.forget(partitions)

    # -------------------------------------------------------------------- lag

    async def _lag_loop(self) -> None:
        assert self._lag is not None

        async def recheck_topics() -> None:
            if self._missing_topics:  # created since? readiness follows
                await self._check_topics()

        await self._lag.run(self._config.lag_interval_s, lambda: list(self._work), recheck_topics)


async def _cancel_all(tasks: set[asyncio.Task[bool]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
