"""The batch former thread: cuts batch k+1 and builds its inputs while the model runs batch k."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from consumer.engine.api import DeadlineExceeded, EngineError
from consumer.engine.handoff import BatchQueue
from consumer.engine.work import Batch, Post, Ticket, failure
from consumer.runtime.scorer import Scorer

log = logging.getLogger(__name__)


class BatchFormer:
    """Runs :meth:`run` on its own thread until the queue stops.

    ``on_crash(reason)`` is called if the thread dies of a bug, so the engine can fail
    every pending request instead of leaving them waiting.
    """

    def __init__(
        self, queue: BatchQueue, scorer: Scorer, post: Post, on_crash: Callable[[str], None]
    ) -> None:
        self._queue = queue
        self._scorer = scorer
        self._post = post
        self._on_crash = on_crash

    def run(self) -> None:
        """Cut, prepare and hand over batches until the engine stops."""
        try:
            while (formed := self._queue.cut()) is not None:
                if formed.expired:
                    self._post(
                        failure(
                            formed.expired,
                            DeadlineExceeded,
                            "the request's deadline passed in the queue",
                        )
                    )
                if not formed.items:
                    continue
                started = time.perf_counter()
                prepared = self._prepare(formed.items)
                prepare_s = time.perf_counter() - started
                batch = Batch(formed.items, prepared, formed.cost, prepare_s)
                if not self._queue.offer(batch):
                    # stopped while this batch was being prepared: it is in neither the
                    # queue nor the slot ahead, so nobody else will answer it
                    self._post(failure(batch.tickets, EngineError, "the engine stopped"))
                    return
        except BaseException:
            log.exception("batch former thread failed")
            self._on_crash("the batch former failed")
            raise

    def _prepare(self, tickets: list[Ticket]) -> object | None:
        """The batch's host inputs; None (the inference thread retries) if building fails."""
        try:
            return self._scorer.prepare([t.pair for t in tickets])
        except Exception:
            log.warning(
                "preparing a batch failed; the inference thread will build it", exc_info=True
            )
            return None
