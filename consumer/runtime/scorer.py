"""What the engine drives: a scorer turns a batch of encoded pairs into one raw logit each.

A batch goes through four steps, so that the engine can keep the device busy:

* ``prepare(pairs)``: host work only (token tensors, pinned memory); the engine calls it
  on its batch former thread while the device runs the previous batch;
* ``launch(prepared)``: queue the device work and return a handle; for a scorer whose
  :attr:`ScorerTraits.pipelined` is true it returns before the device is done, so the
  engine queues the next batch before it reads this one's results;
* ``done(handle)``: whether the device has finished (never blocks);
* ``collect(handle)``: the raw logits (waits for that batch alone).

:class:`ScorerTraits` says what a scorer can do, instead of the engine probing for
methods. Scorers that compute a batch in one call subclass :class:`OneCallScorer` and
implement :meth:`OneCallScorer.compute_logits`.

This module imports no torch at import time (the engine imports it).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from consumer.runtime.prompt import EncodedPair, PromptEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerTraits:
    """What a scorer is and can do.

    ``kind``: "causal-lm" | "seq-cls" | "bi-encoder" (or a test's own).
    ``packed``: batches cost their real tokens (no padding); the engine then keeps each
    request's pairs together (they share their prompt head) instead of sorting by length.
    ``pipelined``: ``launch`` returns before the device finishes, so a second batch can
    be queued behind it.
    ``quick_batch_cost``: the largest :meth:`Scorer.batch_cost` the scorer issues cheaply
    (replayed from a captured CUDA graph), known once :meth:`Scorer.warmup` has run; 0:
    every size is issued the same way. A batch just above it is issued layer by layer
    from Python, which can take longer than its device work.
    """

    kind: str
    device: str
    dtype: str
    packed: bool = False
    pipelined: bool = False
    quick_batch_cost: int = 0


class Scorer(Protocol):
    """The model as the engine sees it; called from the engine's threads only."""

    traits: ScorerTraits

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Tokens this batch costs on the device (longest x count when padded; when packed,
        the tokens of its stream, each shared prompt head counted once)."""
        ...

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        """Host-side inputs of one batch; safe on any thread, no device work."""
        ...

    def launch(self, prepared: object) -> object:
        """Start the batch on the device; returns a handle for :meth:`collect`."""
        ...

    def done(self, handle: object) -> bool:
        """Whether a launched batch has finished on the device (never blocks)."""
        ...

    def collect(self, handle: object) -> list[float]:
        """The raw logits of a launched batch, in pair order (waits for it)."""
        ...

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        """Logits -> relevance scores (sigmoid for cross-encoders, identity for bi-encoders)."""
        ...

    def warmup(self, encoder: PromptEncoder) -> None:
        """Run a few batch shapes so the first request pays no compile or kernel selection."""
        ...

    def release_cached_memory(self) -> None:
        """Give cached device memory back after an out-of-memory error."""
        ...

    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Raw logits of one batch, start to end (checks, tests, warm-up)."""
        ...


def sigmoid(x: float) -> float:
    """Overflow-free logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def warmup_batches(encoder: PromptEncoder) -> list[list[EncodedPair]]:
    """A few synthetic batches of growing size and length.

    The first has one pair (no padding); the others mix lengths, so a padded model also
    meets its masked variant before the first request does.
    """
    batches = []
    for n_docs, words in ((1, 8), (4, 64), (8, 200), (16, 400)):
        docs = [" ".join(["warmup"] * (words + 5 * i)) for i in range(n_docs)]
        batches.append(encoder.encode("warm up query", docs, None))
    return batches


class ScorerBase:
    """What every scorer shares: one-shot :meth:`score`, warm-up, cache release."""

    traits: ScorerTraits

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        raise NotImplementedError

    def launch(self, prepared: object) -> object:
        raise NotImplementedError

    def collect(self, handle: object) -> list[float]:
        raise NotImplementedError

    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Raw logits of one batch, start to end (tests, checks and warm-up)."""
        return self.collect(self.launch(self.prepare(pairs)))

    def warmup(self, encoder: PromptEncoder) -> None:
        """Run a few batch shapes so the first request pays no compile or kernel selection."""
        started = time.perf_counter()
        for batch in warmup_batches(encoder):
            self.score(batch)
        log.info("scorer warm-up took %.1f s", time.perf_counter() - started)

    def release_cached_memory(self) -> None:
        """Return torch's cached CUDA blocks to the driver (no-op off CUDA)."""
        torch: Any = sys.modules.get("torch")
        if torch is None or not self.traits.device.startswith("cuda"):
            return
        try:
            torch.cuda.empty_cache()
        except Exception:
            log.debug("torch.cuda.empty_cache failed", exc_info=True)


class OneCallScorer(ScorerBase):
    """A scorer that computes a batch in one blocking call (:meth:`compute_logits`).

    Its ``launch`` does all the work, so it is never pipelined.
    """

    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Raw logits, one per pair, in the order given."""
        raise NotImplementedError

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        """The pairs themselves: there is nothing to build ahead."""
        return list(pairs)

    def launch(self, prepared: object) -> object:
        """Computes the logits now."""
        assert isinstance(prepared, list)
        return self.compute_logits(prepared)

    def done(self, handle: object) -> bool:
        """Always: launch already finished the work."""
        return True

    def collect(self, handle: object) -> list[float]:
        """The logits ``launch`` computed."""
        assert isinstance(handle, list)
        return handle
