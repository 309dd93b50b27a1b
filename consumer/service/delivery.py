"""Producing replies and dead-letter records, and what to do when that fails.

Every request ends in exactly one of: a reply on its reply topic, or a copy of its
record on the dead-letter topic. :class:`Delivery` returns only once the broker has
acknowledged that record (acks=all), which is when the request's offset may be
committed.

Failures, in order of fallback:

* the reply topic is not allowed or does not exist -> dead-letter record;
* a success reply too large for Kafka -> a ``payload_too_large`` error reply;
* the broker refuses a reply for good (not retriable) -> dead-letter record;
* a retriable failure (broker away, leader moving) -> the same record is sent again
  with backoff, for as long as the worker runs: the offset stays uncommitted, so a
  worker that stops meanwhile leaves the request to be redelivered;
* the dead-letter record itself is refused for good -> logged at error level and
  counted (``rerank_errors{code="dlq_failed"}``); nothing else can be done with it.

Logging: a dead-letter record is one warning line (nobody else hears of it); an error
reply is one debug line (its client is told). Both carry the record's topic, partition,
offset and correlation id. Successful replies are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import ConsumerRecord

from consumer.service.codec import ReplyRoute, dlq_headers, encode_error, reply_headers
from consumer.service.metrics import Metrics
from consumer.service.reply_router import ReplyRouter, Unroutable
from schemas.models import ErrorCode

log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 5.0
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


class Delivery:
    """Sends replies and dead-letter records through one producer."""

    def __init__(
        self, producer: Any, router: ReplyRouter, dlq_topic: str, metrics: Metrics
    ) -> None:
        self._producer = producer
        self._router = router
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._requests_ok = metrics.requests.labels(outcome=OUTCOME_OK)  # the hot path's child

    async def reply(
        self,
        record: ConsumerRecord[Any, Any],
        route: ReplyRoute,
        correlation_id: str,
        value: bytes,
        outcome: str,
    ) -> None:
        """Deliver a reply ``value``; ``outcome`` is ``"ok"`` or the error code it carries."""
        destination = await self._router.resolve(route)
        if isinstance(destination, Unroutable):
            await self.dead_letter(record, destination.code, destination.message, correlation_id)
            return
        key = correlation_id.encode("utf-8")
        try:
            await self._send_retrying(
                destination.topic,
                destination.partition,
                key,
                value,
                reply_headers(correlation_id),
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
            await self.reply(record, route, correlation_id, error, ErrorCode.PAYLOAD_TOO_LARGE)
            return
        except Exception as exc:  # KafkaError, or a producer bug: never leave it unanswered
            await self._reply_failed(record, destination.topic, correlation_id, exc)
            return
        self._count_reply(record, outcome)
        if outcome != OUTCOME_OK:
            log.debug(
                "error reply sent",
                extra=_coordinates(record)
                | {"correlation_id": correlation_id, "error_code": outcome},
            )

    async def reply_error(
        self,
        record: ConsumerRecord[Any, Any],
        route: ReplyRoute,
        correlation_id: str,
        code: ErrorCode,
        message: str,
        retriable: bool,
    ) -> None:
        """Deliver an error reply."""
        value = encode_error(correlation_id, code, message, retriable)
        await self.reply(record, route, correlation_id, value, code.value)

    async def dead_letter(
        self,
        record: ConsumerRecord[Any, Any],
        code: ErrorCode,
        message: str,
        correlation_id: str | None = None,
    ) -> None:
        """Copy ``record`` unchanged (key, value, headers) to the dead-letter topic.

        One exception: a record with neither key nor value gets an empty value, as the
        producer cannot send one without both.

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
        try:
            await self._send_retrying(self._dlq_topic, None, record.key, value, headers)
        except Exception as exc:
            self._metrics.errors.labels(code="dlq_failed").inc()
            log.error(
                "dead-letter record refused; the request is dropped",
                extra=context | {"error_code": code.value, "error": repr(exc)},
            )
            return
        self._metrics.dlq_records.labels(code=code.value).inc()
        self._metrics.errors.labels(code=code.value).inc()
        log.warning(
            "request sent to the dead-letter topic",
            extra=context | {"error_code": code.value, "error": message},
        )

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

    async def _send_retrying(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Send and wait for the broker's ack; retries failures that may pass."""
        backoff = _RETRY_FIRST_S
        while True:
            try:
                ack = await self._producer.send(
                    topic, value=value, key=key, partition=partition, headers=headers
                )
                await ack
                return
            except KafkaError as exc:
                if not _transient(exc):
                    raise
                log.warning(
                    "produce failed, retrying",
                    extra={"topic": topic, "error": repr(exc), "retry_in_s": backoff},
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX_S)


def _transient(exc: KafkaError) -> bool:
    """True for failures that may pass (the broker is away, a leader is moving)."""
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))


def _coordinates(record: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
