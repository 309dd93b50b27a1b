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
* a dead-letter copy too large for Kafka (the record was near a size limit, and the
  copy adds headers) -> a dead-letter record without the value, then without the key and
  the request's headers too, with ``source-size`` and the source coordinates: a pointer;
* the dead-letter record cannot be written for a reason that may pass -> it is tried
  again with backoff for as long as the worker runs, and never committed meanwhile: the
  record's partition is held (paused, through ``on_dead_letter_blocked``),
  ``rerank_dead_letter_blocked`` counts the records waiting, and the log says so. A worker
  that stops leaves the record uncommitted, so it is redelivered. Nothing is dropped;
* the broker refuses the dead-letter record for good otherwise (the worker may not
  write to the topic) -> ``on_fatal``: only an operator can fix that, so the worker
  stops with one clear line instead of retrying forever; the record stays uncommitted.

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
    without_dlq_headers,
)
from consumer.service.context import (
    Answer,
    DeadLetter,
    RequestContext,
    Scored,
    Unanswered,
)
from consumer.service.failures import Unwritable
from consumer.service.metrics import Metrics
from consumer.service.outputs import OutputRecord, Sender
from consumer.service.reply_router import Destination, ReplyRouter, Unresolved, Unroutable
from schemas.models import ErrorCode

log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# A blocked dead-letter record says so again in the log this often.
_BLOCKED_LOG_EVERY_S = 60.0

# Called with (partition, True) when a record of that partition cannot be dead-lettered
# (hold the partition) and (partition, False) once it could.
DeadLetterBlocked = Callable[[TopicPartition, bool], None]
# Called when nothing but an operator can make an answer writable (stop the worker).
Fatal = Callable[[Exception], None]


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
        on_fatal: Fatal | None = None,
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
        self._on_fatal = on_fatal or (lambda exc: None)
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
            reply_headers(
                context.correlation_id, context.convention, error=reply.outcome != OUTCOME_OK
            ),
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

    def _reply_record(
        self, context: RequestContext, destination: Destination, reply: _Reply
    ) -> OutputRecord:
        """The reply record; a success reply carries what replaces it when too large."""
        assert context.correlation_id is not None
        smaller = None
        if reply.outcome == OUTCOME_OK:
            smaller = self._reply_record(context, destination, self._too_large(context, reply))
        else:
            message = f"the {reply.outcome} reply was too large for Kafka"
            smaller = self._dead_letter_record(context, ErrorCode.INTERNAL.value, message)
        return OutputRecord(
            destination.topic,
            destination.partition,
            context.correlation_id.encode("utf-8"),
            reply.value,
            reply_headers(
                context.correlation_id, context.convention, error=reply.outcome != OUTCOME_OK
            ),
            error_code=None if reply.outcome == OUTCOME_OK else reply.outcome,
            smaller=smaller,
        )

    def _too_large(self, context: RequestContext, reply: _Reply) -> _Reply:
        message = (
            f"the reply is too large for Kafka ({len(reply.value)} bytes); "
            "ask for fewer results (top_n) or without return_documents"
        )
        return self._error(context, ErrorCode.PAYLOAD_TOO_LARGE, message)

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
        """Copy the record to the dead-letter topic; returns once the sender has it.

        The copy keeps the key, the value and the request's headers after the dead-letter
        headers (a header of the request named like one of those is left out: it would
        be a forgery). A copy too large for Kafka goes as a pointer instead
        (:meth:`_dead_letter_record`).
        """
        code_text = code.value if isinstance(code, ErrorCode) else code
        output = self._dead_letter_record(context, code_text, message)
        await self._send_until_accepted(context, output)
        self._metrics.dlq_records.labels(code=code_text).inc()
        self._metrics.errors.labels(code=code_text).inc()
        log.warning(
            "request sent to the dead-letter topic",
            extra=context.log_fields() | {"error_code": code_text, "error": message},
        )

    def _dead_letter_record(self, context: RequestContext, code: str, message: str) -> OutputRecord:
        """The whole copy, then (``smaller``) the copy without the value, then one without
        the key and the request's headers: the last always fits."""
        record = context.record
        own = without_dlq_headers(record.headers or ())
        size = (
            len(record.key or b"")
            + len(record.value or b"")
            + sum(len(name) + len(value or b"") for name, value in own)
        )

        def headers(note: str = "", source_size: int | None = None) -> list[tuple[str, bytes]]:
            return dlq_headers(
                code, message + note, record.topic, record.partition, record.offset, source_size
            )

        omitted = (
            f" (the record, {size} bytes, was too large to copy: its value is left out; "
            "read it at its source offset)"
        )
        bare = OutputRecord(
            self._dlq_topic, None, None, b"", headers(omitted, size), code, dead_letter=True
        )
        pointer = OutputRecord(
            self._dlq_topic,
            None,
            record.key,
            b"",
            headers(omitted, size) + own,
            code,
            dead_letter=True,
            smaller=bare,
        )
        # aiokafka refuses a record with neither key nor value (a tombstone without a
        # key); an empty value stands for it, and error-message says it had none.
        value = record.value if record.value is not None or record.key is not None else b""
        return OutputRecord(
            self._dlq_topic,
            None,
            record.key,
            value,
            headers() + own,
            code,
            dead_letter=True,
            smaller=pointer,
        )

    async def _send_until_accepted(self, context: RequestContext, output: OutputRecord) -> None:
        """Send until the broker takes it: a dead-letter record is the last place a
        request can go, so a failure that may pass is retried for as long as the worker
        runs (its partition held, never committed meanwhile)."""
        hold = _Hold(self, context)
        try:
            while True:
                try:
                    await self._sender.send(context.record, output)
                    hold.accepted = True
                    return
                except _TOO_LARGE as exc:
                    if output.smaller is None:
                        raise
                    log.warning(
                        "dead-letter record too large for Kafka; sending a smaller one",
                        extra=context.log_fields() | {"error": repr(exc), "bytes": output.size},
                    )
                    output = output.smaller
                    continue
                except KafkaError as exc:
                    if not _transient(exc):
                        self._refused_for_good(output, exc)
                    hold.failed(output, exc)
                except Exception as exc:  # a producer bug: retried all the same
                    hold.failed(output, exc)
                await asyncio.sleep(hold.backoff())
        finally:
            hold.release()

    def _refused_for_good(self, output: OutputRecord, exc: KafkaError) -> None:
        """The broker will not take the dead-letter record whatever is retried (the
        worker may not write to the topic): stop the worker, keep the request."""
        self._metrics.errors.labels(code="dlq_failed").inc()
        error = Unwritable(
            f"the dead-letter topic {output.topic!r} refuses records for good "
            f"({type(exc).__name__}: {exc}); this worker's principal needs WRITE and "
            "DESCRIBE on it (docs/operations.md, Kafka ACLs)"
        )
        self._on_fatal(error)
        raise error from exc


