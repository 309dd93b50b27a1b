"""The responder under failures: bounded reply retries, dead-letter records never dropped.

The producer and the router are fakes of our own interfaces; what Kafka itself does
with these records is tested against a real broker in tests/integration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from consumer.engine.api import ScoreResult
from consumer.service.at_least_once import AckedSender
from consumer.service.codec import ReplyRoute, RequestLimits
from consumer.service.context import (
    DeadLetter,
    ErrorReply,
    RequestContext,
    Scored,
    decode_context,
)
from consumer.service.conventions import CE_TYPE_ERROR, Convention
from consumer.service.failures import Unwritable
from consumer.service.metrics import Metrics
from consumer.service.reply_router import Destination, Unresolved, Unroutable
from consumer.service.responder import ReplyRetry, Responder
from schemas.models import ErrorCode

DLQ = "rerank.requests.dlq"
REPLIES = "rerank.replies"
FAST = ReplyRetry(
    reply_timeout_s=0.3, first_backoff_s=0.01, max_backoff_s=0.05, dead_letter_max_backoff_s=0.05
)


class FakeProducer:
    """Sends succeed unless ``failures[topic]`` holds errors (taken one per send) or
    ``refuse[topic]`` is set (every send fails with it)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = []
        self.failures: dict[str, list[Exception]] = {}
        self.refuse: dict[str, Exception] = {}
        self.attempts: dict[str, int] = {}

    async def send(
        self, topic: str, value: bytes | None, key: Any, partition: Any, headers: Any
    ) -> asyncio.Future[None]:
        self.attempts[topic] = self.attempts.get(topic, 0) + 1
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queued = self.failures.get(topic)
        if topic in self.refuse:
            ack.set_exception(self.refuse[topic])
        elif queued:
            ack.set_exception(queued.pop(0))
        else:
            self.sent.append((topic, value, list(headers)))
            ack.set_result(None)
        return ack


class ScriptedRouter:
    """Answers ``resolve`` from a script (the last answer repeats); counts the calls."""

    def __init__(self, *answers: Destination | Unroutable | Unresolved) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def resolve(self, route: ReplyRoute) -> Destination | Unroutable | Unresolved:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def request_record(offset: int = 5) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic="rerank.requests",
        partition=2,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"c-1",
        value=b'{"query": "q", "documents": ["a"]}',
        checksum=None,
        serialized_key_size=3,
        serialized_value_size=34,
        headers=[("correlation-id", b"c-1")],
    )


def delivery_with(
    producer: FakeProducer, router: ScriptedRouter, blocked: list[tuple[TopicPartition, bool]]
) -> tuple[Responder, Metrics]:
    metrics = Metrics(CollectorRegistry())
    delivery = Responder(
        AckedSender(producer),
        router,  # type: ignore[arg-type]
        "model",
        DLQ,
        metrics,
        FAST,
        on_dead_letter_blocked=lambda tp, b: blocked.append((tp, b)),
    )
    return delivery, metrics


DEFAULT_ROUTE = ReplyRoute()


def request_context(
    route: ReplyRoute = DEFAULT_ROUTE, deadline: float | None = None
) -> RequestContext:
    """The context of ``request_record()``, with its route and deadline replaced."""
    context = decode_context(request_record(), time.monotonic(), RequestLimits())
    return dataclasses.replace(context, route=route, deadline=deadline)


SCORED = Scored(ScoreResult((0.0,), (0.5,), 1, (False,), 0.0, 0.0))
NO_CORRELATION_ID = DeadLetter(ErrorCode.INVALID_REQUEST, "no correlation id")


def header(headers: list[tuple[str, bytes]], name: str) -> str:
    return dict(headers)[name].decode()


async def test_a_reply_retried_through_passing_failures_is_delivered_once() -> None:
    producer = FakeProducer()
    producer.failures[REPLIES] = [KafkaTimeoutError(), KafkaTimeoutError()]
    router = ScriptedRouter(Destination(REPLIES, None))
    delivery, _ = delivery_with(producer, router, [])
    await delivery.deliver(request_context(), SCORED)
    assert [topic for topic, _, _ in producer.sent] == [REPLIES]
    assert router.calls == 3  # the route is looked up again before every attempt


