"""Qwen3 rerankers: the relevance logit is the last prompt token's hidden state times one
head vector (W_yes - W_no of the LM head, or the seq-cls score row); no vocabulary-wide
logits are ever computed.

Batches are right-padded, or packed into one padding-free stream by
:class:`consumer.runtime.qwen3.forward.PackedQwen3` on CUDA. On CUDA the scorer is
pipelined: :meth:`LastTokenScorer.launch` queues the batch and the copy of its logits to
pinned host memory, and returns at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from consumer.runtime.prompt import EncodedPair, PromptEncoder
from consumer.runtime.scorer import ScorerBase, ScorerTraits, sigmoid
from consumer.runtime.tensors import pad_right, pinned, to_device


def stream_tokens(pairs: Sequence[EncodedPair]) -> int:
    """Tokens of these pairs laid out as one packed stream, at most.

    A pair whose request head (:attr:`EncodedPair.shared_prefix`) or instruction head
    (:attr:`EncodedPair.common_prefix`) matches the pair before it adds only the rest:
    the packed layout computes such a stretch once (it shares more when equal heads are
    not neighbours, so this never counts fewer tokens than the stream has).
    """
    total = 0
    previous: list[int] | None = None
    for pair in pairs:
        ids: list[int] = pair.payload  # type: ignore[assignment]
        shared = 0
        if previous is not None:
            for cut in (pair.shared_prefix, pair.common_prefix):
                if 0 < cut < len(ids) and ids[:cut] == previous[:cut]:
                    shared = cut
                    break
        total += pair.tokens - shared
        previous = ids
    return total


@dataclass
class PaddedInputs:
    """Host tensors of one right-padded batch; ``mask`` is None when nothing is padded."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    last: torch.Tensor


@dataclass
class _Pending:
    """Logits on their way to the host, and the event that marks their arrival."""

    logits: torch.Tensor
    done: Any


class LastTokenScorer(ScorerBase):
    """Qwen3-style rerankers: logit = final hidden state at the last prompt token . head.

    ``head`` is W_yes - W_no of the LM head (causal-lm) or the single row of the seq-cls
    score layer; ``bias`` its bias difference, if any. Pairs are either right-padded
    into one (n, max_len) batch, or, when ``packed`` is given, concatenated into one
    padding-free stream (see :mod:`consumer.runtime.qwen3.forward`).
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
        self.traits = ScorerTraits(
            kind, device, dtype, packed=packed is not None, pipelined=device.startswith("cuda")
        )
        self.device = device
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
            quick = self._packed.graph_tokens()
            self.traits = replace(self.traits, quick_batch_cost=quick)

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        """Tokens of the packed stream (heads shared by neighbours counted once) when
        packed, longest x count when padded."""
        if not pairs:
            return 0
        if self.traits.packed:
            return stream_tokens(pairs)
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
