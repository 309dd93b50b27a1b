"""When to stop fetching: a high/low water mark on (query, document) pairs in flight.

Kafka is the buffer: above the high mark the worker pauses its partitions instead of
piling requests up in memory, and resumes once the load has fallen to the low mark.
The gap between the marks keeps the consumer from flapping on every request.

With ``target_s`` above 0 the marks follow the worker's measured rate. A fixed count of
pairs is a different wait on every model and card: 4,096 pairs are 2.5 s of work for the
0.6B reranker on an H200, and 26 s for the 8B one, longer than a rebalance waits for
revoked work (``revoke_timeout_s``). The high mark is then the pairs the worker answers
in ``target_s`` at its measured rate, never above the configured high mark nor below
``min_pairs``; the low mark keeps the configured ratio to it. Until a rate is measured,
the window is ``min_pairs``. The service leaves it off by default: what the window leaves
in Kafka is not taken oldest first, and the tail grows (docs/worker.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import Enum

# The rate is answered pairs over busy seconds (time with pairs in flight), both decayed
# with this time constant of busy time, so the window follows a change of load or model
# within seconds and one slow batch does not move it much.
RATE_TIME_CONSTANT_S = 10.0
# Busy seconds measured before the rate is trusted.
MIN_MEASURED_S = 1.0


class FlowChange(Enum):
    """What the consumer must do after the load changed."""

    PAUSE = "pause"
    RESUME = "resume"


class ServiceRate:
    """Pairs answered per second of busy time, exponentially decayed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._answered = 0.0
        self._busy_s = 0.0
        self._measured_s = 0.0

    def update(self, in_flight: int, answered: int = 0) -> None:
        """Account the time since the last update (busy if ``in_flight`` pairs were in
        flight through it), then ``answered`` pairs."""
        now = self._clock()
        elapsed, self._last = max(0.0, now - self._last), now
        if in_flight > 0:
            decay = math.exp(-elapsed / RATE_TIME_CONSTANT_S)
            self._answered *= decay
            self._busy_s = self._busy_s * decay + elapsed
            self._measured_s += elapsed
        self._answered += answered

    @property
    def pairs_per_s(self) -> float | None:
        """The measured rate; None until ``MIN_MEASURED_S`` of busy time was seen."""
        if self._measured_s < MIN_MEASURED_S or self._busy_s <= 0:
            return None
        return self._answered / self._busy_s


class PairGate:
    """Counts pairs in flight and says when to pause and resume fetching.

    ``high``/``low``: the configured marks, the most the window may be. ``target_s``:
    seconds of work the window holds at the measured rate (0: the configured marks
    always). ``min_pairs``: the smallest window, and the window before a rate is known.
    """

    def __init__(
        self,
        high: int,
        low: int,
        target_s: float = 0.0,
        min_pairs: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if high < 1 or not 0 <= low < high:
            raise ValueError(f"need high >= 1 and 0 <= low < high, got high={high} low={low}")
        if target_s < 0 or min_pairs < 1:
            raise ValueError(f"need target_s >= 0 and min_pairs >= 1, got {target_s}, {min_pairs}")
        self._high = high
        self._low = low
        self._target_s = target_s
        self._min_pairs = min(min_pairs, high)
        self._rate = ServiceRate(clock)
        self._pairs = 0
        self._paused = False

    @property
    def pairs(self) -> int:
        """Pairs accepted and not yet answered."""
        return self._pairs

    @property
    def high(self) -> int:
        """The high mark now: the configured one, or the pairs of ``target_s`` of work."""
        if self._target_s <= 0:
            return self._high
        rate = self._rate.pairs_per_s
        if rate is None:
            return self._min_pairs
        return max(self._min_pairs, min(self._high, int(rate * self._target_s)))

    @property
    def low(self) -> int:
        """The low mark now, in the configured ratio to :attr:`high`."""
        return self.high * self._low // self._high

    @property
    def room(self) -> int:
        """Pairs that can still be accepted before the high mark (0 when at or above it)."""
        return max(0, self.high - self._pairs)

    @property
    def paused(self) -> bool:
        """True while fetching should stay paused."""
        return self._paused

    def add(self, pairs: int) -> None:
        """Count ``pairs`` newly accepted."""
        if self._target_s > 0:  # the rate is only measured for a window that follows it
            self._rate.update(self._pairs)
        self._pairs += pairs

    def remove(self, pairs: int, answered: bool = True) -> None:
        """Count ``pairs`` finished: answered, or given up (``answered`` false, not counted
        in the rate)."""
        if pairs > self._pairs:
            raise ValueError("more pairs removed than added")
        if self._target_s > 0:
            self._rate.update(self._pairs, pairs if answered else 0)
        self._pairs -= pairs

    def change(self) -> FlowChange | None:
        """The pause/resume the current load calls for, if the state must change."""
        if not self._paused and self._pairs > self.high:
            self._paused = True
            return FlowChange.PAUSE
        if self._paused and self._pairs <= self.low:
            self._paused = False
            return FlowChange.RESUME
        return None
