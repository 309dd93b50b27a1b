"""The asyncio rerank client: one ``await client.rerank(...)`` per request.

How a call finds its reply: every request carries a fresh correlation id and the
``reply-topic`` / ``reply-partition`` headers. The client reads exactly one
partition of the reply topic, from its end (resolved before the first request is
produced, so no reply can be missed), and resolves the waiting call whose
correlation id the reply carries. Replies for other clients sharing the
partition are ignored; repeated replies (at-least-once delivery) are dropped.
Thousands of clients can share one reply topic this way; each reads only the
partition it picked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, Unpack

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError
from opentelemetry.trace import Span, TracerProvider

from kafka_common.connect_check import bootstrap_failure
from kafka_common.security import KafkaSecurity
from kafka_common.tracing import now_ns, pass_on_current
from producer_sdk.errors import (
    ClientClosed,
    ClientStartError,
    DeliveryError,
    InvalidArgument,
    MalformedReply,
    RerankError,
)
from producer_sdk.request import RerankOptions, build_request_body, check_timeout
from producer_sdk.result import RerankResult, parse_reply
from producer_sdk.retry import DEFAULT_RETRY, RetryPolicy, call_with_retries, check_retry
from producer_sdk.tracing import ClientTracing
from schemas.models import (
    HEADER_CORRELATION_ID,
    HEADER_DEADLINE_MS,
    HEADER_REPLY_PARTITION,
    HEADER_REPLY_TOPIC,
)

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TOPIC = "rerank.requests"
DEFAULT_REPLY_TOPIC = "rerank.replies"
PRODUCER_BATCH_BYTES = 512 * 1024


@dataclass
class ClientStats:
    """Counters of what the client has seen; handy in tests and dashboards."""

    requests_sent: int = 0
    retries: int = 0  # requests sent again by the retry policy (counted in requests_sent too)
    replies_matched: int = 0
    duplicates_dropped: int = 0
    late_replies_dropped: int = 0
    foreign_replies_ignored: int = 0


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[RerankResult]
    document_count: int
    span: Span | None = None  # the call's span, when tracing is on


class _RecentIds:
    """A bounded memory of finished correlation ids: resolved or given up on."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, bool] = OrderedDict()

    def remember(self, correlation_id: str, resolved: bool) -> None:
        self._ids[correlation_id] = resolved
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def lookup(self, correlation_id: str) -> bool | None:
        """True: resolved; False: timed out or cancelled; None: not ours (or forgotten)."""
        return self._ids.get(correlation_id)


