"""Producing replies and dead-letter records, and what to do when that fails.

Every request ends in exactly one of: a reply on its reply topic, or a copy of its
record on the dead-letter topic. :class:`Delivery` returns only once the broker has
acknowledged that record (acks=all), which is when the request's offset may be
committed.

Failures, in order of fallback:

* the reply topic is not allowed or does not exist -> dead-letter record;
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
from typing import Any, Protocol

from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.codec import ReplyRoute, dlq_headers, encode_error, reply_headers
from consumer.service.conventions import NATIVE, Convention
from consumer.service.metrics import Metrics
from consumer.service.reply_router import ReplyRouter, Unresolved, Unroutable
from consumer.service.tracing import mark_failed
from schemas.models import ErrorCode

log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# A blocked dead-letter record says so again in the log this often.
_BLOCKED_LOG_EVERY_S = 60.0

# Called with (partition, True) when a record of that partition cannot be dead-lettered
# (hold the partition) and (partition, False) once it could.
DeadLetterBlocked = Callable[[TopicPartition, bool], None]


class Sender(Protocol):
    """How an output of the request ``source`` reaches Kafka."""

    async def send(
        self,
        source: ConsumerRecord[Any, Any],
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Returns once the output is as good as written (acknowledged, or kept for the
        source partition's transaction); raises the producer's error otherwise."""
        ...


