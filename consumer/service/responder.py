"""Delivering a request's answer: encoding it, routing it, sending it, and what to do
when that fails.

Every request ends in exactly one of: a reply on its reply topic, or a copy of its
record on the dead-letter topic. :meth:`Responder.deliver` is the one place that encodes
an answer into records and sends them; it returns only once the sender has the record
(acknowledged by the broker, or kept for the partition's transaction), which is when
the request's offset may be committed.

Failures, in order of fallback:

* the reply topic is not allowed or does not exist -> dead-letter record;
* scores a reply cannot carry (not finite: a broken model) -> an ``internal`` error reply;
* a success reply too large for Kafka -> a ``payload_too_large`` error reply;
* the broker refuses a reply for good (not retriable) -> dead-letter record;
* a retriable failure (broker away, leader moving, reply topic lookup timed out) -> the
  route is looked up again and the reply sent again with backoff, for at most
  ``reply_timeout_s`` and never past the request's deadline; then a dead-letter record.
  So one stuck reply holds its partition's commits for a bounded time;
* the dead-letter record itself cannot be written -> it is tried again with backoff for
  as long as the worker runs, and never committed meanwhile: the record's partition is
  held (paused, through ``on_dead_letter_blocked``), ``rerank_dead_letter_blocked``
  counts the records waiting, and the log says so. A worker that stops leaves the
  record uncommitted, so it is redelivered. Nothing is dropped.

Logging: a dead-letter record is one warning line (nobody else hears of it); an error
reply is one debug line (its client is told). Both carry the record's topic, partition,
offset and correlation id. Successful replies are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import TopicPartition

from consumer.service.codec import (
    DecodedRequest,
    dlq_headers,
    encode_error,
    encode_result,
    reply_headers,
)
from consumer.service.context import (
    Answer,
    DeadLetter,
    RequestContext,
    Scored,
    Unanswered,
)
from consumer.service.metrics import Metrics
from consumer.service.outputs import OutputRecord, Sender
from consumer.service.reply_router import ReplyRouter, Unresolved, Unroutable
from schemas.models import ErrorCode

log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# A blocked dead-letter record says so again in the log this often.
_BLOCKED_LOG_EVERY_S = 60.0

# Called with (partition, True) when a record of that partition cannot be dead-lettered
# (hold the partition) and (partition, False) once it could.
DeadLetterBlocked = Callable[[TopicPartition, bool], None]


@dataclass(frozen=True)
class ReplyRetry:
    """How long and how often failed sends are tried again.

    ``reply_timeout_s``: a reply that keeps failing is given up (dead-lettered) after
    this long, or at the request's deadline if that comes first. Dead-letter records
    are never given up; their backoff grows to ``dead_letter_max_backoff_s``.
    """

    reply_timeout_s: float = 30.0
    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    dead_letter_max_backoff_s: float = 30.0


@dataclass(frozen=True, slots=True)
class _Reply:
    """An encoded reply: its value and the outcome it counts as (``ok`` or its code)."""

    value: bytes
    outcome: str


class _Retry(Exception):
    """A send failed in a way that may pass; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Responder:
    """Encodes answers and sends them through one :class:`Sender`."""

    def __init__(
        self,
        sender: Sender,
        router: ReplyRouter,
        model_name: str,
        dlq_topic: str,
        metrics: Metrics,
        retry: ReplyRetry | None = None,
        on_dead_letter_blocked: DeadLetterBlocked | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sender``: the delivery mode's (:mod:`consumer.service.delivery_mode`)."""
        self._sender = sender
        self._router = router
        self._model_name = model_name
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._retry = retry or ReplyRetry()
        self._on_blocked = on_dead_letter_blocked or (lambda tp, blocked: None)
        self._clock = clock
        self._requests_ok = metrics.requests.labels(outcome=OUTCOME_OK)  # the hot path's child

    async def deliver(self, context: RequestContext, answer: Answer) -> None:
        """Encode ``answer`` and send it; returns once the sender has every record."""
        if isinstance(answer, Unanswered):
            raise ValueError("an unanswered request sends nothing")
        if isinstance(answer, DeadLetter):
            await self._dead_letter(context, answer.code, answer.message)
            if answer.tell_client and context.correlation_id is not None:
                await self._reply(context, self._error(context, ErrorCode.INTERNAL, answer.message))
            return
        if isinstance(answer, Scored):
            reply = self._success(context, answer)
        else:
            reply = self._error(context, answer.code, answer.message, answer.retriable)
        await self._reply(context, reply)

    # ---- encoding -------------------------------------------------------------------

    def _success(self, context: RequestContext, answer: Scored) -> _Reply:
        assert isinstance(context.decoded, DecodedRequest)
        total_ms = (time.monotonic() - context.received) * 1000.0
        try:
            value = encode_result(context.decoded, self._model_name, answer.result, total_ms)
        except ValueError as exc:  # NaN or infinite scores: a broken model, not the caller
            log.error("engine gave unusable scores", extra=context.log_fields())
            message = f"the model gave unusable scores: {exc}"
            return self._error(context, ErrorCode.INTERNAL, message, retriable=True)
        return _Reply(value, OUTCOME_OK)

    @staticmethod
    def _error(
        context: RequestContext, code: ErrorCode, message: str, retriable: bool = False
    ) -> _Reply:
        assert context.correlation_id is not None
        return _Reply(encode_error(context.correlation_id, code, message, retriable), code.value)

    # ---- replies --------------------------------------------------------------------

    async def _reply(self, context: RequestContext, reply: _Reply) -> None:
        """Send ``reply``, retrying what may pass until the reply timeout or the request's
        deadline (an error reply saying the deadline passed is not held to it)."""
        deadline = None if reply.outcome == ErrorCode.DEADLINE_EXCEEDED else context.deadline
        give_up, at_deadline = self._give_up_time(deadline)
        backoff = self._retry.first_backoff_s
        while True:
            try:
                await self._reply_once(context, reply)
                return
            except _Retry as retry:
                reason = retry.reason
            if self._clock() + backoff > give_up:
                await self._reply_gave_up(context, reason, at_deadline)
                return
            log.warning(
                "reply failed, retrying",
                extra=context.log_fields() | {"error": reason, "retry_in_s": backoff},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._retry.max_backoff_s)

    async def _reply_once(self, context: RequestContext, reply: _Reply) -> None:
        """One attempt; raises :class:`_Retry` when trying again may succeed."""
        assert context.correlation_id is not None
        destination = await self._router.resolve(context.route)
        if isinstance(destination, Unresolved):
            raise _Retry(destination.message)
        if isinstance(destination, Unroutable):
            await self._dead_letter(context, destination.code, destination.message)
            return
        output = OutputRecord(
            destination.topic,
            destination.partition,
            context.correlation_id.encode("utf-8"),
            reply.value,
            reply_headers(context.correlation_id),
            error_code=None if reply.outcome == OUTCOME_OK else reply.outcome,
        )
        try:
            await self._sender.send(context.record, output)
        except _TOO_LARGE as exc:
            if reply.outcome != OUTCOME_OK:
                await self._reply_failed(context, destination.topic, exc)
                return
            message = (
                f"the reply is too large for Kafka ({len(reply.value)} bytes); "
                "ask for fewer results (top_n) or without return_documents"
            )
            await self._reply_once(
                context, self._error(context, ErrorCode.PAYLOAD_TOO_LARGE, message)
            )
            return
        except KafkaError as exc:
            if _transient(exc):
                raise _Retry(repr(exc)) from exc
            await self._reply_failed(context, destination.topic, exc)
            return
        except Exception as exc:  # a producer bug: never leave the request unanswered
            await self._reply_failed(context, destination.topic, exc)
            return
        self._count_reply(context, reply.outcome)

    def _give_up_time(self, deadline: float | None) -> tuple[float, bool]:
        """When (on ``clock``) to stop retrying a reply, and whether that is the deadline."""
        now = self._clock()
        give_up = now + self._retry.reply_timeout_s
        if deadline is not None:
            at_deadline = now + max(0.0, deadline - time.time())
            if at_deadline < give_up:
                return at_deadline, True
        return give_up, False

    async def _reply_gave_up(self, context: RequestContext, reason: str, at_deadline: bool) -> None:
        if at_deadline:
            code, why = ErrorCode.DEADLINE_EXCEEDED, "before the request's deadline"
        else:
            code, why = ErrorCode.INTERNAL, f"within {self._retry.reply_timeout_s:g} s"
        topic = context.route.topic or "the default reply topic"
        log.error(
            "reply could not be delivered; sending the request to the dead-letter topic",
            extra=context.log_fields() | {"reply_topic": topic, "error": reason},
        )
        message = f"the reply could not be produced to {topic!r} {why}: {reason}"
        await self._dead_letter(context, code, message)

    async def _reply_failed(self, context: RequestContext, topic: str, exc: Exception) -> None:
        log.error(
            "reply refused by the broker; sending the request to the dead-letter topic",
            extra=context.log_fields() | {"reply_topic": topic, "error": repr(exc)},
        )
        message = f"the reply could not be produced to {topic!r}: {exc!r}"
        await self._dead_letter(context, ErrorCode.INTERNAL, message)

    def _count_reply(self, context: RequestContext, outcome: str) -> None:
        metrics = self._metrics
        if outcome == OUTCOME_OK:
            self._requests_ok.inc()
        else:
            metrics.requests.labels(outcome=outcome).inc()
            metrics.errors.labels(code=outcome).inc()
            log.debug("error reply sent", extra=context.log_fields() | {"error_code": outcome})
        timestamp = context.record.timestamp
        if timestamp is not None and timestamp > 0:
            metrics.request_latency.observe(max(0.0, time.time() - timestamp / 1000.0))

    # ---- dead letters ---------------------------------------------------------------

    async def _dead_letter(
        self, context: RequestContext, code: ErrorCode | str, message: str
    ) -> None:
        """Copy the record unchanged (key, value, headers) to the dead-letter topic.

        One exception: a record with neither key nor value gets an empty value, as the
        producer cannot send one without both. Returns only once the sender has it.
        """
        record = context.record
        code_text = code.value if isinstance(code, ErrorCode) else code
        headers = list(record.headers or ()) + dlq_headers(
            code, message, record.topic, record.partition, record.offset
        )
        value = record.value
        if value is None and record.key is None:
            # aiokafka refuses a record with neither key nor value (a tombstone without a
            # key); an empty value stands for it, and error-message says it had none.
            value = b""
        output = OutputRecord(
            self._dlq_topic, None, record.key, value, headers, code_text, dead_letter=True
        )
        await self._send_until_accepted(context, output)
        self._metrics.dlq_records.labels(code=code_text).inc()
        self._metrics.errors.labels(code=code_text).inc()
        log.warning(
            "request sent to the dead-letter topic",
            extra=context.log_fields() | {"error_code": code_text, "error": message},
        )

    async def _send_until_accepted(self, context: RequestContext, output: OutputRecord) -> None:
        """Send until the broker takes it, whatever the error: a dead-letter record is
        the last place a request can go, so it is never given up (nor committed)."""
        backoff = self._retry.first_backoff_s
        blocked_since: float | None = None
        last_log = 0.0
        accepted = False
        tp = context.partition
        try:
            while True:
                try:
                    await self._sender.send(context.record, output)
                    accepted = True
                    return
                except Exception as exc:
                    now = self._clock()
                    if blocked_since is None:
                        blocked_since = now
                        self._metrics.dead_letter_blocked.inc()
                        self._on_blocked(tp, True)
                    self._metrics.errors.labels(code="dlq_failed").inc()
                    if now - last_log >= _BLOCKED_LOG_EVERY_S:
                        last_log = now
                        log.error(
                            "dead-letter record refused; its partition is held and the "
                            "request stays uncommitted until the dead-letter topic takes it",
                            extra=context.log_fields()
                            | {
                                "dlq_topic": output.topic,
                                "error": repr(exc),
                                "blocked_s": round(now - blocked_since, 1),
                            },
                        )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry.dead_letter_max_backoff_s)
        finally:
            if blocked_since is not None:
                self._metrics.dead_letter_blocked.dec()
                self._on_blocked(tp, False)
                log.warning(
                    "dead-letter topic takes records again"
                    if accepted
                    else "stopped dead-lettering a record; it stays uncommitted",
                    extra=context.log_fields()
                    | {"blocked_s": round(self._clock() - blocked_since, 1)},
                )


def _transient(exc: KafkaError) -> bool:
    """True for failures that may pass (the broker is away, a leader is moving)."""
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))
