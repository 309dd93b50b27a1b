"""A CPU stand-in for FlashAttention's varlen kernel, for tests of the packed forward."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def segment_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    """CPU stand-in for flash varlen: per segment, query i sees keys up to i + (Lk - Lq)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.empty_like(q)
    q_bounds, k_bounds = itertools.pairwise(cu_q.tolist()), itertools.pairwise(cu_k.tolist())
    segments = zip(q_bounds, k_bounds, strict=True)
    for (q0, q1), (k0, k1) in segments:
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        rows = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        visible = torch.arange(k1 - k0)[None, :] <= rows
        out[q0:q1] = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            k[k0:k1].transpose(0, 1),
            v[k0:k1].transpose(0, 1),
            attn_mask=visible,
            scale=scale,
        ).transpose(0, 1)
    return out


def piecewise_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    key_pieces: torch.Tensor,
    max_q: int,
    scale: float,
) -> torch.Tensor:
    """CPU stand-in for the piecewise contract: gather each segment's key pieces, then
    :func:`segment_causal_attention`."""
    rows: list[int] = []
    bounds = [0]
    for pieces in key_pieces.tolist():
        for start, length in pieces:
            rows.extend(range(start, start + length))
        bounds.append(len(rows))
    index = torch.tensor(rows, dtype=torch.long)
    cu_k = torch.tensor(bounds, dtype=torch.int32)
    max_k = max(b - a for a, b in itertools.pairwise(bounds))
    return segment_causal_attention(q, k[index], v[index], cu_q, cu_k, max_q, max_k, scale)
