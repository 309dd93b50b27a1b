"""One request record from decoding to its delivered answer, in one straight line.

``decode`` -> :class:`~consumer.service.context.RequestContext`; ``answer`` -> one
:data:`~consumer.service.context.Answer` (scored, an error reply, a dead letter, or left
unanswered); the responder delivers it. Decoding is synchronous and cheap (the fetch
loop does it, to know the request's weight in pairs before it accepts more); the rest
runs in the request's own task, so a slow request never holds up the ones behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.structs import ConsumerRecord

from consumer.engine.api import EngineError, EngineFailed, RerankEngine, ScoreRequest
from consumer.service.codec import POISON_RECORD, DecodedRequest, RequestLimits
from consumer.service.context import (
    Answer,
    DeadLetter,
    ErrorReply,
    RequestContext,
    Scored,
    Unanswered,
    deadline_passed,
    decode_context,
    headers_only_context,
    rejection_answer,
)
from consumer.service.failures import Unwritable
from consumer.service.responder import Responder
from schemas.models import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A request record on its way: its context, and the work that answers it.

    ``run`` returns True once the answer is delivered (the offset may be committed) and
    False when the request was left unanswered (another worker is to answer it).
    """

    context: RequestContext
    run: Coroutine[Any, Any, bool]


class Processor(Protocol):
    """What the worker's intake asks of request processing (tracing wraps it)."""

    def start(self, record: ConsumerRecord[Any, Any], received: float) -> Job:
        """Decode ``record`` (never raises) and return the work that answers it."""
        ...

    def give_up(self, record: ConsumerRecord[Any, Any], attempts: int, received: float) -> Job:
        """The work for a poison record: dead-lettered, never decoded again."""
        ...


class RequestProcessor:
    """Turns request records into delivered answers with a :class:`RerankEngine`."""

    def __init__(
        self,
        engine: RerankEngine,
        responder: Responder,
        limits: RequestLimits,
        default_max_age_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self._responder = responder
        self._limits = limits
        self._max_age_s = default_max_age_s
        self._clock = clock

    def start(self, record: ConsumerRecord[Any, Any], received: float) -> Job:
        """Decode ``record`` and return the work that answers it."""
        context = decode_context(record, received, self._limits, self._max_age_s)
        return Job(context, self._run(context))

    def give_up(self, record: ConsumerRecord[Any, Any], attempts: int, received: float) -> Job:
        """A record started ``attempts`` times and never finished: copy it to the
        dead-letter topic, and tell its client, if its headers name one, with an
        ``internal`` error reply. The body is never decoded again."""
        context = headers_only_context(record, received)
        message = (
            f"the request was started {attempts} times and never finished (each time the "
            "worker died or was stopped while on it); it is not processed again"
        )
        log.error(
            "poison record: dead-lettered without processing it again",
            extra=context.log_fields() | {"attempts": attempts},
        )
        answer = DeadLetter(POISON_RECORD, message, tell_client=True)
        return Job(context, self._deliver(context, answer))

    async def answer(self, context: RequestContext) -> Answer:
        """What ``context``'s request is answered with (never raises but for cancellation)."""
        decoded = context.decoded
        if not isinstance(decoded, DecodedRequest):
            assert decoded is not None, "only a poison record is not decoded"
            return rejection_answer(decoded)
        if deadline_passed(context, self._clock):
            return ErrorReply(
                ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it was scored"
            )
        request = decoded.request
        score_request = ScoreRequest(
            query=request.query,
            documents=tuple(request.documents),
            instruction=request.instruction,
            deadline=context.deadline,
            truncate=request.truncate,
            split_long_documents=request.split_long_documents,
        )
        try:
            return Scored(await self.engine.score(score_request))
        except EngineFailed as exc:  # not this request's fault: left for another worker
            return Unanswered(str(exc))
        except EngineError as exc:
            return ErrorReply(_error_code(exc.code), str(exc) or type(exc).__name__, exc.retriable)
        except ValueError as exc:  # e.g. a prompt that cannot fit the model
            return ErrorReply(ErrorCode.INVALID_REQUEST, str(exc))
        except Exception as exc:
            log.exception("engine failed", extra=context.log_fields())
            return ErrorReply(ErrorCode.INTERNAL, f"scoring failed: {type(exc).__name__}", True)

    async def _run(self, context: RequestContext) -> bool:
        return await self._deliver(context, await self.answer(context))

    async def _deliver(self, context: RequestContext, answer: Answer) -> bool:
        """Deliver ``answer``; a bug while doing so dead-letters the record instead, so
        its offset can be committed and the partition does not stall behind it."""
        if isinstance(answer, Unanswered):
            log.debug(
                "request left for another worker: the engine failed",
                extra=context.log_fields() | {"error": answer.reason},
            )
            return False
        try:
            await self._responder.deliver(context, answer)
        except Unwritable:
            return False  # the worker is stopping; the request stays for another
        except Exception as exc:
            log.exception(
                "answering a request failed; dead-lettering it", extra=context.log_fields()
            )
            fallback = DeadLetter(ErrorCode.INTERNAL, f"processing failed: {type(exc).__name__}")
            try:
                await self._responder.deliver(context, fallback)
            except Unwritable:
                return False
        return True


def _error_code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:  # an engine error with a code the contract does not know
        return ErrorCode.INTERNAL
