"""The varlen attention contracts of the packed forward, and FlashAttention-2's.

Two contracts, both causal with the diagonal at the bottom right of each segment:

* gathered (:data:`VarlenAttention`, FlashAttention-2's): keys and values are gathered
  per segment first (``kv_index``), bounds in ``cu_seqlens_k``;
* piecewise (:data:`PiecewiseAttention`): each segment's keys are read where they lie
  in the stream, in up to ``KEY_PIECES`` pieces (no copies); the grouped Triton kernel
  of :mod:`consumer.runtime.qwen3.varlen_attention_kernel` implements it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from consumer.runtime.qwen3 import varlen_attention_kernel

# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, scale) -> (Tq, heads, head_dim)
# Causal with the diagonal at the bottom right when a k segment is longer than its q one.
VarlenAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, float],
    torch.Tensor,
]
# (q, k, v, cu_seqlens_q, key_pieces, max_len_q, scale) -> (Tq, heads, head_dim): the same,
# with each segment's keys read from the stream in pieces (PackedInputs.key_pieces) instead
# of gathered into k and v first.
PiecewiseAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float],
    torch.Tensor,
]


def varlen_available() -> bool:
    """Whether this torch build has the flash attention op the packed path calls."""
    return torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")


def flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    """FlashAttention-2 varlen, causal, grouped-query heads handled by the kernel.

    FlashAttention aligns the causal diagonal to the bottom right of each (q, k)
    segment pair, so a tail's queries see the whole head in front of their keys.
    """
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )
    return out[0]


def default_attention(
    heads: int, kv_heads: int, head_dim: int
) -> tuple[VarlenAttention | None, PiecewiseAttention | None]:
    """(gathered, piecewise): the grouped Triton kernel (piecewise) where it runs for this
    shape, else FlashAttention-2 (gathered)."""
    if varlen_attention_kernel.supports(heads, kv_heads, head_dim):
        return None, varlen_attention_kernel.grouped_varlen_attention
    return flash_varlen_attention, None
