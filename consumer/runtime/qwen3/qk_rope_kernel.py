"""One Triton kernel for Qwen3's per-head q/k RMSNorm and rotary embedding (and gathering).

In the packed forward these small element-wise steps sat between the q/k/v products
and the attention kernel as compiler-generated kernels plus two ``index_select`` copies
of keys and values, together about a sixth of the GPU time of a batch (kernel profile
in docs/benchmarks.md). This kernel reads each projected row once and writes it once,
already normalized and rotated, optionally gathered by a token index (the last layer's
queries; keys and values for FlashAttention-2, which reads them gathered):

* ``norm_rope(x, ...)``: rows of ``x`` (tokens, heads * head_dim), optionally gathered
  by a token index, RMS-normalized per head, scaled, rotated by each token's position;
* ``gather_heads(x, index)``: the same gather without the math (values).

The arithmetic follows Hugging Face's Qwen3 in order and rounding: normalize in fp32,
round to the model dtype, scale by the norm weight and round, then rotate with cos/sin
already rounded to the model dtype (taken from the model's own rotary module).

Runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the unit tests check it without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for Linux ship triton
    triton = None

ROWS_PER_PROGRAM = 64


def supports(head_dim: int) -> bool:
    """Whether the kernel runs here (triton is importable) for this head size."""
    return triton is not None and head_dim >= 2 and head_dim & (head_dim - 1) == 0


def rotary_table(rotary_emb: Any, positions: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(positions, head_dim) rows of [cos | sin] of the first half of each rotary row.

    Computed by the model's own rotary module, so the values (and their rounding to
    ``dtype``) are the ones the Hugging Face forward uses. Raises ValueError if the
    module's rows are not two equal halves (every rope type Qwen3 ships has them).
    """
    ids = torch.arange(positions, device=device)[None]
    probe = torch.empty(1, dtype=dtype, device=device)
    with torch.no_grad():
        cos, sin = rotary_emb(probe, ids)
    cos, sin = cos[0], sin[0]
    half = cos.shape[-1] // 2
    if not (
        torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
    ):
        raise ValueError("rotary rows are not two equal halves; the fused kernel cannot use them")
    return torch.cat((cos[:, :half], sin[:, :half]), dim=-1).contiguous()


def norm_rope(
    x: torch.Tensor,
    heads: int,
    weight: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """(rows, heads, head_dim): per-head RMSNorm and rotary of ``x`` (tokens, heads*head_dim).

    ``index``: the token of every output row (a gather), else all tokens in order.
    ``positions``: every token's rotary position; ``table``: from :func:`rotary_table`.
    """
    return _launch(x, heads, index, (weight, table, positions, eps))


def gather_heads(x: torch.Tensor, heads: int, index: torch.Tensor) -> torch.Tensor:
    """(len(index), heads, head_dim): rows of ``x`` (tokens, heads*head_dim) by token index."""
    return _launch(x, heads, index, None)


def _launch(
    x: torch.Tensor,
    heads: int,
    index: torch.Tensor | None,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None,
) -> torch.Tensor:
    if x.stride(-1) != 1:
        raise ValueError("rows must be contiguous in their last dimension")
    head_dim = x.shape[-1] // heads
    tokens = x.shape[0] if index is None else index.numel()
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    rows = tokens * heads
    if rows == 0:
        return out
    weight, table, positions, eps = norm if norm is not None else (x, x, x, 0.0)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _norm_rope_rows[grid](
        x, x.stride(0), index if index is not None else x, positions, weight, table, out,
        rows, eps,
        HEADS=heads, HALF=head_dim // 2, BLOCK=ROWS_PER_PROGRAM,
        GATHER=index is not None, NORM_ROPE=norm is not None,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["rows"])
    def _norm_rope_rows(
        src_ptr,
        src_stride,
        index_ptr,
        positions_ptr,
        weight_ptr,
        table_ptr,
        dst_ptr,
        rows,
        eps,
        HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK: tl.constexpr,
        GATHER: tl.constexpr,
        NORM_ROPE: tl.constexpr,
    ):
        # One output row = one (token, head) of HALF * 2 values, handled as two halves
        # because rotary pairs value i with value i + HALF.
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = row < rows
        token = row // HEADS
        head = row % HEADS
        if GATHER:
            token = tl.load(index_ptr + token, mask=in_range, other=0)
        cols = tl.arange(0, HALF)
        mask = in_range[:, None]
        src = src_ptr + token.to(tl.int64)[:, None] * src_stride + head[:, None] * 2 * HALF
        src = src + cols[None, :]
        dst = dst_ptr + row.to(tl.int64)[:, None] * 2 * HALF + cols[None, :]
        first = tl.load(src, mask=mask, other=0.0)
        second = tl.load(src + HALF, mask=mask, other=0.0)
        if NORM_ROPE:
            dtype = dst_ptr.dtype.element_ty
            x1 = first.to(tl.float32)
            x2 = second.to(tl.float32)
            mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
            scale = tl.rsqrt(mean_square + eps)[:, None]
            w1 = tl.load(weight_ptr + cols).to(tl.float32)[None, :]
            w2 = tl.load(weight_ptr + HALF + cols).to(tl.float32)[None, :]
            n1 = ((x1 * scale).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            n2 = ((x2 * scale).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
            position = tl.load(positions_ptr + token, mask=in_range, other=0)
            angles = table_ptr + position.to(tl.int64)[:, None] * 2 * HALF + cols[None, :]
            cos = tl.load(angles, mask=mask, other=0.0).to(tl.float32)
            sin = tl.load(angles + HALF, mask=mask, other=0.0).to(tl.float32)
            first = (n1 * cos - n2 * sin).to(dtype)
            second = (n2 * cos + n1 * sin).to(dtype)
        tl.store(dst, first, mask=mask)
        tl.store(dst + HALF, second, mask=mask)
