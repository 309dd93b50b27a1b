"""A Triton varlen attention kernel for the packed forward's short segments.

FlashAttention-2 (torch's built-in) handles one query head per thread block in tiles
of 128 queries. The packed batches hold segments of a few hundred tokens (tails of
~280 queries against ~370 keys), so a third of its query tiles is padding, and with
grouped-query attention every key/value tile is loaded once per query head.

This kernel gives each program one key/value head and *all* query heads that share it:
a tile is ``ROWS`` rows = ``ROWS // group`` tokens x ``group`` heads. Key/value tiles are
loaded once for the group, and a tile covers fewer tokens (32 for the 0.6B model's 2
query heads per key/value head), so short segments waste less. Causal masking is
bottom-right aligned per segment, as FlashAttention's (a tail's queries see its whole
head in front of its own keys). Softmax runs in fp32, online, with the probabilities
rounded to the input dtype for the second product, as FlashAttention does.

It also reads a segment's keys where they are in the packed stream, in up to
``KEY_PIECES`` pieces (the template + instruction shared by many requests, the request's
query, the segment itself), so keys and values are never gathered into a copy.

Runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``) for tests.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for Linux ship triton
    triton = None

KEY_PIECES = 3  # stream ranges that make up one segment's keys, at most (the kernel reads 3)
# Tile shape: the fastest of benchmarks/attention_kernels.py's tiles on the 0.6B shape
# (timings in docs/benchmarks.md, "Attention kernels").
ROWS = 64  # query rows per program (tokens x grouped heads)
KEYS_PER_STEP = 32
NUM_WARPS = 4
NUM_STAGES = 3


def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel runs here (triton is importable) for this attention shape."""
    return triton is not None and _shape_problem(heads, kv_heads, head_dim) is None


def _shape_problem(heads: int, kv_heads: int, head_dim: int) -> str | None:
    if heads % kv_heads or ROWS % (heads // kv_heads):
        return f"{heads} query heads do not group over {kv_heads} key/value heads in {ROWS} rows"
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head dim {head_dim} is not a power of two of at least 16"
    return None


def grouped_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    key_pieces: torch.Tensor,
    max_q: int,
    scale: float,
) -> torch.Tensor:
    """Causal (bottom-right) attention per segment: (Tq, heads, dim), like ``q``.

    ``q``: (Tq, heads, dim); ``k``/``v``: (Tk, kv_heads, dim) with the last dimension
    contiguous; ``cu_q``: int32 segment bounds, segment i's queries are rows
    ``cu_q[i]:cu_q[i+1]``; ``key_pieces``: int32 (segments, KEY_PIECES, 2) of (first row,
    length) in ``k``/``v``: a segment's keys are its pieces in order (unused pieces have
    length 0), and its query j sees the keys up to j + (keys - queries).
    """
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    problem = _shape_problem(heads, kv_heads, dim)
    if problem:
        raise ValueError(problem)
    if tuple(key_pieces.shape[1:]) != (KEY_PIECES, 2) or not key_pieces.is_contiguous():
        raise ValueError(f"key_pieces must be contiguous (segments, {KEY_PIECES}, 2)")
    group = heads // kv_heads
    tokens_per_tile = ROWS // group
    out = torch.empty_like(q)
    segments = cu_q.numel() - 1
    if q.shape[0] == 0 or segments == 0:
        return out
    grid = (triton.cdiv(max_q, tokens_per_tile), segments, kv_heads)
    _attention_tile[grid](
        q, k, v, out, cu_q, key_pieces, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=group, TOKENS=tokens_per_tile, KEYS=KEYS_PER_STEP, DIM=dim,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _attention_tile(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        cu_q_ptr,
        pieces_ptr,
        scale_log2,
        q_stride_t,
        q_stride_h,
        k_stride_t,
        k_stride_h,
        v_stride_t,
        v_stride_h,
        o_stride_t,
        o_stride_h,
        GROUP: tl.constexpr,
        TOKENS: tl.constexpr,
        KEYS: tl.constexpr,
        DIM: tl.constexpr,
    ):
        tile = tl.program_id(0)
        segment = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + segment)
        q_len = tl.load(cu_q_ptr + segment + 1) - q_start
        first = tile * TOKENS
        if first < q_len:
            # the keys: up to three stream ranges, back to back
            pieces = pieces_ptr + segment * 6
            start0, len0 = tl.load(pieces), tl.load(pieces + 1)
            start1, len1 = tl.load(pieces + 2), tl.load(pieces + 3)
            start2, len2 = tl.load(pieces + 4), tl.load(pieces + 5)
            end0 = len0
            end1 = len0 + len1
            k_len = end1 + len2
            shift = k_len - q_len  # query i sees keys 0 .. i + shift
            rows = tl.arange(0, GROUP * TOKENS)
            token = first + rows % TOKENS
            head = kv_head * GROUP + rows // TOKENS
            row_ok = token < q_len
            dims = tl.arange(0, DIM)
            q_rows = (q_start + token).to(tl.int64) * q_stride_t + head * q_stride_h
            q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
            best = tl.full([GROUP * TOKENS], float("-inf"), tl.float32)
            total = tl.zeros([GROUP * TOKENS], tl.float32)
            acc = tl.zeros([GROUP * TOKENS, DIM], tl.float32)
            # keys the tile's last token sees (earlier tokens are masked below)
            end = tl.minimum(k_len, first + TOKENS + shift)
            for key0 in range(0, end, KEYS):
                keys = key0 + tl.arange(0, KEYS)
                key_ok = keys < end
                key_rows = tl.where(
                    keys < end0,
                    start0 + keys,
                    tl.where(keys < end1, start1 + keys - end0, start2 + keys - end1),
                ).to(tl.int64)
                k = tl.load(
                    k_ptr + (key_rows * k_stride_t + kv_head * k_stride_h)[:, None] + dims[None, :],
                    mask=key_ok[:, None],
                    other=0.0,
                )
                s = tl.dot(q, tl.trans(k)) * scale_log2
                visible = (keys[None, :] <= token[:, None] + shift) & key_ok[None, :]
                s = tl.where(visible, s, float("-inf"))
                new_best = tl.maximum(best, tl.max(s, axis=1))
                p = tl.math.exp2(s - new_best[:, None])
                fade = tl.math.exp2(best - new_best)
                total = total * fade + tl.sum(p, axis=1)
                v = tl.load(
                    v_ptr + (key_rows * v_stride_t + kv_head * v_stride_h)[:, None] + dims[None, :],
                    mask=key_ok[:, None],
                    other=0.0,
                )
                acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v)
                best = new_best
            acc = acc / total[:, None]
            o_rows = (q_start + token).to(tl.int64) * o_stride_t + head * o_stride_h
            tl.store(
                out_ptr + o_rows[:, None] + dims[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None],
            )
