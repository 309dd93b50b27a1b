"""One request record from decoding to its acknowledged reply (or dead-letter record).

Decoding is synchronous and cheap (the worker's fetch loop does it, to know the
request's weight in pairs before it accepts more); the rest runs in the request's
own task, so a slow request never holds up the ones behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka.structs import ConsumerRecord

from consumer.engine.api import EngineError, EngineFailed, RerankEngine, ScoreRequest
from consumer.service.codec import (
    POISON_RECORD,
    DecodedRequest,
    Rejection,
    ReplyRoute,
    RequestLimits,
    decode_request,
    encode_rejection,
    encode_result,
    reply_address,
)
from consumer.service.delivery import OUTCOME_OK, Delivery
from schemas.models import ErrorCode

log = logging.getLogger(__name__)

Decoded = DecodedRequest | Rejection


class RequestProcessor:
    """Turns request records into replies with a :class:`RerankEngine`."""

    def __init__(
        self,
        engine: RerankEngine,
        delivery: Delivery,
        limits: RequestLimits,
        default_max_age_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._delivery = delivery
        self._limits = limits
        self._max_age_s = default_max_age_s
        self._clock = clock

    def decode(self, record: ConsumerRecord[Any, Any]) -> Decoded:
        """Decode and validate ``record``'s request; never raises."""
        try:
            return decode_request(record.value, record.headers or (), self._limits)
        except Exception as exc:
            # A bug in decoding must not turn one record into a poison pill that stops
            # the worker on every redelivery: the record goes to the dead-letter topic.
            log.exception(
                "decoding a request failed",
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
            return Rejection(
                None, ReplyRoute(), ErrorCode.INTERNAL, f"decoding failed: {type(exc).__name__}"
            )

    @staticmethod
    def weight(decoded: Decoded) -> int:
        """How many (query, document) pairs the request puts in flight (at least 1)."""
        if isinstance(decoded, DecodedRequest):
            return max(1, len(decoded.request.documents))
        return 1

    async def process(
        self, record: ConsumerRecord[Any, Any], decoded: Decoded, received: float
    ) -> bool:
        """Answer one request; returns once its reply or DLQ record is acknowledged.

        ``received`` is ``time.monotonic()`` when the record was fetched. True when the
        request was answered (its offset may be committed); False when it was left
        unanswered because the engine failed (another worker is to answer it). Never
        raises (but for cancellation): a bug while answering sends the record to the
        dead-letter topic, so its offset can be committed and the partition does not
        stall behind it.
        """
        try:
            await self._answer(record, decoded, received)
        except EngineFailed as exc:
            log.debug(
                "request left for another worker: the engine failed",
                extra=_coordinates(record) | {"error": str(exc)},
            )
            return False
        except Exception as exc:
            correlation_id = getattr(decoded, "correlation_id", None)
            log.exception(
                "answering a request failed; dead-lettering it",
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "correlation_id": correlation_id,
                },
            )
            await self._delivery.dead_letter(
                record,
                ErrorCode.INTERNAL,
                f"processing failed: {type(exc).__name__}",
                correlation_id,
            )
        return True

    async def give_up(self, record: ConsumerRecord[Any, Any], attempts: int) -> bool:
        """A record started ``attempts`` times and never finished (a poison record): copy
        it to the dead-letter topic, and tell its client, if its headers name one, with an
        ``internal`` error reply. The body is never decoded again. Returns True."""
        message = (
            f"the request was started {attempts} times and never finished (each time the "
            "worker died or was stopped while on it); it is not processed again"
        )
        correlation_id, route = reply_address(record.headers or ())
        log.error(
            "poison record: dead-lettered without processing it again",
            extra=_coordinates(record) | {"attempts": attempts, "correlation_id": correlation_id},
        )
        await self._delivery.dead_letter(record, POISON_RECORD, message, correlation_id)
        if correlation_id is not None:
            await self._delivery.reply_error(
                record, route, correlation_id, ErrorCode.INTERNAL, message, retriable=False
            )
        return True

    async def _answer(
        self, record: ConsumerRecord[Any, Any], decoded: Decoded, received: float
    ) -> None:
        if isinstance(decoded, Rejection):
            await self._reject(record, decoded)
            return
        deadline = self._deadline(record, decoded)
        if deadline is not None and deadline <= self._clock():
            await self._delivery.reply_error(
                record,
                decoded.route,
                decoded.correlation_id,
                ErrorCode.DEADLINE_EXCEEDED,
                "the request's deadline passed before it was scored",
                retriable=False,
            )
            return
        await self._score_and_reply(record, decoded, deadline, received)

    async def _reject(self, record: ConsumerRecord[Any, Any], rejection: Rejection) -> None:
        if rejection.correlation_id is None:
            await self._delivery.dead_letter(record, rejection.code, rejection.message)
            return
        value = encode_rejection(rejection)
        await self._delivery.reply(
            record, rejection.route, rejection.correlation_id, value, rejection.code.value
        )

    def _deadline(self, record: ConsumerRecord[Any, Any], decoded: DecodedRequest) -> float | None:
        if decoded.deadline is not None:
            return decoded.deadline
        if self._max_age_s > 0 and record.timestamp is not None and record.timestamp > 0:
            return record.timestamp / 1000.0 + self._max_age_s
        return None

    async def _score_and_reply(
        self,
        record: ConsumerRecord[Any, Any],
        decoded: DecodedRequest,
        deadline: float | None,
        received: float,
    ) -> None:
        request = decoded.request
        score_request = ScoreRequest(
            query=request.query,
            documents=tuple(request.documents),
            instruction=request.instruction,
            deadline=deadline,
            truncate=request.truncate,
            split_long_documents=request.split_long_documents,
        )
        error: tuple[ErrorCode, str, bool] | None = None
        try:
            result = await self._engine.score(score_request)
        except EngineFailed:
            raise  # not this request's fault: left for another worker
        except EngineError as exc:
            error = (_error_code(exc.code), str(exc) or type(exc).__name__, exc.retriable)
        except ValueError as exc:  # e.g. a prompt that cannot fit the model
            error = (ErrorCode.INVALID_REQUEST, str(exc), False)
        except Exception as exc:
            log.exception("engine failed", extra=_context(record, decoded))
            error = (ErrorCode.INTERNAL, f"scoring failed: {type(exc).__name__}", True)
        if error is None:
            total_ms = (time.monotonic() - received) * 1000.0
            try:
                value = encode_result(decoded, self._engine.model_name, result, total_ms)
            except ValueError as exc:  # NaN or infinite scores: a broken model, not the caller
                log.error("engine gave unusable scores", extra=_context(record, decoded))
                error = (ErrorCode.INTERNAL, f"the model gave unusable scores: {exc}", True)
            else:
                await self._delivery.reply(
                    record, decoded.route, decoded.correlation_id, value, OUTCOME_OK, deadline
                )
                return
        code, message, retriable = error
        await self._delivery.reply_error(
            record, decoded.route, decoded.correlation_id, code, message, retriable, deadline
        )


def _error_code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:  # an engine error with a code the contract does not know
        return ErrorCode.INTERNAL


def _context(record: ConsumerRecord[Any, Any], decoded: DecodedRequest) -> dict[str, Any]:
    return _coordinates(record) | {"correlation_id": decoded.correlation_id}


def _coordinates(record: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