class RerankClient:
    """Sends rerank requests over Kafka and awaits their replies.

    Use it as an async context manager (or call :meth:`start` and :meth:`close`)::

        async with RerankClient(bootstrap_servers="kafka:9092") as client:
            result = await client.rerank("what is kafka?", ["a log", "a novelist"])
            best = result[0].index

    Many calls may be in flight at once on one client. ``reply_partition`` pins the
    reply partition this client reads; by default it picks one of the reply
    topic's partitions at random. ``read_committed`` reads only replies of committed
    transactions: use it with workers in exactly-once mode (``RERANK_DELIVERY=
    exactly_once``), whose aborted attempts are then never seen. ``producer_options``
    and ``consumer_options`` pass extra settings to aiokafka (for example
    ``compression_type``).

    Tracing (OpenTelemetry) is on when the application installed an SDK tracer provider
    before :meth:`start`, or passes one as ``tracer_provider``: each call is then a
    ``rerank`` span with ``send``/``receive`` children, and the request carries its W3C
    ``traceparent`` header (:mod:`producer_sdk.tracing`). Otherwise nothing is traced.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str] = "localhost:9092",
        *,
        request_topic: str = DEFAULT_REQUEST_TOPIC,
        reply_topic: str = DEFAULT_REPLY_TOPIC,
        reply_partition: int | None = None,
        security: KafkaSecurity | None = None,
        default_timeout: float = 30.0,
        client_id: str | None = None,
        start_timeout: float = 30.0,
        remembered_ids: int = 10_000,
        producer_options: Mapping[str, Any] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
        read_committed: bool = False,
        tracer_provider: TracerProvider | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if reply_partition is not None and (
            isinstance(reply_partition, bool)
            or not isinstance(reply_partition, int)
            or reply_partition < 0
        ):
            raise InvalidArgument(f"reply_partition must be an int >= 0, not {reply_partition!r}")
        if remembered_ids < 1:
            raise InvalidArgument(f"remembered_ids must be at least 1, not {remembered_ids}")
        self._bootstrap_servers = (
            bootstrap_servers if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
        )
        self._request_topic = request_topic
        self._reply_topic = reply_topic
        self._wanted_partition = reply_partition
        self._security = security or KafkaSecurity()
        self._default_timeout = check_timeout(default_timeout)
        self._start_timeout = check_timeout(start_timeout)
        self._retry = check_retry(retry)
        self.client_id = client_id or f"rerank-client-{uuid.uuid4().hex[:8]}"
        self._producer_options = dict(producer_options or {})
        self._consumer_options = dict(consumer_options or {})
        self._isolation_level = "read_committed" if read_committed else "read_uncommitted"
        self._tracer_provider = tracer_provider
        self._tracing: ClientTracing | None = None  # decided once, in start()

        self.stats = ClientStats()
        self._pending: dict[str, _Pending] = {}
        self._recent = _RecentIds(remembered_ids)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reply_partition: int | None = None
        self._reply_headers: list[tuple[str, bytes]] = []
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def reply_partition(self) -> int:
        """The reply topic partition this client reads (known once started)."""
        if self._reply_partition is None:
            raise ClientClosed("the client is not started")
        return self._reply_partition

    @property
    def pending_count(self) -> int:
        """How many calls are waiting for their reply."""
        return len(self._pending)

    async def start(self) -> None:
        """Connect, pick the reply partition and seek to its end.

        Raises :class:`ClientStartError` when the broker cannot be reached or a topic
        or the requested reply partition does not exist.
        """
        if self._started:
            raise ClientStartError("the client was already started")
        self._started = True
        self._tracing = ClientTracing.create(
            self._tracer_provider, self._request_topic, self._reply_topic, self.client_id
        )
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._connect()
        except BaseException as error:  # cancelled too: never leave connections behind
            self._closed = True
            await self._disconnect()
            if not isinstance(error, TimeoutError | KafkaError):
                raise
            if isinstance(error, KafkaConnectionError):  # aiokafka logged why, but did not say
                reason = await bootstrap_failure(
                    self._bootstrap_servers, self._security, self.client_id
                )
                raise ClientStartError(
                    f"could not connect to Kafka: {reason or _describe(error)}"
                ) from error
            raise ClientStartError(
                f"could not start against {self._bootstrap_servers}: {_describe(error)}"
            ) from error
        log.debug(
            "client %s reads %s[%d]", self.client_id, self._reply_topic, self._reply_partition
        )

    async def close(self) -> None:
        """Fail every waiting call with :class:`ClientClosed` at once, then disconnect."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending("the client was closed while the call was waiting")
        await self._disconnect()

    # -- calls -----------------------------------------------------------------------

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        **options: Unpack[RerankOptions],
    ) -> RerankResult:
        """Score ``documents`` against ``query``; results come sorted, best first.

        ``options`` are the request's other fields (:class:`RerankOptions`):
        ``instruction``, ``top_n``, ``return_documents``, ``raw_scores``, ``truncate``,
        ``split_long_documents`` (True scores documents too long for the model as
        overlapping windows, each taking its best window's score: its result's ``window``
        says which; None leaves it to the worker's default).

        ``timeout`` (seconds, default: the client's ``default_timeout``) covers sending
        and waiting; the service is told the same deadline and skips work that
        nobody waits for any more.

        ``truncate``: documents too long for the model are cut and scored (the result's
        ``truncated`` names them); False makes that an ``invalid_request`` error reply.
        ``retry`` (default: the client's ``retry``) says which failures are sent again,
        how often and within what time (:mod:`producer_sdk.retry`); every attempt
        carries the same correlation id, so the call has one result whichever reply wins.

        Raises :class:`InvalidArgument` (nothing sent), :class:`RerankTimeout`,
        :class:`RerankErrorReply`, :class:`ClientClosed`, :class:`DeliveryError` or
        :class:`MalformedReply`; all are :class:`RerankError`.
        """
        body = build_request_body(query, documents, **options)
        seconds = self._default_timeout if timeout is None else check_timeout(timeout)
        policy = self._retry if retry is None else check_retry(retry)
        self._check_open()
        if self._tracing is None:
            return await self._call(body, len(documents), seconds, None, policy)
        with self._tracing.call(len(documents), options.get("top_n")) as span:
            return await self._call(body, len(documents), seconds, span, policy)

    # -- internals -------------------------------------------------------------------

    async def _call(
        self,
        body: dict[str, Any],
        document_count: int,
        seconds: float,
        span: Span | None,
        policy: RetryPolicy = DEFAULT_RETRY,
    ) -> RerankResult:
        """Send one request and wait for its reply, sending it again when ``policy``
        allows (:func:`call_with_retries`); ``span``: the call's, when tracing."""
        correlation_id = uuid.uuid4().hex
        body["id"] = correlation_id
        budget = seconds if policy.budget is None else policy.budget
        deadline_ms = int((time.time() + budget) * 1000)  # the same on every attempt
        loop = asyncio.get_running_loop()
        entry = _Pending(loop.create_future(), document_count, span)
        self._pending[correlation_id] = entry
        attempts = _Attempts(self, correlation_id, orjson.dumps(body), deadline_ms, entry)
        try:
            return await call_with_retries(attempts, policy, seconds, clock=loop.time)
        finally:
            if not entry.future.done():
                entry.future.cancel()  # a send that fails later has nobody to tell
            if self._pending.pop(correlation_id, None) is not None:
                self._recent.remember(correlation_id, resolved=False)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._reader is None:
            raise ClientClosed("the client is not started; use `async with` or start()")

    async def _connect(self) -> None:
        kafka = {
            "bootstrap_servers": self._bootstrap_servers,
            "client_id": self.client_id,
            **self._security.aiokafka_kwargs(),
        }
        self._consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level=self._isolation_level,
            **{**kafka, **self._consumer_options},
        )
        await self._consumer.start()
        existing = await self._consumer.topics()
        for topic in (self._request_topic, self._reply_topic):
            if topic not in existing:
                raise ClientStartError(f"topic {topic!r} does not exist on the broker")

        self._producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            # aiokafka's 16 KiB default holds only a few requests of real size, and a
            # send that finds the batch full waits a broker round trip for it to drain.
            max_batch_size=PRODUCER_BATCH_BYTES,
            **{**kafka, **self._producer_options},
        )
        await self._producer.start()
        partitions = sorted(await self._producer.partitions_for(self._reply_topic))
        partition = self._choose_partition(partitions)

        reply_tp = TopicPartition(self._reply_topic, partition)
        self._consumer.assign([reply_tp])
        await self._consumer.seek_to_end(reply_tp)
        # position() waits until the end offset is really known: only then is it safe
        # to send, since a reply can come back faster than a lazy seek resolves.
        await self._consumer.position(reply_tp)

        self._reply_partition = partition
        self._reply_headers = [
            (HEADER_REPLY_TOPIC, self._reply_topic.encode()),
            (HEADER_REPLY_PARTITION, str(partition).encode()),
        ]
        self._reader = asyncio.create_task(self._read_replies(reply_tp))
        self._reader.add_done_callback(self._on_reader_done)

    def _choose_partition(self, partitions: list[int]) -> int:
        if self._wanted_partition is None:
            return random.choice(partitions)
        if self._wanted_partition not in partitions:
            raise ClientStartError(
                f"reply topic {self._reply_topic!r} has no partition {self._wanted_partition}"
                f" (it has {len(partitions)})"
            )
        return self._wanted_partition

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        # Requests already handed to the producer are flushed by stop(); sends still
        # waiting for buffer space belong to calls that have been failed already.
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        for client in (self._producer, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for correlation_id, entry in pending.items():
            self._recent.remember(correlation_id, resolved=False)
            if not entry.future.done():
                entry.future.set_exception(ClientClosed(reason))

    def _send_in_background(
        self,
        correlation_id: str,
        value: bytes,
        deadline_ms: int,
        future: asyncio.Future[RerankResult],
        span: Span | None = None,
        attempt: int = 1,
    ) -> None:
        # The call awaits only its future; a failed send resolves that same future, so
        # timeout, close and delivery errors all reach the caller the same way. A retry
        # has a key of its own, so that it likely lands on another partition than the
        # attempt before it (which may sit behind a stuck worker); the correlation id,
        # which the service answers by, stays the same.
        key = correlation_id if attempt == 1 else f"{correlation_id}.{attempt}"
        headers = [
            (HEADER_CORRELATION_ID, correlation_id.encode()),
            *self._reply_headers,
            (HEADER_DEADLINE_MS, str(deadline_ms).encode()),
        ]
        if span is None or self._tracing is None:
            pass_on_current(headers)  # an upstream hop's trace, if the caller is in one
            delivery = self._deliver(correlation_id, value, headers, future, key)
        else:  # the send span's context goes into the headers, so it starts first
            send = self._tracing.send(span, headers, correlation_id, len(value))
            delivery = self._tracing.sending(
                send, self._deliver(correlation_id, value, headers, future, key), future
            )
        task = asyncio.create_task(delivery)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self,
        correlation_id: str,
        value: bytes,
        headers: list[tuple[str, bytes]],
        future: asyncio.Future[RerankResult],
        key: str | None = None,
    ) -> None:
        assert self._producer is not None
        try:
            delivered = await self._producer.send(
                self._request_topic,
                value,
                key=(key or correlation_id).encode(),
                headers=headers,
            )
            await delivered
        except MessageSizeTooLargeError:
            _fail(future, InvalidArgument(f"the request is too large ({len(value)} bytes)"))
        except KafkaError as error:
            _fail(future, DeliveryError(f"sending failed: {_describe(error)}", error.retriable))
        except Exception as error:  # whatever happens, the waiting call must hear of it
            log.exception("sending request %s failed", correlation_id)
            _fail(future, DeliveryError(f"sending failed: {_describe(error)}", retriable=False))
        else:
            self.stats.requests_sent += 1

    async def _read_replies(self, reply_tp: TopicPartition) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(reply_tp, timeout_ms=1000)
            except KafkaError as error:
                if not error.retriable:
                    raise
                log.warning("reading replies failed, retrying: %s", _describe(error))
                await asyncio.sleep(0.5)
                continue
            for record in batches.get(reply_tp, ()):
                self._on_reply(record)

    def _on_reply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        correlation_id = _correlation_id(record)
        entry = self._pending.pop(correlation_id, None) if correlation_id is not None else None
        if correlation_id is None or entry is None:
            self._count_unmatched(correlation_id)
            return
        self._recent.remember(correlation_id, resolved=True)
        self.stats.replies_matched += 1
        if entry.future.done():
            return
        started_ns = now_ns() if entry.span is not None else 0
        try:
            result = parse_reply(orjson.loads(record.value or b""), entry.document_count)
        except orjson.JSONDecodeError as error:
            log.warning("reply %s is not JSON: %s", correlation_id, error)
            entry.future.set_exception(MalformedReply(f"reply is not JSON: {error}"))
        except RerankError as error:
            entry.future.set_exception(error)
        else:
            entry.future.set_result(result)
        if entry.span is not None and self._tracing is not None:
            self._tracing.received(entry.span, record, started_ns, entry.future)

    def _count_unmatched(self, correlation_id: str | None) -> None:
        seen = self._recent.lookup(correlation_id) if correlation_id else None
        if seen is True:
            self.stats.duplicates_dropped += 1
        elif seen is False:
            self.stats.late_replies_dropped += 1
        else:
            self.stats.foreign_replies_ignored += 1

    def _on_reader_done(self, reader: asyncio.Task[None]) -> None:
        if reader.cancelled() or self._closed:
            return
        error = reader.exception()
        log.error("reply reader of %s stopped: %s", self.client_id, error)
        self._closed = True
        self._fail_pending(f"the reply reader stopped: {error}")


