"""CUDA graphs of the packed forward for small batches.

A lone request (8 documents, ~3,000 tokens) costs the GPU a few milliseconds, but
issuing its forward from Python (28 layers, two compiled regions and an attention call
each) costs several times that: the idle engine's latency was the CPU's, not the GPU's.
Replaying a captured CUDA graph issues the whole forward at once.

A graph has fixed shapes, so batches are laid out into *buckets*: a bucket of ``T``
tokens holds any batch of at most ``T`` stream tokens, ``T // 64 + 8`` segments,
``2 T`` gathered keys and segments of at most 512 (or, in a second bucket of the same
size, 1,024) tokens. Unused tokens are left outside every segment and unused segments
are empty, so attention never touches them; their rows compute garbage that no real row
ever reads (every other operation works row by row). Batches that fit no bucket run
without a graph.

Graphs are captured once, largest first, sharing one memory pool, on the thread that
replays them (the engine's inference thread, during its warm-up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from consumer.runtime.qwen3.layout import PackedInputs

log = logging.getLogger(__name__)

# 256-token steps up to 4,096 (a lone request's size), then 512: a batch pays at most
# one step of unused tokens
DEFAULT_TOKENS = (*range(512, 4096 + 1, 256), *range(4608, 8192 + 1, 512))
# Longest segment a bucket takes, and how many tokens it counts per segment: together they
# size FlashAttention's grid (blocks of 128 query rows x segments x heads). Blocks of
# unused segments exit at once but are not free, so a bucket is no wider than needed.
DEFAULT_SEGMENT_LENGTHS = (512, 1024)
DEFAULT_TOKENS_PER_SEGMENT = 64

# PackedInputs on the device -> (len(last), hidden)
Forward = Callable[[PackedInputs], torch.Tensor]


@dataclass(frozen=True, order=True)
class Bucket:
    """The fixed shapes of one graph: stream tokens, longest segment, segment slots."""

    tokens: int
    max_segment: int
    segments: int

    @property
    def keys(self) -> int:
        return 2 * self.tokens

    def fits(self, inputs: PackedInputs) -> bool:
        return (
            inputs.ids.numel() <= self.tokens
            and inputs.cu_q.numel() - 1 <= self.segments
            and key_count(inputs) <= self.keys
            and inputs.max_q <= self.max_segment
            and inputs.max_k <= 2 * self.max_segment
        )


def make_buckets(
    token_sizes: Sequence[int] = DEFAULT_TOKENS,
    segment_lengths: Sequence[int] = DEFAULT_SEGMENT_LENGTHS,
    tokens_per_segment: int = DEFAULT_TOKENS_PER_SEGMENT,
) -> list[Bucket]:
    """One bucket per (token size, longest segment), smallest first."""
    shapes = {
        Bucket(t, min(t, length), t // tokens_per_segment + 8)
        for t in token_sizes
        for length in segment_lengths
    }
    return sorted(shapes)


def key_count(inputs: PackedInputs) -> int:
    return inputs.ids.numel() if inputs.kv_index is None else inputs.kv_index.numel()


@dataclass
class BucketInputs:
    """A batch laid out in a bucket's shapes (host tensors, pinned on CUDA); ``count``
    pairs are real, the other ``last`` slots are unused."""

    bucket: Bucket
    inputs: PackedInputs
    count: int


def _padded(t: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    return torch.cat((t, torch.full((size - t.numel(),), fill, dtype=t.dtype)))


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat((t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))))


def lay_out(inputs: PackedInputs, bucket: Bucket) -> BucketInputs:
    """``inputs`` in ``bucket``'s shapes: trailing tokens, segments and pair slots unused."""
    tokens = inputs.ids.numel()
    count = inputs.last.numel()
    stream = torch.arange(tokens)
    kv_index = inputs.kv_index if inputs.kv_index is not None else stream
    last_kv_index = inputs.last_kv_index if inputs.last_kv_index is not None else stream
    bounds = bucket.segments + 1
    laid = PackedInputs(
        ids=_padded(inputs.ids, bucket.tokens, 0),
        positions=_padded(inputs.positions, bucket.tokens, 0),
        cu_q=_padded(inputs.cu_q, bounds, int(inputs.cu_q[-1])),  # empty segments
        cu_k=_padded(inputs.cu_k, bounds, int(inputs.cu_k[-1])),
        kv_index=_padded(kv_index, bucket.keys, 0),
        last=_padded(inputs.last, bucket.segments, 0),
        last_cu_q=_padded(inputs.last_cu_q, bounds, count),
        last_cu_k=_padded(inputs.last_cu_k, bounds, int(inputs.last_cu_k[-1])),
        last_kv_index=_padded(last_kv_index, bucket.keys, 0),
        key_pieces=_padded_rows(inputs.key_pieces, bucket.segments),  # empty pieces
        last_key_pieces=_padded_rows(inputs.last_key_pieces, bucket.segments),
        max_q=bucket.max_segment,
        max_k=2 * bucket.max_segment,  # a key segment is a head plus a tail
    )
    return BucketInputs(bucket, laid, count)


class _Graph:
    """One captured forward and the static tensors it reads and writes."""

    def __init__(self, bucket: Bucket, forward: Forward, device: str, pool: Any) -> None:
        self.bucket = bucket
        self.inputs = lay_out(_sample(bucket), bucket).inputs.with_tensors(lambda t: t.to(device))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune for these shapes first
            for _ in range(2):
                forward(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(self.inputs)

    def replay(self, batch: BucketInputs) -> torch.Tensor:
        for static, host in zip(self.inputs.tensors(), batch.inputs.tensors(), strict=True):
            assert static is not None and host is not None
            static.copy_(host, non_blocking=True)
        self.graph.replay()
        # the output lives in the shared pool: copy it before another graph runs
        return self.output[: batch.count].clone()


def _sample(bucket: Bucket) -> PackedInputs:
    """A batch that fills ``bucket``: segments of the longest allowed length."""
    from consumer.runtime.qwen3.layout import pack

    length = bucket.max_segment
    seqs = [[1] * length for _ in range(bucket.tokens // length)]
    return pack(seqs)


class PackedGraphs:
    """Captured forwards per bucket; picks a bucket for a batch and replays it."""

    def __init__(self, buckets: Sequence[Bucket] | None = None) -> None:
        self.buckets = sorted(buckets) if buckets is not None else make_buckets()
        self._graphs: dict[Bucket, _Graph] = {}

    def capture(self, forward: Forward, device: str) -> None:
        """Capture every bucket (call on the thread that will replay them)."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for bucket in reversed(self.buckets):
            graphs[bucket] = _Graph(bucket, forward, device, pool)
        torch.cuda.synchronize()
        self._graphs = graphs
        log.info(
            "captured CUDA graphs for batches up to %d tokens (%d buckets) in %.1f s",
            max(b.tokens for b in graphs),
            len(graphs),
            time.perf_counter() - t0,
        )

    @property
    def max_tokens(self) -> int:
        """Stream tokens of the largest captured bucket; 0 before :meth:`capture`."""
        return max((bucket.tokens for bucket in self._graphs), default=0)

    def fit(self, inputs: PackedInputs) -> BucketInputs | None:
        """The batch in the smallest bucket that holds it, or None (run it without a graph)."""
        if not self._graphs:
            return None
        for bucket in self.buckets:
            if bucket.fits(inputs):
                return lay_out(inputs, bucket)
        return None

    def replay(self, batch: BucketInputs) -> torch.Tensor:
        """(count, hidden) final-normed hidden states at each pair's last token."""
        return self._graphs[batch.bucket].replay(batch)
