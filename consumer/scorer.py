"""Synchronous scorers: a batch of encoded pairs -> one raw logit per pair.

Called only from the engine's single inference thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from consumer.prompt import EncodedPair, PromptEncoder


class Scorer(Protocol):
    """What the engine needs from a model."""

    kind: str  # "causal-lm" | "seq-cls" | "bi-encoder"
    device: str
    dtype: str

    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Raw logits, one per pair, in the order given."""
        ...

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        """Logits -> relevance scores (sigmoid for cross-encoders, identity for bi-encoders)."""
        ...

    def padded_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Tokens this batch costs on the device (max_len * n when padded, sum when packed)."""
        ...

    def warmup(self, encoder: PromptEncoder) -> None:
        """Run a few batch shapes so the first request pays no compile or kernel selection."""
        ...
