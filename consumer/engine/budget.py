"""The batch token budget under out-of-memory errors.

Each out-of-memory lowers the budget by ``oom_budget_factor`` (never below
``min_batch_tokens``); after ``oom_recovery_batches`` good batches in a row it climbs back
one step (never above the configured budget), so a passing shortage costs nothing for
the rest of the process.
"""

from __future__ import annotations

import logging

from consumer.engine.handoff import BatchQueue
from consumer.engine.metrics import EngineMetrics
from consumer.engine.settings import EngineSettings

log = logging.getLogger(__name__)


class TokenBudget:
    """Owns the queue's ``max_batch_tokens``; used by the inference thread only."""

    def __init__(self, queue: BatchQueue, settings: EngineSettings, metrics: EngineMetrics) -> None:
        self._queue = queue
        self._settings = settings
        self._metrics = metrics
        self._good_batches = 0  # since the budget was last lowered

    def lower(self) -> int:
        """After an out-of-memory: the lowered budget."""
        current = self._queue.max_batch_tokens
        floor = min(current, self._settings.min_batch_tokens)
        lowered = max(floor, int(current * self._settings.oom_budget_factor))
        self._queue.max_batch_tokens = lowered
        self._good_batches = 0
        self._metrics.token_budget_changed(lowered)
        return lowered

    def batch_succeeded(self) -> None:
        """After a good batch: at a lowered budget, maybe give back one step of it."""
        configured = self._settings.max_batch_tokens
        current = self._queue.max_batch_tokens
        if current >= configured:
            return
        self._good_batches += 1
        if self._good_batches < self._settings.oom_recovery_batches:
            return
        self._good_batches = 0
        step_up = int(current / self._settings.oom_budget_factor)
        raised = min(configured, max(current + 1, step_up))
        self._queue.max_batch_tokens = raised
        log.info(
            "max_batch_tokens raised to %d after %d batches without running out of memory",
            raised,
            self._settings.oom_recovery_batches,
        )
        self._metrics.token_budget_changed(raised)
