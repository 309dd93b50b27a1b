"""The event loop's side of the requests in the engine: open, answer, fail, give up.

Everything here runs on the event loop thread; worker threads reach it only through
:meth:`RequestTable.deliver`, scheduled with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time

from consumer.engine.api import EngineError, ScoreResult
from consumer.engine.handoff import BatchQueue
from consumer.engine.work import Outcome, PendingRequest
from consumer.runtime.prompt import EncodedPair


class RequestTable:
    """The requests whose pairs are queued or on the model, and the count of those pairs."""

    def __init__(self, queue: BatchQueue) -> None:
        self._queue = queue
        self._active: set[PendingRequest] = set()
        self.in_flight_pairs = 0

    def open(
        self, loop: asyncio.AbstractEventLoop, pairs: list[EncodedPair], deadline: float | None
    ) -> PendingRequest | None:
        """Queue a tokenized request's pairs; None (nothing queued) when the engine stops."""
        request = PendingRequest(loop.create_future(), pairs, deadline)
        if not self._queue.enqueue(request.tickets):
            return None
        self._active.add(request)
        self.in_flight_pairs += len(pairs)
        return request

    def deliver(self, outcome: Outcome) -> None:
        """Hand one batch's results (or its error) to their requests."""
        if outcome.error_type is not None:
            for request in {t.request: None for t in outcome.tickets}:
                self.fail(request, outcome.error_type, outcome.error_message)
            return
        batch = outcome.batch
        assert batch is not None, "a successful outcome reports its batch"
        now = time.perf_counter()
        for ticket, logit, score in zip(
            outcome.tickets, outcome.logits, outcome.scores, strict=True
        ):
            request = ticket.request
            if request.done:
                continue
            request.logits[ticket.index] = logit
            request.scores[ticket.index] = score
            request.batches[batch.batch_id] = batch
            request.remaining -= 1
            self.in_flight_pairs -= 1
            if request.remaining == 0:
                request.done = True
                request.finished = now
                self._active.discard(request)
                if not request.future.done():
                    request.future.set_result(None)

    def fail(self, request: PendingRequest, error_type: type[EngineError], message: str) -> None:
        """Answer ``request`` with ``error_type(message)`` (if it is not answered yet)."""
        if request.done:
            return
        self.abandon(request)
        if not request.future.done():
            request.future.set_exception(error_type(message))

    def fail_all(self, error_type: type[EngineError], message: str) -> None:
        """Answer every open request with ``error_type(message)``."""
        for request in list(self._active):
            self.fail(request, error_type, message)

    def abandon(self, request: PendingRequest) -> None:
        """Give a request up: drop its queued pairs and stop counting them."""
        if request.done:
            return
        request.done = True
        self._active.discard(request)
        self._queue.remove(request.tickets)
        self.in_flight_pairs -= request.remaining
        request.remaining = 0


def score_result(
    request: PendingRequest, pairs: list[EncodedPair], tokenize_s: float
) -> ScoreResult:
    """The answer of a request whose pairs are all scored."""
    inference_s = sum(batch.seconds for batch in request.batches.values())
    in_engine_s = request.finished - request.enqueued
    return ScoreResult(
        logits=tuple(request.logits),
        scores=tuple(request.scores),
        prompt_tokens=sum(p.tokens for p in pairs),
        truncated=tuple(p.truncated for p in pairs),
        queue_ms=max(0.0, in_engine_s - inference_s) * 1000.0,
        inference_ms=inference_s * 1000.0,
        extra={"tokenize_ms": tokenize_s * 1000.0, "batches": float(len(request.batches))},
        batches=tuple(request.batches.values()),
    )
