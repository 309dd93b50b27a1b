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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from consumer.runtime.qwen3.layout import PackedInputs
from consumer.runtime.qwen3.varlen_attention_kernel import KEY_PIECES

log = logging.getLogger(__name__)

# 256-token steps up to 4,096 (a lone request's size), then 512: a batch pays at most
# one step of unused tokens
DEFAULT_TOKENS = (*range(512, 4096 + 1, 256), *range(4608, 8192 + 1, 512))
DEFAULT_MAX_TOKENS = DEFAULT_TOKENS[-1]
# Past the default sizes, buckets grow in coarser steps: a bigger batch pays a smaller
# share for its unused tokens, and each bucket costs warm-up time.
LARGE_TOKEN_STEP = 1024
SMALLEST_MAX_TOKENS = DEFAULT_TOKENS[0]
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


def token_sizes_up_to(max_tokens: int) -> tuple[int, ...]:
    """The buckets' token sizes for graphs of at most ``max_tokens`` stream tokens: the
    default sizes up to it, then steps of 1,024, and ``max_tokens`` itself."""
    if max_tokens < SMALLEST_MAX_TOKENS:
        raise ValueError(
            f"cuda_graph_max_tokens must be at least {SMALLEST_MAX_TOKENS}, not {max_tokens}"
        )
    sizes = {t for t in DEFAULT_TOKENS if t <= max_tokens}
    sizes.update(range(DEFAULT_MAX_TOKENS + LARGE_TOKEN_STEP, max_tokens + 1, LARGE_TOKEN_STEP))
    sizes.add(max_tokens)
    return tuple(sorted(sizes))


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


