"""Bi-encoders (BERT-like sentence encoders): cosine similarity of the pooled,
L2-normalized query and document embeddings; each distinct query of a batch is embedded once.

The raw score (``raw_scores``) is the cosine similarity, in [-1, 1]. The contract's score
is in [0, 1], so :meth:`BiEncoderScorer.calibrate` maps it linearly: ``(cos + 1) / 2``
(-1 -> 0, 0 -> 0.5, 1 -> 1). The map is increasing, so the ranking is the cosine's. It is
a similarity, not a probability of relevance: unrelated texts score near 0.5, not near 0."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from consumer.runtime.prompt import BiEncoderIds, EncodedPair
from consumer.runtime.scorer import OneCallScorer, ScorerTraits
from consumer.runtime.tensors import pad_right, to_device


class BiEncoderScorer(OneCallScorer):
    """Bi-encoders: cosine similarity of pooled, L2-normalized query and document embeddings."""

    def __init__(
        self, model: torch.nn.Module, pad_id: int, pooling: str, device: str, dtype: str
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"unsupported pooling {pooling!r}")
        self.traits = ScorerTraits("bi-encoder", device, dtype)
        self.device = device
        self._model = model
        self._pad_id = pad_id
        self._pooling = pooling

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Queries and documents run as one padded batch (each distinct query once)."""
        if not pairs:
            return 0
        texts = self._texts(pairs)[0]
        return max(len(t) for t in texts) * len(texts)

    @staticmethod
    def _texts(pairs: Sequence[EncodedPair]) -> tuple[list[list[int]], list[int]]:
        """Distinct queries then documents, and for each pair the row of its query."""
        payloads: list[BiEncoderIds] = [p.payload for p in pairs]  # type: ignore[misc]
        query_row: dict[tuple[int, ...], int] = {}
        for p in payloads:
            query_row.setdefault(tuple(p.query_ids), len(query_row))
        queries = [list(q) for q in query_row]
        return queries + [p.doc_ids for p in payloads], [
            query_row[tuple(p.query_ids)] for p in payloads
        ]

    @torch.inference_mode()
    def embed(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """(n, dim) L2-normalized embeddings."""
        ids, mask = pad_right(seqs, self._pad_id)
        mask_d = to_device(mask, self.device)
        hidden = self._model(input_ids=to_device(ids, self.device), attention_mask=mask_d)
        hidden = hidden.last_hidden_state.float()
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask_d.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Cosine similarity of each pair's query and document."""
        if not pairs:
            return []
        texts, q_rows = self._texts(pairs)
        emb = self.embed(texts)
        n_queries = len(texts) - len(pairs)
        q = emb[torch.tensor(q_rows, device=emb.device)]
        sims = (q * emb[n_queries:]).sum(-1)
        return [float(x) for x in sims.cpu().tolist()]

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        """Cosine similarity in [-1, 1] -> score in [0, 1]: ``(cos + 1) / 2``, same order.

        Clamped to [0, 1]: float rounding can put the cosine of (nearly) identical texts a
        hair above 1."""
        return [min(1.0, max(0.0, (x + 1.0) / 2.0)) for x in logits]
