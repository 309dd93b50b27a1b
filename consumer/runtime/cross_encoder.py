"""Cross-encoders of other families (bge-reranker, ms-marco MiniLM): the one logit of
the tokenizer's own (query, document) pair encoding, run padded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from consumer.runtime.prompt import EncodedPair, TextPairIds
from consumer.runtime.scorer import OneCallScorer, ScorerTraits, sigmoid
from consumer.runtime.tensors import pad_right, to_device


class TextPairScorer(OneCallScorer):
    """Cross-encoders of other families (bge-reranker, ms-marco MiniLM): the one logit."""

    def __init__(
        self, model: torch.nn.Module, pad_id: int, use_type_ids: bool, device: str, dtype: str
    ) -> None:
        self.traits = ScorerTraits("seq-cls", device, dtype)
        self.device = device
        self._model = model
        self._pad_id = pad_id
        self._use_type_ids = use_type_ids

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Longest x count: these models run padded."""
        return max((p.tokens for p in pairs), default=0) * len(pairs)

    @torch.inference_mode()
    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """The single classification logit of each pair."""
        if not pairs:
            return []
        payloads: list[TextPairIds] = [p.payload for p in pairs]  # type: ignore[misc]
        ids, mask = pad_right([p.input_ids for p in payloads], self._pad_id)
        inputs = {
            "input_ids": to_device(ids, self.device),
            "attention_mask": to_device(mask, self.device),
        }
        if self._use_type_ids:
            types, _ = pad_right([p.token_type_ids for p in payloads], 0)
            inputs["token_type_ids"] = to_device(types, self.device)
        logits = self._model(**inputs).logits[:, 0]
        return [float(x) for x in logits.float().cpu().tolist()]

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        """Sigmoid of the logit."""
        return [sigmoid(x) for x in logits]
