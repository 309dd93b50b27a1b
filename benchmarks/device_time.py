"""How long each batch keeps the GPU busy, from CUDA events: a scorer wrapper for benches.

The engine bench's older share, "a batch on the device (host's view)", counts the time
from a batch's launch to its results being read; the device may idle inside that span.
:class:`DeviceTimedScorer` records a CUDA event on the stream before and after each
batch's work is queued. The stream reaches the first event only when the batch before has
finished (batches run in order on one stream), so the time between the two events is the
batch's own span on the device. It still counts gaps inside a batch where the GPU waited
for the host to issue kernels (a batch too big for a CUDA graph is issued from Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consumer.runtime.prompt import EncodedPair, PromptEncoder
from consumer.runtime.scorer import Scorer, ScorerTraits


@dataclass
class _Timed:
    handle: object
    start: torch.cuda.Event
    end: torch.cuda.Event


class DeviceTimedScorer:
    """A CUDA scorer (the engine's ``Scorer`` protocol) that sums each collected batch's
    device span in :attr:`busy_s`; the rest is the wrapped scorer's."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer
        self.traits: ScorerTraits = scorer.traits  # the same object: warm-up updates it
        self.busy_s = 0.0
        self.batches = 0

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        return self._scorer.batch_cost(pairs)

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        return self._scorer.prepare(pairs)

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        return self._scorer.calibrate(logits)

    def warmup(self, encoder: PromptEncoder) -> None:
        self._scorer.warmup(encoder)

    def release_cached_memory(self) -> None:
        self._scorer.release_cached_memory()

    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        return self.collect(self.launch(self.prepare(pairs)))

    def reset(self) -> None:
        """Forget the batches timed so far (call when nothing is in flight)."""
        self.busy_s = 0.0
        self.batches = 0

    def launch(self, prepared: object) -> _Timed:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        handle = self._scorer.launch(prepared)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return _Timed(handle, start, end)

    def done(self, handle: object) -> bool:
        assert isinstance(handle, _Timed)
        return self._scorer.done(handle.handle)

    def collect(self, handle: object) -> list[float]:
        assert isinstance(handle, _Timed)
        logits = self._scorer.collect(handle.handle)
        handle.end.synchronize()
        self.busy_s += handle.start.elapsed_time(handle.end) / 1000
        self.batches += 1
        return logits