class AckedSender:
    """At-least-once: produce now and wait for the broker's ack (acks=all)."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer

    async def send(
        self,
        source: ConsumerRecord[Any, Any],
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Send one record and wait for the broker's ack."""
        ack = await self._producer.send(
            topic, value=value, key=key, partition=partition, headers=headers
        )
        await ack


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often failed sends are tried again.

    ``reply_timeout_s``: a reply that keeps failing is given up (dead-lettered) after
    this long, or at the request's deadline if that comes first. Dead-letter records
    are never given up; their backoff grows to ``dead_letter_max_backoff_s``.
    """

    reply_timeout_s: float = 30.0
    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    dead_letter_max_backoff_s: float = 30.0


class _Retry(Exception):
    """A send failed in a way that may pass; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Delivery:
    """Sends replies and dead-letter records through one producer."""

    def __init__(
        self,
        sender: Sender,
        router: ReplyRouter,
        dlq_topic: str,
        metrics: Metrics,
        policy: RetryPolicy | None = None,
        on_dead_letter_blocked: DeadLetterBlocked | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sender``: :class:`AckedSender` (at-least-once) or the exactly-once mode's
        :class:`consumer.service.transactions.TransactionalSender`."""
        self._sender = sender
        self._router = router
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._policy = policy or RetryPolicy()
        self._on_blocked = on_dead_letter_blocked or (lambda tp, blocked: None)
        self._clock = clock
        self._requests_ok = metrics.requests.labels(outcome=OUTCOME_OK)  # the hot path's child

    async def reply(
        self,
        record: ConsumerRecord[Any, Any],
        route: ReplyRoute,
        correlation_id: str,
        value: bytes,
        outcome: str,
        deadline: float | None = None,
        convention: Convention = NATIVE,
    ) -> None:
        """Deliver a reply ``value``; ``outcome`` is ``"ok"`` or the error code it carries.

        ``deadline`` (Unix time) is the request's: retrying stops there. An error reply
        fails the request's span, when it is traced. ``convention``: the caller's header
        convention, which the reply's headers follow.
        """
        if outcome != OUTCOME_OK:
            mark_failed(outcome, f"answered with an error reply: {outcome}")
        give_up, at_deadline = self._give_up_time(deadline)
        backoff = self._policy.first_backoff_s
        while True:
            try:
                await self._reply_once(record, route, correlation_id, value, outcome, convention)
                return
            except _Retry as retry:
                reason = retry.reason
            if self._clock() + backoff > give_up:
                await self._reply_gave_up(record, route, correlation_id, reason, at_deadline)
                return
            log.warning(
                "reply failed, retrying",
                extra=_coordinates(record)
                | {"correlation_id": correlation_id, "error": reason, "retry_in_s": backoff},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._policy.max_backoff_s)

    async def reply_error(
        self,
        record: ConsumerRecord[Any, Any],
        route: ReplyRoute,
        correlation_id: str,
        code: ErrorCode,
        message: str,
        retriable: bool,
        deadline: float | None = None,
        convention: Convention = NATIVE,
    ) -> None:
        """Deliver an error reply."""
        value = encode_error(correlation_id, code, message, retriable)
        await self.reply(record, route, correlation_id, value, code.value, deadline, convention)

    async def dead_letter(
        self,
        record: ConsumerRecord[Any, Any],
        code: ErrorCode | str,
        message: str,
        correlation_id: str | None = None,
    ) -> None:
        """Copy ``record`` unchanged (key, value, headers) to the dead-letter topic.

        One exception: a record with neither key nor value gets an empty value, as the
        producer cannot send one without both. Returns only once the broker has it.

        ``correlation_id`` (when the request had one) only goes into the log line.
        """
        context = _coordinates(record) | {"correlation_id": correlation_id}
        headers = list(record.headers or ()) + dlq_headers(
            code, message, record.topic, record.partition, record.offset
        )
        value = record.value
        if value is None and record.key is None:
            # aiokafka refuses a record with neither key nor value (a tombstone without a
            # key); an empty value stands for it, and error-message says it had none.
            value = b""
        await self._send_until_accepted(record, self._dlq_topic, record.key, value, headers)
        code_text = code.value if isinstance(code, ErrorCode) else code
        self._metrics.dlq_records.labels(code=code_text).inc()
        self._metrics.errors.labels(code=code_text).inc()
        log.warning(
            "request sent to the dead-letter topic",
            extra=context | {"error_code": code_text, "error": message},
        )

    # ---- replies ------------------------------------------------------------------------

    async def _reply_once(
        self,
        record: ConsumerRecord[Any, Any],
        route: ReplyRoute,
        correlation_id: str,
        value: bytes,
        outcome: str,
        convention: Convention = NATIVE,
    ) -> None:
        """One attempt; raises :class:`_Retry` when trying again may succeed."""
        destination = await self._router.resolve(route)
        if isinstance(destination, Unresolved):
            raise _Retry(destination.message)
        if isinstance(destination, Unroutable):
            await self.dead_letter(record, destination.code, destination.message, correlation_id)
            return
        key = correlation_id.encode("utf-8")
        try:
            await self._sender.send(
                record,
                destination.topic,
                destination.partition,
                key,
                value,
                reply_headers(correlation_id, convention, error=outcome != OUTCOME_OK),
            )
        except _TOO_LARGE as exc:
            if outcome != OUTCOME_OK:
                await self._reply_failed(record, destination.topic, correlation_id, exc)
                return
            message = (
                f"the reply is too large for Kafka ({len(value)} bytes); "
                "ask for fewer results (top_n) or without return_documents"
            )
            error = encode_error(correlation_id, ErrorCode.PAYLOAD_TOO_LARGE, message, False)
            await self._reply_once(
                record, route, correlation_id, error, ErrorCode.PAYLOAD_TOO_LARGE, convention
            )
            return
        except KafkaError as exc:
            if _transient(exc):
                raise _Retry(repr(exc)) from exc
            await self._reply_failed(record, destination.topic, correlation_id, exc)
            return
        except Exception as exc:  # a producer bug: never leave the request unanswered
            await self._reply_failed(record, destination.topic, correlation_id, exc)
            return
        self._count_reply(record, outcome)
        if outcome != OUTCOME_OK:
            log.debug(
                "error reply sent",
                extra=_coordinates(record)
                | {"correlation_id": correlation_id, "error_code": outcome},
            )

    def _give_up_time(self, deadline: float | None) -> tuple[float, bool]:
        """When (on ``clock``) to stop retrying a reply, and whether that is the deadline."""
        now = self._clock()
        give_up = now + self._policy.reply_timeout_s
        if deadline is not None:
            at_deadline = now + max(0.0, deadline - time.time())
            if at_deadline < give_up:
                return at_deadline, True
        return give_up, False

    async def _reply_gave_up(
        self,
        record: ConsumerRecord[Any, Any],
        route: ReplyRoute,
        correlation_id: str,
        reason: str,
        at_deadline: bool,
    ) -> None:
        if at_deadline:
            code, why = ErrorCode.DEADLINE_EXCEEDED, "before the request's deadline"
        else:
            code, why = ErrorCode.INTERNAL, f"within {self._policy.reply_timeout_s:g} s"
        topic = route.topic or "the default reply topic"
        log.error(
            "reply could not be delivered; sending the request to the dead-letter topic",
            extra=_coordinates(record)
            | {"correlation_id": correlation_id, "reply_topic": topic, "error": reason},
        )
        message = f"the reply could not be produced to {topic!r} {why}: {reason}"
        await self.dead_letter(record, code, message, correlation_id)

    async def _reply_failed(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        correlation_id: str,
        exc: Exception,
    ) -> None:
        log.error(
            "reply refused by the broker; sending the request to the dead-letter topic",
            extra=_coordinates(record)
            | {"correlation_id": correlation_id, "reply_topic": topic, "error": repr(exc)},
        )
        await self.dead_letter(
            record,
            ErrorCode.INTERNAL,
            f"the reply could not be produced to {topic!r}: {exc!r}",
            correlation_id,
        )

    def _count_reply(self, record: ConsumerRecord[Any, Any], outcome: str) -> None:
        metrics = self._metrics
        if outcome == OUTCOME_OK:
            self._requests_ok.inc()
        else:
            metrics.requests.labels(outcome=outcome).inc()
            metrics.errors.labels(code=outcome).inc()
        if record.timestamp is not None and record.timestamp > 0:
            metrics.request_latency.observe(max(0.0, time.time() - record.timestamp / 1000.0))

    # ---- sending ------------------------------------------------------------------------

    async def _send_until_accepted(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Send until the broker takes it, whatever the error: a dead-letter record is
        the last place a request can go, so it is never given up (nor committed)."""
        backoff = self._policy.first_backoff_s
        blocked_since: float | None = None
        last_log = 0.0
        accepted = False
        tp = TopicPartition(record.topic, record.partition)
        try:
            while True:
                try:
                    await self._sender.send(record, topic, None, key, value, headers)
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
                            extra=_coordinates(record)
                            | {
                                "dlq_topic": topic,
                                "error": repr(exc),
                                "blocked_s": round(now - blocked_since, 1),
                            },
                        )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._policy.dead_letter_max_backoff_s)
        finally:
            if blocked_since is not None:
                self._metrics.dead_letter_blocked.dec()
                self._on_blocked(tp, False)
                log.warning(
                    "dead-letter topic takes records again"
                    if accepted
                    else "stopped dead-lettering a record; it stays uncommitted",
                    extra=_coordinates(record)
                    | {"blocked_s": round(self._clock() - blocked_since, 1)},
                )


def _transient(exc: KafkaError) -> bool:
    """True for failures that may pass (the broker is away, a leader is moving)."""
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))


def _coordinates(record: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
