"""When to cut the next batch: as late as the device allows (pure Python, no threads).

With the device busy, a batch cut early commits to whatever waits at that moment, often
one request, and every request that comes while it waits for the device queues behind it.
Cut just before the device needs it instead, the batch takes everything that waits then,
and a request waits for the batch running when it came and its own, not for the batches
cut ahead of it (docs/engine.md, "Late cut"; measured in docs/benchmarks.md).

"Just before" is a prediction, made of three parts kept here:

* :class:`BatchClock`: how long a batch of a given cost keeps the device, fitted on the
  batches measured so far (exponentially weighted least squares: a fixed part plus a part
  per cost unit, so one-request batches and bigger ones are both predicted well; where
  the costs seen spread too little for a line, their mean time, never scaled up);
* :class:`DeviceSchedule`: the batches on the device, oldest first, and from the clock when
  the last of them ends;
* :class:`LeadTime`: how long a batch takes from its cut to being queued on the device
  (preparing its inputs and launching it), a high quantile of the recent ones; another one
  keeps how late the batch former woke for its recent late cuts (the GIL).

The batch former cuts at ``free_at - lead - wake - margin``, the margin covering what is
not measured (the inference thread's wake-up) and twice the clock's recent error. A
prediction that comes too late only costs the device an idle gap of one preparation and
launch: the inference thread sees the device done, goes idle, and the batch is cut at once.
"""

from __future__ import annotations

import math
from collections import deque

# The clock forgets a batch's weight by half after this many batches (it follows a
# change of load or of model within a few hundred batches).
CLOCK_HALF_LIFE = 64
# Predictions start after this many measured batches.
CLOCK_MIN_BATCHES = 8
# The lead is this quantile of the last LEAD_SAMPLES batches' cut-to-launch times.
LEAD_QUANTILE = 0.9
LEAD_SAMPLES = 32


class BatchClock:
    """Predicts a batch's device seconds from its cost (see the module's doc)."""

    def __init__(self, half_life: float = CLOCK_HALF_LIFE, min_batches: int = CLOCK_MIN_BATCHES):
        if half_life <= 0 or min_batches < 1:
            raise ValueError("half_life must be positive and min_batches at least 1")
        self._decay = 0.5 ** (1.0 / half_life)
        self._min_batches = min_batches
        self._seen = 0
        # exponentially weighted sums of 1, x, y, x², xy, and of the squared error
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._err_w = self._err = 0.0

    @property
    def batches(self) -> int:
        """Batches observed."""
        return self._seen

    def observe(self, cost: int, seconds: float) -> None:
        """One batch of ``cost`` kept the device ``seconds``."""
        if seconds < 0 or cost < 0:
            return
        predicted = self.predict(cost)
        if predicted is not None:
            self._err_w = self._err_w * self._decay + 1.0
            self._err = self._err * self._decay + (seconds - predicted) ** 2
        d = self._decay
        x, y = float(cost), float(seconds)
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self._seen += 1

    def predict(self, cost: int) -> float | None:
        """Device seconds of a batch of ``cost``; None until enough batches were seen."""
        if self._seen < self._min_batches:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        variance = self._xx / self._w - mean_x * mean_x
        covariance = self._xy / self._w - mean_x * mean_y
        # a line only where the costs seen spread enough to fit one
        if variance > (0.05 * mean_x) ** 2 and covariance > 0:
            slope = covariance / variance
            intercept = mean_y - slope * mean_x
            if intercept >= -0.1 * mean_y:  # a fixed part below zero is no device's
                return max(0.0, intercept + slope * cost)
        # Too little spread to fit: the mean, scaled down for a smaller batch but never up
        # (a prediction too long lets the device idle; one too short only cuts earlier).
        if mean_x <= 0:
            return mean_y
        return mean_y * min(1.0, cost / mean_x)

    def error(self) -> float:
        """The root mean square of the recent predictions' errors, in seconds (0: none yet)."""
        return math.sqrt(self._err / self._err_w) if self._err_w else 0.0


class DeviceSchedule:
    """The batches launched and not yet collected, oldest first, and when the device is
    due to be done with them."""

    def __init__(self, clock: BatchClock) -> None:
        self.clock = clock
        self._on_device: dict[object, tuple[int, float]] = {}  # batch -> (cost, launched)
        self._last_end = -math.inf  # when the last batch's results were read

    def __len__(self) -> int:
        return len(self._on_device)

    def launched(self, batch: object, cost: int, at: float) -> None:
        """``batch`` (of ``cost``) was handed to the device at ``at``."""
        self._on_device[batch] = (cost, at)

    def settled(self, batch: object, at: float, measured: bool) -> None:
        """``batch``'s results were read at ``at`` (or it failed); ``measured``: its time
        counts for the clock (it ran to the end, on its own)."""
        entry = self._on_device.pop(batch, None)
        if entry is None:
            return
        cost, launched = entry
        if measured:
            self.clock.observe(cost, at - max(launched, self._last_end))
        self._last_end = at

    def clear(self) -> None:
        """Nothing is on the device any more."""
        self._on_device.clear()

    def free_at(self) -> float | None:
        """When the device is due to finish every batch on it; None when it holds none or
        the clock cannot tell yet."""
        if not self._on_device:
            return None
        end = self._last_end
        for cost, launched in self._on_device.values():
            seconds = self.clock.predict(cost)
            if seconds is None:
                return None
            end = max(end, launched) + seconds
        return end


class LeadTime:
    """How long a batch takes from its cut to being queued on the device (recent high
    quantile; 0 until a batch is measured)."""

    def __init__(self, samples: int = LEAD_SAMPLES, quantile: float = LEAD_QUANTILE) -> None:
        self._samples: deque[float] = deque(maxlen=samples)
        self._quantile = quantile
        self._value = 0.0

    def add(self, seconds: float) -> None:
        """One batch's cut-to-launch time."""
        self._samples.append(max(0.0, seconds))
        ordered = sorted(self._samples)
        self._value = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]

    def seconds(self) -> float:
        """The lead to allow for the next batch."""
        return self._value
