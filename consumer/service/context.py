"""One request as the worker knows it: its context, and the one answer it gets.

Decoding a record builds a :class:`RequestContext` (the record, who to answer and where,
the deadline, when it arrived, and the decoded request or why it was rejected).
Processing it ends in one :data:`Answer`; :mod:`consumer.service.responder` turns that
into records on Kafka. Nothing else travels between the steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.engine.api import ScoreResult
from consumer.service.codec import (
    DecodedRequest,
    Rejection,
    ReplyRoute,
    RequestLimits,
    decode_request,
    reply_address,
)
from consumer.service.conventions import NATIVE, Convention
from schemas.models import ErrorCode, RerankRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """A request record and what decoding it told.

    ``correlation_id`` None: nobody can be answered (a dead-letter record only).
    ``deadline``: absolute Unix time in seconds, or None. ``received``:
    ``time.monotonic()`` when the record was fetched. ``decoded``: the valid request, or
    why it is not one; None when the body was never decoded (a poison record).
    """

    record: ConsumerRecord[Any, Any]
    received: float
    correlation_id: str | None
    route: ReplyRoute
    deadline: float | None = None
    decoded: DecodedRequest | Rejection | None = None
    # the caller's header convention (Spring Kafka, CloudEvents): how to address replies
    convention: Convention = NATIVE

    @property
    def request(self) -> RerankRequest | None:
        """The valid request (None: rejected, or not decoded)."""
        return self.decoded.request if isinstance(self.decoded, DecodedRequest) else None

    @property
    def partition(self) -> TopicPartition:
        """The record's topic and partition."""
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def weight(self) -> int:
        """How many (query, document) pairs the request puts in flight (at least 1)."""
        return max(1, len(self.request.documents)) if self.request is not None else 1

    def log_fields(self) -> dict[str, Any]:
        """The record's coordinates and correlation id, for a log line."""
        return coordinates(self.record) | {"correlation_id": self.correlation_id}


def coordinates(record: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    """A record's topic, partition and offset, for a log line."""
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


def decode_context(
    record: ConsumerRecord[Any, Any],
    received: float,
    limits: RequestLimits,
    default_max_age_s: float = 0.0,
) -> RequestContext:
    """Decode and validate ``record``; never raises.

    A request without a ``deadline-ms`` header expires ``default_max_age_s`` after its
    record's timestamp (0: never).
    """
    try:
        decoded = decode_request(record.value, record.headers or (), limits)
    except Exception as exc:
        # A bug in decoding must not turn one record into a poison pill that stops
        # the worker on every redelivery: the record goes to the dead-letter topic.
        log.exception("decoding a request failed", extra=coordinates(record))
        decoded = Rejection(
            None, ReplyRoute(), ErrorCode.INTERNAL, f"decoding failed: {type(exc).__name__}"
        )
    deadline = None
    if isinstance(decoded, DecodedRequest):
        deadline = _deadline(record, decoded, default_max_age_s)
    return RequestContext(
        record,
        received,
        decoded.correlation_id,
        decoded.route,
        deadline,
        decoded,
        decoded.convention,
    )


def headers_only_context(record: ConsumerRecord[Any, Any], received: float) -> RequestContext:
    """Who to tell about a record whose body must not be decoded again (a poison
    record): the correlation id and reply route of its headers alone."""
    correlation_id, route, convention = reply_address(record.headers or ())
    return RequestContext(record, received, correlation_id, route, convention=convention)


def _deadline(
    record: ConsumerRecord[Any, Any], decoded: DecodedRequest, default_max_age_s: float
) -> float | None:
    if decoded.deadline is not None:
        return decoded.deadline
    if default_max_age_s > 0 and record.timestamp is not None and record.timestamp > 0:
        return record.timestamp / 1000.0 + default_max_age_s
    return None


def deadline_passed(context: RequestContext, clock: Callable[[], float] = time.time) -> bool:
    """True when the request's deadline is set and behind ``clock`` (Unix time)."""
    return context.deadline is not None and context.deadline <= clock()


# ---------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class Scored:
    """The engine scored the request: a success reply."""

    result: ScoreResult


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The request is answered with an error."""

    code: ErrorCode
    message: str
    retriable: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The record goes to the dead-letter topic. ``tell_client``: its client, if its
    headers name one, also gets an ``internal`` error reply with the same message."""

    code: ErrorCode | str
    message: str
    tell_client: bool = False


@dataclass(frozen=True, slots=True)
class Unanswered:
    """Not this request's fault (the engine failed): nothing is sent and its offset stays
    uncommitted, so a healthy worker answers it."""

    reason: str


Answer = Scored | ErrorReply | DeadLetter | Unanswered


def rejection_answer(rejection: Rejection) -> ErrorReply | DeadLetter:
    """An error reply when the rejected request has a correlation id, else a dead letter."""
    if rejection.correlation_id is None:
        return DeadLetter(rejection.code, rejection.message)
    return ErrorReply(rejection.code, rejection.message, rejection.retriable)