class _Hold:
    """A dead-letter record that keeps failing: its partition held, its backoff, its
    log lines (one now and then)."""

    def __init__(self, responder: Responder, context: RequestContext) -> None:
        self._responder = responder
        self._context = context
        self._backoff = responder._retry.first_backoff_s
        self._since: float | None = None
        self._last_log = 0.0
        self.accepted = False

    def failed(self, output: OutputRecord, exc: Exception) -> None:
        responder, now = self._responder, self._responder._clock()
        if self._since is None:
            self._since = now
            responder._metrics.dead_letter_blocked.inc()
            responder._on_blocked(self._context.partition, True)
        responder._metrics.errors.labels(code="dlq_failed").inc()
        if now - self._last_log >= _BLOCKED_LOG_EVERY_S:
            self._last_log = now
            log.error(
                "dead-letter record refused; its partition is held and the request stays "
                "uncommitted until the dead-letter topic takes it",
                extra=self._context.log_fields()
                | {
                    "dlq_topic": output.topic,
                    "error": repr(exc),
                    "blocked_s": round(now - self._since, 1),
                },
            )

    def backoff(self) -> float:
        backoff = self._backoff
        self._backoff = min(backoff * 2, self._responder._retry.dead_letter_max_backoff_s)
        return backoff

    def release(self) -> None:
        if self._since is None:
            return
        responder = self._responder
        responder._metrics.dead_letter_blocked.dec()
        responder._on_blocked(self._context.partition, False)
        log.warning(
            "dead-letter topic takes records again"
            if self.accepted
            else "stopped dead-lettering a record; it stays uncommitted",
            extra=self._context.log_fields()
            | {"blocked_s": round(responder._clock() - self._since, 1)},
        )


def _transient(exc: KafkaError) -> bool:
    """True for failures that may pass (the broker is away, a leader is moving)."""
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))
