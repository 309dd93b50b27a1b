"""Synchronous scorers: a batch of encoded pairs -> one raw logit per pair.

Called only from the engine's single inference thread. Nothing here computes
vocabulary-wide logits: Qwen3 rerankers are scored from the last token's hidden
state times one head vector (W_yes - W_no of the LM head, or the seq-cls score row).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from consumer.prompt import BiEncoderIds, EncodedPair, PromptEncoder, TextPairIds

log = logging.getLogger(__name__)


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


def sigmoid(x: float) -> float:
    """Overflow-free logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) as right-padded int64 CPU tensors."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    return ids, mask.long()


def pinned(t: torch.Tensor, device: str) -> torch.Tensor:
    """Page-locked copy for an asynchronous host-to-GPU copy; unchanged for a CPU device."""
    return t.pin_memory() if device.startswith("cuda") else t


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """Copy to the device (asynchronously when ``t`` is pinned)."""
    return t.to(device, non_blocking=True)


@dataclass
class PaddedInputs:
    """Host tensors of one right-padded batch; ``mask`` is None when nothing is padded."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    last: torch.Tensor


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


class _WarmupMixin:
    """Shared warm-up: score a few batch shapes and log how long it took."""

    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        raise NotImplementedError

    def warmup(self, encoder: PromptEncoder) -> None:
        """Run a few batch shapes so the first request pays no compile or kernel selection."""
        t0 = time.perf_counter()
        for batch in warmup_batches(encoder):
            self.score(batch)
        log.info("scorer warm-up took %.1f s", time.perf_counter() - t0)


@dataclass
class _Pending:
    """Logits on their way to the host, and the event that marks their arrival."""

    logits: torch.Tensor
    done: Any


class LastTokenScorer(_WarmupMixin):
    """Qwen3-style rerankers: logit = final hidden state at the last prompt token . head.

    ``head`` is W_yes - W_no of the LM head (causal-lm) or the single row of the seq-cls
    score layer; ``bias`` its bias difference, if any. Pairs are either right-padded
    into one (n, max_len) batch, or, when ``packed`` is given, concatenated into one
    padding-free stream (see :mod:`consumer.packed_qwen3`).
    """

    def __init__(
        self,
        kind: str,
        base: torch.nn.Module,
        head: torch.Tensor,
        bias: float,
        pad_id: int,
        device: str,
        dtype: str,
        packed: Any | None = None,
        compile_model: bool = False,
    ) -> None:
        self.kind = kind
        self.device = device
        self.dtype = dtype
        self.packed = packed is not None
        self._base = base
        self._head = head.float().to(device)
        self._bias = bias
        self._pad_id = pad_id
        self._packed = packed
        self._forward: Callable[..., Any] = base
        if compile_model:
            if packed is not None:
                packed.compile()
            else:
                self._forward = torch.compile(base, dynamic=True)

    def warmup(self, encoder: PromptEncoder) -> None:
        """Compile and select kernels on a few shapes, then capture the packed path's graphs."""
        super().warmup(encoder)
        if self._packed is not None:
            self._packed.capture_graphs()  # runs every graph's shapes before capturing it

    def padded_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Sum of lengths when packed, longest x count when padded."""
        if not pairs:
            return 0
        if self.packed:
            return sum(p.tokens for p in pairs)
        return max(p.tokens for p in pairs) * len(pairs)

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        """Host-side batch tensors (pinned on CUDA); safe to run off the inference thread."""
        seqs: list[list[int]] = [p.payload for p in pairs]  # type: ignore[misc]
        if not seqs:
            return None
        if self._packed is not None:
            return self._packed.prepare(seqs, [p.share_points for p in pairs])
        ids, mask = pad_right(seqs, self._pad_id)
        lengths = mask.sum(1)
        # equal lengths need no mask, which lets SDPA take its plain causal kernel
        padded = not bool((lengths == ids.shape[1]).all())
        return PaddedInputs(
            pinned(ids, self.device),
            pinned(mask, self.device) if padded else None,
            pinned(lengths - 1, self.device),
        )

    @torch.inference_mode()
    def hidden_prepared(self, prepared: object) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each sequence's last token."""
        if self._packed is not None:
            return self._packed.last_hidden_prepared(prepared)
        assert isinstance(prepared, PaddedInputs)
        dev = self.device
        mask = None if prepared.mask is None else to_device(prepared.mask, dev)
        out = self._forward(
            input_ids=to_device(prepared.ids, dev), attention_mask=mask, use_cache=False
        )
        rows = torch.arange(prepared.ids.shape[0], device=dev)
        return out.last_hidden_state[rows, to_device(prepared.last, dev)]

    def last_hidden(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each sequence's last token."""
        return self.hidden_prepared(self.prepare([EncodedPair(s, len(s), False) for s in seqs]))

    @torch.inference_mode()
    def score_prepared(self, prepared: object) -> list[float]:
        """Raw logits for a batch made by :meth:`prepare`."""
        if prepared is None:
            return []
        logits = self.hidden_prepared(prepared).float() @ self._head + self._bias
        return [float(x) for x in logits.cpu().tolist()]

    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Raw logits (logit_yes - logit_no for Qwen3-Reranker), one per pair."""
        return self.score_prepared(self.prepare(pairs))

    @torch.inference_mode()
    def launch(self, prepared: object) -> object:
        """Queue a prepared batch's device work and the copy of its logits to the host.

        Returns at once (on CUDA); :meth:`collect` waits for this batch alone, so the
        engine can queue the next batch first.
        """
        if prepared is None:
            return _Pending(torch.empty(0), None)
        logits = self.hidden_prepared(prepared).float() @ self._head + self._bias
        if not self.device.startswith("cuda"):
            return _Pending(logits, None)
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        host.copy_(logits, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Pending(host, done)

    def done(self, handle: object) -> bool:
        """Whether a batch queued by :meth:`launch` has finished (never blocks)."""
        assert isinstance(handle, _Pending)
        return handle.done is None or bool(handle.done.query())

    def collect(self, handle: object) -> list[float]:
        """The raw logits of a batch queued by :meth:`launch` (waits for that batch)."""
        assert isinstance(handle, _Pending)
        if handle.done is not None:
            handle.done.synchronize()
        return [float(x) for x in handle.logits.tolist()]

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        """Sigmoid: softmax([logit_no, logit_yes])[yes]."""
        return [sigmoid(x) for x in logits]


class TextPairScorer(_WarmupMixin):
    """Cross-encoders of other families (bge-reranker, ms-marco MiniLM): the one logit."""

    kind = "seq-cls"

    def __init__(
        self, model: torch.nn.Module, pad_id: int, use_type_ids: bool, device: str, dtype: str
    ) -> None:
        self.device = device
        self.dtype = dtype
        self._model = model
        self._pad_id = pad_id
        self._use_type_ids = use_type_ids

    def padded_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Longest x count: these models run padded."""
        return max((p.tokens for p in pairs), default=0) * len(pairs)

    @torch.inference_mode()
    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
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


class BiEncoderScorer(_WarmupMixin):
    """Bi-encoders: cosine similarity of pooled, L2-normalized query and document embeddings."""

    kind = "bi-encoder"

    def __init__(
        self, model: torch.nn.Module, pad_id: int, pooling: str, device: str, dtype: str
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"unsupported pooling {pooling!r}")
        self.device = device
        self.dtype = dtype
        self._model = model
        self._pad_id = pad_id
        self._pooling = pooling

    def padded_cost(self, pairs: Sequence[EncodedPair]) -> int:
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
    def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
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
        """Identity: the cosine similarity is the score."""
        return list(logits)
