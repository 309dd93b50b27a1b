"""The layout of one packed batch: pairs concatenated into one stream, shared
prefixes once (a prefix tree cut at each pair's share points), each pair as its tail.

Pure host work (torch CPU tensors, no device): :func:`pack` runs on the engine's batch
former thread while the GPU runs the previous batch. The tensors are built with numpy
and wrapped, not copied: a lone request's batch is packed by a thread that has just
woken on a cold core, where each torch call costs several times what numpy's does.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from consumer.runtime.qwen3.varlen_attention_kernel import KEY_PIECES


@dataclass
class PackedInputs:
    """Tensors of one packed batch (host tensors until :meth:`moved`).

    ``ids``/``positions``: the stream. ``cu_q``/``cu_k``: int32 segment bounds of the
    queries (the stream) and of the keys (``kv_index`` gathers them from the stream;
    None when no pair shares a head, then keys are the stream itself). ``last``: the
    stream index of every pair's last token, in the batch's pair order.

    The last layer only computes what the score needs, each pair's last token: its
    queries are the ``last`` rows (``last_cu_q``: one per pair) and its keys are each
    pair's head and tail, gathered by ``last_kv_index`` (None: the stream, in pair
    order) with bounds ``last_cu_k``.

    ``key_pieces``/``last_key_pieces``: the same keys without gathering, for attention
    that reads the stream directly: int32 (segments or pairs, KEY_PIECES, 2) of (stream
    start, length), unused pieces of length 0.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_index: torch.Tensor | None
    last: torch.Tensor
    last_cu_q: torch.Tensor
    last_cu_k: torch.Tensor
    last_kv_index: torch.Tensor | None
    key_pieces: torch.Tensor
    last_key_pieces: torch.Tensor
    max_q: int
    max_k: int
    # the same batch in a captured graph's shapes (consumer.runtime.qwen3.graphs), if one fits
    graph_inputs: Any = None

    TENSORS = (
        "ids", "positions", "cu_q", "cu_k", "kv_index",
        "last", "last_cu_q", "last_cu_k", "last_kv_index", "key_pieces", "last_key_pieces",
    )  # fmt: skip

    @property
    def shared(self) -> bool:
        """Whether some pairs share a head (keys are gathered)."""
        return self.kv_index is not None

    def tensors(self) -> list[torch.Tensor | None]:
        """The tensor fields, in :attr:`TENSORS` order."""
        return [getattr(self, name) for name in self.TENSORS]

    def with_tensors(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> PackedInputs:
        """A copy with ``convert`` applied to every tensor (pinning, moving)."""
        changed: dict[str, Any] = {
            name: convert(t)
            for name, t in zip(self.TENSORS, self.tensors(), strict=True)
            if t is not None
        }
        return dataclasses.replace(self, **changed)

    def moved(self, device: str) -> PackedInputs:
        """The tensors on ``device`` (asynchronous from pinned memory)."""
        return self.with_tensors(lambda t: t.to(device, non_blocking=True))


def _concat_ranges(starts: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    lens = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lens)
    total = int(ends[-1]) if len(ends) else 0
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lens), lens)
    return torch.from_numpy(np.arange(total, dtype=np.int64) + shift)


def _long_tensor(values: Iterable[int], count: int) -> torch.Tensor:
    """int64 tensor of ``count`` ints; a saturated batch has ~80,000 ids, which
    ``torch.tensor`` of a list converts about 4x slower than numpy's ``fromiter``."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=count))


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.fromiter(itertools.accumulate(lengths, initial=0), np.int32))


Prefix = int | Sequence[int]


def _cut_points(prefix: Prefix) -> list[int]:
    """The increasing positive cut points of one pair's ``prefixes`` entry."""
    points = sorted({p for p in ([prefix] if isinstance(prefix, int) else prefix) if p > 0})
    if len(points) > KEY_PIECES - 1:
        raise ValueError(f"at most {KEY_PIECES - 1} cut points a pair, not {len(points)}")
    return points