@dataclass(frozen=True)
class _Slot:
    """Where one input tensor of a bucket sits in the bucket's byte block."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, block: torch.Tensor) -> torch.Tensor:
        """This slot's tensor, a view of ``block`` (uint8)."""
        return block[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class _BlockLayout:
    """Every input of one bucket in one contiguous block of bytes, so that a batch's
    inputs are one page-locked allocation on the host and one upload to the device."""

    slots: tuple[_Slot, ...]
    nbytes: int

    @staticmethod
    def of(bucket: Bucket) -> _BlockLayout:
        """The layout of ``bucket``'s inputs."""
        slots, offset = [], 0
        for name, (dtype, shape) in _shapes(bucket).items():
            slots.append(_Slot(name, dtype, shape, offset))
            offset += -(-slots[-1].nbytes // _ALIGN) * _ALIGN  # rounded up
        return _BlockLayout(tuple(slots), offset)

    def inputs(self, block: torch.Tensor, bucket: Bucket) -> PackedInputs:
        """The inputs as views of ``block``."""
        views = {slot.name: slot.view(block) for slot in self.slots}
        # the bucket's longest segment; a key segment is a head plus a tail
        return PackedInputs(**views, max_q=bucket.max_segment, max_k=2 * bucket.max_segment)


# every slot starts at a multiple of this many bytes, so any dtype may view it
_ALIGN = 16


@dataclass
class BucketInputs:
    """A batch laid out in a bucket's shapes: ``block`` holds every input tensor (host
    bytes, pinned on CUDA); ``count`` pairs are real, the other ``last`` slots are unused."""

    bucket: Bucket
    layout: _BlockLayout
    block: torch.Tensor
    count: int

    @property
    def inputs(self) -> PackedInputs:
        """The tensors, as views of the block (a replay uploads the block instead)."""
        return self.layout.inputs(self.block, self.bucket)


def _shapes(bucket: Bucket) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every input's dtype (as :func:`consumer.runtime.qwen3.layout.pack` makes it) and
    shape in ``bucket``, in :attr:`PackedInputs.TENSORS` order."""
    bounds, pieces = (bucket.segments + 1,), (bucket.segments, KEY_PIECES, 2)
    return {
        "ids": (torch.int64, (bucket.tokens,)),
        "positions": (torch.int64, (bucket.tokens,)),
        "cu_q": (torch.int32, bounds),
        "cu_k": (torch.int32, bounds),
        "kv_index": (torch.int64, (bucket.keys,)),
        "last": (torch.int64, (bucket.segments,)),
        "last_cu_q": (torch.int32, bounds),
        "last_cu_k": (torch.int32, bounds),
        "last_kv_index": (torch.int64, (bucket.keys,)),
        "key_pieces": (torch.int32, pieces),
        "last_key_pieces": (torch.int32, pieces),
    }


def lay_out(
    inputs: PackedInputs, bucket: Bucket, layout: _BlockLayout | None = None, pin: bool = False
) -> BucketInputs:
    """``inputs`` in ``bucket``'s shapes, written into one block of bytes (page-locked when
    ``pin``): trailing tokens, segments and pair slots unused.

    Written with numpy into the block's views: one allocation, no torch call per tensor.
    """
    layout = layout or _BlockLayout.of(bucket)
    block = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
    raw = block.numpy()
    given = {
        name: None if t is None else t.numpy()
        for name, t in zip(PackedInputs.TENSORS, inputs.tensors(), strict=True)
    }
    tokens, count = len(given["ids"]), len(given["last"])  # type: ignore[arg-type]
    stream = np.arange(tokens)  # the keys when nothing is gathered
    fills = {  # segments past the last: empty, so their bounds repeat the last one
        "cu_q": tokens,
        "cu_k": given["cu_k"][-1],  # type: ignore[index]
        "last_cu_q": count,
        "last_cu_k": given["last_cu_k"][-1],  # type: ignore[index]
    }
    for slot in layout.slots:
        value = given[slot.name]
        if value is None:
            value = stream
        view = raw[slot.offset : slot.offset + slot.nbytes].view(_NUMPY[slot.dtype])
        view = view.reshape(slot.shape)
        view[: len(value)] = value
        view[len(value) :] = fills.get(slot.name, 0)  # unused tokens, slots, empty pieces
    return BucketInputs(bucket, layout, block, count)


_NUMPY = {torch.int32: np.int32, torch.int64: np.int64}


class _Graph:
    """One captured forward and the block of device memory its inputs are views of."""

    def __init__(
        self, bucket: Bucket, layout: _BlockLayout, forward: Forward, device: str, pool: Any
    ) -> None:
        self.bucket = bucket
        sample = lay_out(_sample(bucket), bucket, layout)
        self.block = sample.block.to(device)
        self.inputs = layout.inputs(self.block, bucket)
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
        self.block.copy_(batch.block, non_blocking=True)  # every input in one upload
        self.graph.replay()
        # the output lives in the shared pool: copy it before another graph runs
        return self.output[: batch.count].clone()


def _sample(bucket: Bucket) -> PackedInputs:
    """A batch that fills ``bucket``: segments of the longest allowed length."""
    from consumer.runtime.qwen3.layout import pack

    length = bucket.max_segment
    seqs = [[1] * length for _ in range(bucket.tokens // length)]
    return pack(seqs)


def _held_memory(device: str) -> int:
    """GPU memory reserved once the allocator's free cached blocks are given back.

    Capturing a graph empties the cache itself (``torch.cuda.graph``), so plain
    ``memory_reserved`` before and after a capture differ by whatever the warm-up had
    cached, and fell by GiBs at 4B and 8B.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


class PackedGraphs:
    """Captured forwards per bucket; picks a bucket for a batch and replays it."""

    def __init__(self, buckets: Sequence[Bucket] | None = None) -> None:
        self.buckets = sorted(buckets) if buckets is not None else make_buckets()
        self._layouts = {bucket: _BlockLayout.of(bucket) for bucket in self.buckets}
        self._graphs: dict[Bucket, _Graph] = {}

    def capture(self, forward: Forward, device: str) -> None:
        """Capture every bucket (call on the thread that will replay them)."""
        t0, before = time.perf_counter(), _held_memory(device)
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for bucket in reversed(self.buckets):
            graphs[bucket] = _Graph(bucket, self._layouts[bucket], forward, device, pool)
        self._graphs = graphs
        log.info(
            "captured CUDA graphs for batches up to %d tokens (%d buckets) in %.1f s; "
            "they hold %.2f GiB of GPU memory",
            max(b.tokens for b in graphs),
            len(graphs),
            time.perf_counter() - t0,
            (_held_memory(device) - before) / 2**30,
        )

    @property
    def max_tokens(self) -> int:
        """Stream tokens of the largest captured bucket; 0 before :meth:`capture`."""
        return max((bucket.tokens for bucket in self._graphs), default=0)

    def fit(self, inputs: PackedInputs) -> BucketInputs | None:
        """The batch in the smallest bucket that holds it, page-locked for its upload, or
        None (run it without a graph)."""
        if not self._graphs:
            return None
        for bucket in self.buckets:
            if bucket.fits(inputs):
                return lay_out(inputs, bucket, self._layouts[bucket], pin=True)
        return None

    def replay(self, batch: BucketInputs) -> torch.Tensor:
        """(count, hidden) final-normed hidden states at each pair's last token."""
        return self._graphs[batch.bucket].replay(batch)
