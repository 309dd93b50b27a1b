"""What the engine reports about its batches, and to whom.

The engine never imports Prometheus: it reports to an :class:`EngineMetrics` (the
service's metrics implement it; benchmarks record with their own) and keeps plain
counters in :class:`EngineStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.runtime.prompt import EncodedPair


@dataclass(frozen=True)
class BatchReport:
    """One scored batch: its pairs, what it cost, and how long the model took.

    ``cost_tokens`` is the scorer's cost (padded tokens, or the real ones when packed);
    ``queue_waits_s`` is, per pair, the time from its enqueueing to the batch's start.
    """

    pairs: Sequence[EncodedPair]
    real_tokens: int
    cost_tokens: int
    seconds: float
    queue_waits_s: Sequence[float]

    @property
    def truncated_pairs(self) -> int:
        """Pairs whose document was cut to fit the pair limit."""
        return sum(1 for pair in self.pairs if pair.truncated)


class EngineMetrics(Protocol):
    """Receives the engine's reports; called from the engine's threads."""

    def batch_scored(self, report: BatchReport) -> None:
        """A batch was scored."""
        ...

    def token_budget_changed(self, max_batch_tokens: int) -> None:
        """The batch token budget is now ``max_batch_tokens`` (start, out of memory, recovery)."""
        ...

    def out_of_memory_split(self) -> None:
        """A batch ran out of memory and was split in halves."""
        ...

    def model_started(self, name: str, kind: str, device: str, dtype: str) -> None:
        """The model is warmed up and serving."""
        ...


class NoMetrics:
    """An :class:`EngineMetrics` that records nothing; subclass it to record some."""

    def batch_scored(self, report: BatchReport) -> None:
        """Ignored."""

    def token_budget_changed(self, max_batch_tokens: int) -> None:
        """Ignored."""

    def out_of_memory_split(self) -> None:
        """Ignored."""

    def model_started(self, name: str, kind: str, device: str, dtype: str) -> None:
        """Ignored."""


@dataclass
class EngineStats:
    """Counters the engine keeps whoever listens (written by its inference thread)."""

    batches: int = 0
    pairs_scored: int = 0
    real_tokens: int = 0
    cost_tokens: int = 0  # what the batches cost (padded tokens, or real ones when packed)
    oom_splits: int = 0
    warmup_s: float = 0.0

    def add(self, report: BatchReport) -> None:
        """Count one scored batch."""
        self.batches += 1
        self.pairs_scored += len(report.pairs)
        self.real_tokens += report.real_tokens
        self.cost_tokens += report.cost_tokens
