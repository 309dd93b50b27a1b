"""When to stop fetching: a high/low water mark on (query, document) pairs in flight.

Kafka is the buffer: above the high mark the worker pauses its partitions instead of
piling requests up in memory, and resumes once the load has fallen to the low mark.
The gap between the marks keeps the consumer from flapping on every request.
"""

from __future__ import annotations

from enum import Enum


class FlowChange(Enum):
    """What the consumer must do after the load changed."""

    PAUSE = "pause"
    RESUME = "resume"


class PairGate:
    """Counts pairs in flight and says when to pause and resume fetching."""

    def __init__(self, high: int, low: int) -> None:
        if high < 1 or not 0 <= low < high:
            raise ValueError(f"need high >= 1 and 0 <= low < high, got high={high} low={low}")
        self._high = high
        self._low = low
        self._pairs = 0
        self._paused = False

    @property
    def pairs(self) -> int:
        """Pairs accepted and not yet answered."""
        return self._pairs

    @property
    def room(self) -> int:
        """Pairs that can still be accepted before the high mark (0 when at or above it)."""
        return max(0, self._high - self._pairs)

    @property
    def paused(self) -> bool:
        """True while fetching should stay paused."""
        return self._paused

    def add(self, pairs: int) -> None:
        """Count ``pairs`` newly accepted."""
        self._pairs += pairs

    def remove(self, pairs: int) -> None:
        """Count ``pairs`` answered (or given up)."""
        self._pairs -= pairs
        if self._pairs < 0:
            raise ValueError("more pairs removed than added")

    def change(self) -> FlowChange | None:
        """The pause/resume the current load calls for, if the state must change."""
        if not self._paused and self._pairs > self._high:
            self._paused = True
            return FlowChange.PAUSE
        if self._paused and self._pairs <= self._low:
            self._paused = False
            return FlowChange.RESUME
        return None
