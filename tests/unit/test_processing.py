"""RequestProcessor: a bug while answering dead-letters the record instead of stalling, and
every reply follows the caller's header convention."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from consumer.engine.api import EngineFailed, ScoreRequest, ScoreResult
from consumer.service.codec import ReplyRoute, RequestLimits
from consumer.service.context import Answer, DeadLetter, RequestContext
from consumer.service.metrics import Metrics
from consumer.service.outputs import OutputRecord
from consumer.service.processing import RequestProcessor
from consumer.service.reply_router import Destination
from consumer.service.responder import Responder
from schemas.models import ErrorCode


class BrokenDelivery:
    """Replies fail with a bug; dead-letter records are remembered."""

    def __init__(self) -> None:
        self.dead: list[tuple[int, ErrorCode | str, str, str | None]] = []

    async def deliver(self, context: RequestContext, answer: Answer) -> None:
        if not isinstance(answer, DeadLetter):
            await self.reply(answer)
            return
        self.dead.append(
            (context.record.offset, answer.code, answer.message, context.correlation_id)
        )

    async def reply(self, answer: Answer) -> None:
        raise RuntimeError("a bug in reply delivery")


class ConstantEngine:
    model_name = "constant"
    ready = True
    in_flight_pairs = 0

    async def score(self, request: ScoreRequest) -> ScoreResult:
        n = len(request.documents)
        return ScoreResult((0.0,) * n, (0.5,) * n, n, (False,) * n, 0.0, 0.0)


def record(offset: int, value: bytes, correlation_id: str) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic="rerank.requests",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=[("correlation-id", correlation_id.encode())],
    )


async def test_a_bug_while_answering_dead_letters_the_record() -> None:
    delivery = BrokenDelivery()
    processor = RequestProcessor(ConstantEngine(), delivery, RequestLimits())  # type: ignore[arg-type]
    good = record(7, b'{"query": "q", "documents": ["a", "b"]}', "c-1")
    bad = record(8, b"not json", "c-2")
    for rec in (good, bad):
        await processor.start(rec, received=0.0).run
    assert [(offset, code, cid) for offset, code, _, cid in delivery.dead] == [
        (7, ErrorCode.INTERNAL, "c-1"),
        (8, ErrorCode.INTERNAL, "c-2"),
    ]
    assert all("RuntimeError" in message for _, _, message, _ in delivery.dead)


class FailedEngine(ConstantEngine):
    """An engine whose model is broken: it raises EngineFailed for every request."""

    async def score(self, request: ScoreRequest) -> ScoreResult:
        raise EngineFailed("the model failed its check batch")


class RecordingDelivery(BrokenDelivery):
    def __init__(self) -> None:
        super().__init__()
        self.replies: list[Answer] = []

    async def reply(self, answer: Answer) -> None:
        self.replies.append(answer)


async def test_a_request_the_failed_engine_could_not_score_is_left_unanswered() -> None:
    """Not the request's fault: no error reply, no dead-letter record, not answered (so
    its offset is not committed and another worker gets it)."""
    delivery = RecordingDelivery()
    processor = RequestProcessor(FailedEngine(), delivery, RequestLimits())  # type: ignore[arg-type]
    rec = record(3, b'{"query": "q", "documents": ["a"]}', "c-3")
    answered = await processor.start(rec, received=0.0).run
    assert answered is False
    assert delivery.replies == [] and delivery.dead == []
    ok = (
        await RequestProcessor(ConstantEngine(), delivery, RequestLimits())
        .start(  # type: ignore[arg-type]
            rec, received=0.0
        )
        .run
    )
    assert ok is True and len(delivery.replies) == 1


SPRING_ID = uuid.uuid4().bytes


class RecordingSender:
    """A :class:`consumer.service.outputs.Sender` that keeps what it was given."""

    def __init__(self) -> None:
        self.sent: list[OutputRecord] = []

    async def send(self, source: Any, output: OutputRecord) -> None:
        self.sent.append(output)


class OneTopicRouter:
    async def resolve(self, route: ReplyRoute) -> Destination:
        return Destination(route.topic or "rerank.replies", route.partition)


def spring_record(offset: int, value: bytes) -> ConsumerRecord[Any, Any]:
    rec = record(offset, value, "unused")
    rec.headers = [
        ("kafka_correlationId", SPRING_ID),
        ("kafka_replyTopic", b"rerank.replies.spring"),
    ]
    return rec


def processor_with(sender: RecordingSender) -> RequestProcessor:
    responder = Responder(
        sender,
        OneTopicRouter(),  # type: ignore[arg-type]
        "constant",
        "dlq",
        Metrics(CollectorRegistry()),
    )
    return RequestProcessor(ConstantEngine(), responder, RequestLimits())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [b'{"query": "q", "documents": ["a"]}', b'{"query": "q", "topn": 1}'],
    ids=["ok", "bad"],
)
async def test_results_and_rejections_are_answered_in_the_callers_convention(value: bytes) -> None:
    sender = RecordingSender()
    processor = processor_with(sender)
    assert await processor.start(spring_record(1, value), received=0.0).run
    (reply,) = sender.sent
    assert reply.topic == "rerank.replies.spring" and reply.key == SPRING_ID.hex().encode()
    assert dict(reply.headers)["kafka_correlationId"] == SPRING_ID


async def test_a_poison_record_is_answered_in_the_callers_convention() -> None:
    sender = RecordingSender()
    processor = processor_with(sender)
    await processor.give_up(spring_record(2, b"{}"), attempts=3, received=0.0).run
    dead, reply = sender.sent
    assert dead.topic == "dlq"
    assert reply.topic == "rerank.replies.spring"
    assert dict(reply.headers)["kafka_correlationId"] == SPRING_ID