async def test_a_reply_that_keeps_failing_is_dead_lettered_after_the_reply_timeout() -> None:
    producer = FakeProducer()
    producer.refuse[REPLIES] = KafkaTimeoutError()
    delivery, metrics = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), [])
    started = time.monotonic()
    await delivery.deliver(request_context(), SCORED)
    assert time.monotonic() - started < 2.0  # bounded: not retried forever
    ((topic, value, headers),) = producer.sent
    assert topic == DLQ and value == request_record().value
    assert header(headers, "error-code") == "internal"
    assert "could not be produced" in header(headers, "error-message")
    assert metrics.registry.get_sample_value("rerank_dlq_records_total", {"code": "internal"}) == 1


async def test_a_reply_whose_deadline_passes_while_retrying_is_dead_lettered_as_expired() -> None:
    producer = FakeProducer()
    producer.refuse[REPLIES] = KafkaTimeoutError()
    delivery, _ = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), [])
    deadline = time.time() + 0.1
    await delivery.deliver(request_context(deadline=deadline), SCORED)
    ((topic, _, headers),) = producer.sent
    assert topic == DLQ and header(headers, "error-code") == "deadline_exceeded"


async def test_an_unresolved_route_is_no_verdict_and_is_tried_again() -> None:
    """A reply-topic lookup that timed out does not dead-letter the request."""
    producer = FakeProducer()
    router = ScriptedRouter(Unresolved("lookup timed out"), Destination("rerank.replies.a", 0))
    delivery, _ = delivery_with(producer, router, [])
    await delivery.deliver(request_context(ReplyRoute("rerank.replies.a", 0)), SCORED)
    assert [topic for topic, _, _ in producer.sent] == ["rerank.replies.a"]


@pytest.mark.parametrize(
    "refusal",
    [KafkaTimeoutError(), NotLeaderForPartitionError()],
    ids=["timeout", "leader-moving"],
)
async def test_a_dead_letter_record_refused_for_now_waits_until_it_is_taken(
    refusal: Exception,
) -> None:
    """Never dropped: dead_letter returns only once the broker took the record, holding
    the record's partition meanwhile (so its offset is never committed past it)."""
    producer = FakeProducer()
    producer.refuse[DLQ] = refusal
    blocked: list[tuple[TopicPartition, bool]] = []
    delivery, metrics = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), blocked)
    sending = asyncio.create_task(delivery.deliver(request_context(), NO_CORRELATION_ID))
    await asyncio.sleep(0.3)
    assert not sending.done() and producer.attempts[DLQ] > 3
    assert blocked == [(TopicPartition("rerank.requests", 2), True)]
    assert metrics.registry.get_sample_value("rerank_dead_letter_blocked") == 1
    assert (
        metrics.registry.get_sample_value("rerank_errors_total", {"code": "dlq_failed"}) or 0
    ) > 3

    del producer.refuse[DLQ]  # the operator fixed the topic
    await asyncio.wait_for(sending, 2.0)
    assert [topic for topic, _, _ in producer.sent] == [DLQ]
    assert blocked[-1] == (TopicPartition("rerank.requests", 2), False)
    assert metrics.registry.get_sample_value("rerank_dead_letter_blocked") == 0


async def test_stopping_while_a_dead_letter_record_is_blocked_releases_the_hold() -> None:
    producer = FakeProducer()
    producer.refuse[DLQ] = KafkaTimeoutError()
    blocked: list[tuple[TopicPartition, bool]] = []
    delivery, metrics = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), blocked)
    sending = asyncio.create_task(delivery.deliver(request_context(), NO_CORRELATION_ID))
    await asyncio.sleep(0.1)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert [b for _, b in blocked] == [True, False]
    assert metrics.registry.get_sample_value("rerank_dead_letter_blocked") == 0
    assert producer.sent == []  # nothing reached the topic: the record stays uncommitted


