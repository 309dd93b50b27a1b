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
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for Linux ship triton
    triton = None

KEY_PIECES = 3  # stream ranges that make up one segment's keys, at most (the kernel reads 3)


@dataclass(frozen=True)
class Tile:
    """How the kernel tiles the work: ``rows`` query rows a program (tokens x grouped
    heads), ``keys`` keys a step, Triton's ``warps`` and pipeline ``stages``; ``tma``:
    keys and values loaded by the tensor memory accelerator (Hopper's bulk copies, through
    Triton's tensor descriptors), one key piece after another, instead of by pointers;
    ``warp_specialize``: Triton's warp specialization of the key loop (loads and math in
    separate warps), where its compiler offers it."""

    rows: int = 64
    keys: int = 32
    warps: int = 4
    stages: int = 3
    tma: bool = False
    warp_specialize: bool = False

    @property
    def name(self) -> str:
        extras = ("/tma" if self.tma else "") + ("/ws" if self.warp_specialize else "")
        return f"{self.rows}/{self.keys}/{self.warps}/{self.stages}{extras}"


# The fastest of benchmarks/attention_kernels.py's tiles (docs/benchmarks.md, "Attention
# kernels"), by query heads per key/value head; other groups take DEFAULT_TILE.
DEFAULT_TILE = Tile()
TILES = {2: Tile()}


def tile_for(group: int) -> Tile:
    """The tile the kernel uses for ``group`` query heads per key/value head."""
    return TILES.get(group, DEFAULT_TILE)


def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel runs here (triton is importable) for this attention shape."""
    return triton is not None and _shape_problem(heads, kv_heads, head_dim) is None


def _shape_problem(
    heads: int, kv_heads: int, head_dim: int, tile: Tile | None = None
) -> str | None:
    if heads % kv_heads:
        return f"{heads} query heads do not group over {kv_heads} key/value heads"
    rows = (tile or tile_for(heads // kv_heads)).rows
    if rows % (heads // kv_heads):
        return f"{heads} query heads do not group over {kv_heads} key/value heads in {rows} rows"
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
    tile: Tile | None = None,
) -> torch.Tensor:
    """Causal (bottom-right) attention per segment: (Tq, heads, dim), like ``q``.

    ``q``: (Tq, heads, dim); ``k``/``v``: (Tk, kv_heads, dim) with the last dimension
    contiguous; ``cu_q``: int32 segment bounds, segment i's queries are rows
    ``cu_q[i]:cu_q[i+1]``; ``key_pieces``: int32 (segments, KEY_PIECES, 2) of (first row,
    length) in ``k``/``v``: a segment's keys are its pieces in order (unused pieces have
    length 0), and its query j sees the keys up to j + (keys - queries). ``tile``: how to
    tile it (default: :func:`tile_for` the query heads per key/value head).
    """
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    problem = _shape_problem(heads, kv_heads, dim, tile)
    if problem:
        raise ValueError(problem)
    if tuple(key_pieces.shape[1:]) != (KEY_PIECES, 2) or not key_pieces.is_contiguous():
        raise ValueError(f"key_pieces must be contiguous (segments, {KEY_PIECES}, 2)")
    group = heads // kv_heads
    tile = tile or tile_for(group)
    tokens_per_tile = tile.rows // group
    out = torch.empty_like(q)
    segments = cu_q.numel() - 1
    if q.shape[0] == 0 or segments == 0:
        return out
    grid = (triton.cdiv(max_q, tokens_per_tile), segments, kv_heads)
    common = dict(
        GROUP=group, TOKENS=tokens_per_tile, KEYS=tile.keys, DIM=dim,
        WARP_SPECIALIZE=tile.warp_specialize, num_warps=tile.warps, num_stages=tile.stages,
    )  # fmt: skip
    log2_scale = scale * math.log2(math.e)
    if tile.tma:
        k_rows, v_rows = _key_descriptor(k, tile.keys), _key_descriptor(v, tile.keys)
        _attention_tile_tma[grid](
            q, k_rows, v_rows, out, cu_q, key_pieces, log2_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), **common,
        )  # fmt: skip
        return out
    _attention_tile[grid](
        q, k, v, out, cu_q, key_pieces, log2_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), **common,
    )  # fmt: skip
    return out


def _key_descriptor(t: torch.Tensor, keys: int) -> object:
    """A tensor descriptor of (Tk, kv_heads, dim) keys or values as a (Tk, kv_heads x dim)
    matrix, read ``keys`` rows x one head at a time (rows past the end read as zeros)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, heads, dim = t.shape
    if t.stride(2) != 1 or t.stride(1) != dim:
        raise ValueError("tensor descriptors need each row's heads side by side")
    return TensorDescriptor(t, [rows, heads * dim], [t.stride(0), 1], [keys, dim])


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
        WARP_SPECIALIZE: tl.constexpr,
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
            for key0 in tl.range(0, end, KEYS, warp_specialize=WARP_SPECIALIZE):
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

    @triton.jit
    def _attention_tile_tma(
        q_ptr,
        k_desc,
        v_desc,
        out_ptr,
        cu_q_ptr,
        pieces_ptr,
        scale_log2,
        q_stride_t,
        q_stride_h,
        o_stride_t,
        o_stride_h,
        GROUP: tl.constexpr,
        TOKENS: tl.constexpr,
        KEYS: tl.constexpr,
        DIM: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
    ):
        """:func:`_attention_tile` with keys and values read through tensor descriptors,
        piece by piece: a step's keys are consecutive rows of one piece (the rows past
        the piece, another segment's, are masked)."""
        tile = tl.program_id(0)
        segment = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + segment)
        q_len = tl.load(cu_q_ptr + segment + 1) - q_start
        first = tile * TOKENS
        if first < q_len:
            pieces = pieces_ptr + segment * 6
            k_len = tl.load(pieces + 1) + tl.load(pieces + 3) + tl.load(pieces + 5)
            shift = k_len - q_len
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
            end = tl.minimum(k_len, first + TOKENS + shift)  # keys the tile's last token sees
            column = kv_head * DIM
            before = 0  # keys of the pieces already read
            for piece in tl.static_range(3):
                start = tl.load(pieces + 2 * piece)
                length = tl.minimum(tl.load(pieces + 2 * piece + 1), end - before)
                for step in tl.range(0, length, KEYS, warp_specialize=WARP_SPECIALIZE):
                    offsets = step + tl.arange(0, KEYS)
                    keys = before + offsets
                    k = k_desc.load([start + step, column])
                    s = tl.dot(q, tl.trans(k)) * scale_log2
                    visible = (keys[None, :] <= token[:, None] + shift) & (offsets < length)[
                        None, :
                    ]
                    s = tl.where(visible, s, float("-inf"))
                    new_best = tl.maximum(best, tl.max(s, axis=1))
                    p = tl.math.exp2(s - new_best[:, None])
                    fade = tl.math.exp2(best - new_best)
                    total = total * fade + tl.sum(p, axis=1)
                    v = v_desc.load([start + step, column])
                    acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v)
                    best = new_best
                before += tl.load(pieces + 2 * piece + 1)
            acc = acc / total[:, None]
            o_rows = (q_start + token).to(tl.int64) * o_stride_t + head * o_stride_h
            tl.store(
                out_ptr + o_rows[:, None] + dims[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None],
            )