class _Attempts:
    """The sends of one call and their shared outcome, as :func:`call_with_retries`
    drives them: every attempt resolves the same pending entry (one correlation id)."""

    def __init__(
        self,
        client: RerankClient,
        correlation_id: str,
        value: bytes,
        deadline_ms: int,
        entry: _Pending,
    ) -> None:
        self._client = client
        self._id = correlation_id
        self._value = value
        self._deadline_ms = deadline_ms
        self._entry = entry

    def send(self, attempt: int) -> None:
        if attempt > 1:
            self._client._check_open()  # closed while the call paused: ClientClosed
            self._client.stats.retries += 1
        entry = self._entry
        self._client._send_in_background(
            self._id, self._value, self._deadline_ms, entry.future, entry.span, attempt
        )

    async def wait(self, seconds: float) -> RerankResult | None:
        future = self._entry.future
        if not future.done():
            # asyncio.wait, not a timeout around the future: it must stay pending for a
            # later reply when this wait ends, and no reply is lost to a timer firing late.
            await asyncio.wait([future], timeout=seconds)
        if not future.done():
            return None
        return future.result()  # or raises the attempt's error

    def reopen(self) -> None:
        # The reply reader dropped the entry when the failed reply came; a reply to any
        # attempt (a retry's, or a repeat of the first) resolves the new future.
        self._client._check_open()  # else close() could not fail the new future
        self._entry.future = asyncio.get_running_loop().create_future()
        self._client._pending[self._id] = self._entry


def _correlation_id(record: ConsumerRecord[bytes, bytes]) -> str | None:
    raw: bytes | None = None
    for name, value in record.headers:
        if name == HEADER_CORRELATION_ID:
            raw = value
            break
    if raw is None:
        raw = record.key
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _fail(future: asyncio.Future[RerankResult], error: RerankError) -> None:
    if not future.done():
        future.set_exception(error)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