class SizeLimitedProducer(FakeProducer):
    """Refuses records over ``limit`` bytes (key, value, headers) as too large."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def send(
        self, topic: str, value: bytes | None, key: Any, partition: Any, headers: Any
    ) -> asyncio.Future[None]:
        size = len(key or b"") + len(value or b"") + sum(len(n) + len(v) for n, v in headers)
        if size > self.limit:
            self.attempts[topic] = self.attempts.get(topic, 0) + 1
            raise MessageSizeTooLargeError(f"{size} bytes")
        return await super().send(topic, value, key, partition, headers)


def unanswerable(value: bytes, headers: list[tuple[str, bytes]]) -> RequestContext:
    record = dataclasses.replace(request_record(), value=value, headers=headers)
    return decode_context(record, time.monotonic(), RequestLimits())


@pytest.mark.parametrize(("limit", "keeps_headers"), [(5600, True), (600, False)])
async def test_a_record_too_large_to_copy_is_dead_lettered_as_a_pointer(
    limit: int, keeps_headers: bool
) -> None:
    """Copying it whole was retried for ever: the copy is larger than the original, so a
    record near a size limit could never be written and stopped its partition."""
    producer = SizeLimitedProducer(limit)
    delivery, metrics = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), [])
    own = [("trace", b"t" * 500)]
    context = unanswerable(b"x" * 5000, own)  # no correlation id: a dead letter
    async with asyncio.timeout(2):
        await delivery.deliver(context, NO_CORRELATION_ID)
    ((topic, value, headers),) = producer.sent
    assert topic == DLQ and value == b""
    assert header(headers, "source-size") == str(
        3 + 5000 + len("trace") + 500
    )  # key, value, headers
    assert header(headers, "source-offset") == "5"
    assert "too large to copy" in header(headers, "error-message")
    assert (("trace", b"t" * 500) in headers) is keeps_headers
    assert metrics.registry.get_sample_value("rerank_dead_letter_blocked") == 0


async def test_a_dead_letter_topic_that_refuses_for_good_stops_the_worker() -> None:
    """Not authorized to write to it: retrying cannot help, so the worker is told to stop
    (one clear line) and the request stays uncommitted for after the fix."""
    producer = FakeProducer()
    producer.refuse[DLQ] = TopicAuthorizationFailedError()
    stops: list[Exception] = []
    delivery = Responder(
        AckedSender(producer),
        ScriptedRouter(Destination(REPLIES, None)),  # type: ignore[arg-type]
        "model",
        DLQ,
        Metrics(CollectorRegistry()),
        FAST,
        on_fatal=stops.append,
    )
    with pytest.raises(Unwritable, match="WRITE"):
        async with asyncio.timeout(2):
            await delivery.deliver(request_context(), NO_CORRELATION_ID)
    (stop,) = stops
    assert DLQ in str(stop) and producer.attempts[DLQ] == 1


async def test_dead_letter_headers_come_first_and_cannot_be_forged() -> None:
    producer = FakeProducer()
    delivery, _ = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), [])
    forged = [("source-offset", b"999"), ("error-code", b"none"), ("trace", b"t-1")]
    await delivery.deliver(unanswerable(b"{}", forged), NO_CORRELATION_ID)
    ((_, _, headers),) = producer.sent
    names = [name for name, _ in headers]
    assert names[:5] == [
        "error-code",
        "error-message",
        "source-topic",
        "source-partition",
        "source-offset",
    ]
    assert names.count("source-offset") == 1 and names.count("error-code") == 1
    assert header(headers, "source-offset") == "5" and ("trace", b"t-1") in headers


SPRING = Convention(spring_correlation=b"\x00\x01raw")


async def test_a_reply_carries_the_callers_convention_also_when_too_large_for_kafka() -> None:
    """The payload_too_large reply that replaces an oversized success reply is still
    addressed the caller's way (its kafka_correlationId echoed, a CloudEvent of the
    error type)."""
    producer = FakeProducer()
    producer.failures[REPLIES] = [RecordTooLargeError()]
    delivery, _ = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), [])
    convention = Convention(spring_correlation=b"\x00\x01raw", cloudevents=True)
    context = dataclasses.replace(request_context(), convention=convention)
    await delivery.deliver(context, SCORED)
    ((topic, value, headers),) = producer.sent
    assert topic == REPLIES and b"payload_too_large" in (value or b"")
    assert dict(headers)["kafka_correlationId"] == b"\x00\x01raw"
    assert header(headers, "ce_type") == CE_TYPE_ERROR


async def test_an_error_reply_carries_the_callers_convention() -> None:
    producer = FakeProducer()
    delivery, _ = delivery_with(producer, ScriptedRouter(Destination(REPLIES, None)), [])
    context = dataclasses.replace(request_context(), convention=SPRING)
    await delivery.deliver(context, ErrorReply(ErrorCode.INTERNAL, "x", True))
    ((_, _, headers),) = producer.sent
    assert headers == [("correlation-id", b"c-1"), ("kafka_correlationId", b"\x00\x01raw")]