class _Stream:
    """Builds the packed stream segment by segment, with every segment's key pieces."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.q_lengths: list[int] = []
        self.q_first_position: list[int] = []
        # each segment's keys: (stream start, length) pieces, its ancestors' and its own
        self.segment_keys: list[list[tuple[int, int]]] = []
        self.offset = 0

    def segment(
        self, tokens: list[int], position: int, ancestors: list[tuple[int, int]]
    ) -> tuple[int, int]:
        """Append a segment whose keys are ``ancestors`` plus itself; its own piece."""
        piece = (self.offset, len(tokens))
        self.chunks.append(tokens)
        self.q_lengths.append(len(tokens))
        self.q_first_position.append(position)
        self.segment_keys.append([*ancestors, piece])
        self.offset += len(tokens)
        return piece


def pack(seqs: Sequence[list[int]], prefixes: Sequence[Prefix] | None = None) -> PackedInputs:
    """Lay a batch out as one stream.

    ``prefixes[i]``: where pair i's ids may be shared with other pairs, as one length or
    increasing cut points (e.g. (template + instruction, + query)); 0: nothing. Pairs whose
    ids agree up to a cut point share that stretch: it is in the stream once, and the
    pairs' later tokens attend to it. A shared stretch always leaves every pair at least
    one token of its own.
    """
    if any(not seq for seq in seqs):
        raise ValueError("every sequence needs at least one token")
    cuts = [_cut_points(p) for p in (prefixes if prefixes is not None else [0] * len(seqs))]
    stream = _Stream()
    pair_keys: list[list[tuple[int, int]]] = [[] for _ in seqs]
    last = [0] * len(seqs)

    def tails(members: list[int], start: int, ancestors: list[tuple[int, int]]) -> None:
        for index in members:
            own = stream.segment(seqs[index][start:], start, ancestors)
            last[index] = own[0] + own[1] - 1
            pair_keys[index] = [*ancestors, own]

    def place(members: list[int], start: int, ancestors: list[tuple[int, int]]) -> None:
        # members share seq[:start], already in the stream as ``ancestors``
        for cut, group, clipped in _next_groups(seqs, cuts, members, start):
            if cut == start:
                tails(group, start, ancestors)
                continue
            shared = stream.segment(seqs[group[0]][start:cut], start, ancestors)
            # below a clipped stretch only tails: every level then uses up a cut point,
            # so a pair's keys never have more than KEY_PIECES pieces
            (tails if clipped else place)(group, cut, [*ancestors, shared])

    place(list(range(len(seqs))), 0, [])
    k_pieces = list(itertools.chain.from_iterable(stream.segment_keys))
    last_pieces = list(itertools.chain.from_iterable(pair_keys))
    shared = len(k_pieces) > len(stream.q_lengths)
    in_stream_order = last_pieces == k_pieces  # nothing shared, pairs in stream order
    k_lengths = _key_counts(stream.segment_keys)
    return PackedInputs(
        ids=_long_tensor(itertools.chain.from_iterable(stream.chunks), stream.offset),
        positions=_concat_ranges(stream.q_first_position, stream.q_lengths),
        cu_q=_cumulative(stream.q_lengths),
        cu_k=_cumulative(k_lengths),
        kv_index=_concat_pieces(k_pieces) if shared else None,
        last=torch.from_numpy(np.asarray(last, dtype=np.int64)),
        last_cu_q=torch.from_numpy(np.arange(len(seqs) + 1, dtype=np.int32)),
        last_cu_k=_cumulative(_key_counts(pair_keys)),
        last_kv_index=None if in_stream_order else _concat_pieces(last_pieces),
        key_pieces=_pieces_table(stream.segment_keys),
        last_key_pieces=_pieces_table(pair_keys),
        max_q=max(stream.q_lengths),
        max_k=max(k_lengths),
    )


def _key_counts(keys: list[list[tuple[int, int]]]) -> list[int]:
    return [sum(n for _, n in pieces) for pieces in keys]


def _next_groups(
    seqs: Sequence[list[int]], cuts: list[list[int]], members: list[int], start: int
) -> list[tuple[int, list[int], bool]]:
    """Members that share ids from ``start`` to their next cut point, in order of first
    appearance, as (end of the shared stretch, members, clipped); end == start: not shared.

    The stretch is extended through further cut points as long as the whole group still
    agrees (one segment instead of a chain), then clipped so that every member keeps a
    token of its own.
    """
    by_key: dict[tuple[int, ...], list[int]] = {}
    groups: list[tuple[int, list[int]]] = []
    for index in members:
        cut = next((c for c in cuts[index] if c > start), None)
        if cut is None:
            groups.append((start, [index]))
            continue
        group = by_key.get(key := tuple(seqs[index][start:cut]))
        if group is None:
            by_key[key] = group = []
            groups.append((cut, group))
        group.append(index)
    out = []
    for cut, group in groups:
        if len(group) == 1:
            out.append((start, group, False))
            continue
        cut = _extended(seqs, cuts, group, cut)
        room = min(len(seqs[i]) for i in group) - 1
        out.append((max(start, min(cut, room)), group, room < cut))
    return out


def _extended(seqs: Sequence[list[int]], cuts: list[list[int]], group: list[int], cut: int) -> int:
    """The last cut point after ``cut`` up to which every member of ``group`` agrees."""
    while True:
        nexts = {next((c for c in cuts[i] if c > cut), None) for i in group}
        if len(nexts) != 1 or (deeper := nexts.pop()) is None:
            return cut
        if len({tuple(seqs[i][cut:deeper]) for i in group}) != 1:
            return cut
        cut = deeper


def _pieces_table(keys: list[list[tuple[int, int]]]) -> torch.Tensor:
    """int32 (len(keys), KEY_PIECES, 2): each entry's pieces, padded with empty ones."""
    empty = [(0, 0)] * KEY_PIECES
    assert all(len(pieces) <= KEY_PIECES for pieces in keys), "pack keeps this bound"
    flat = [n for pieces in keys for piece in (pieces + empty)[:KEY_PIECES] for n in piece]
    return torch.from_numpy(np.asarray(flat, dtype=np.int32).reshape(len(keys), KEY_PIECES, 2))


def _concat_pieces(pieces: list[tuple[int, int]]) -> torch.Tensor:
    starts, lengths = zip(*pieces, strict=True)
    return _concat_ranges(starts, lengths)


def pinned_inputs(inputs: PackedInputs) -> PackedInputs:
    """Page-locked copies of the tensors (for asynchronous uploads)."""
    return inputs.with_tensors(torch.Tensor.pin_memory)
