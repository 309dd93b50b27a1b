"""Padding-free (packed) forward of a Hugging Face Qwen3 base model, for CUDA.

All pairs of a batch are concatenated into one (T, hidden) stream and run through
the decoder layers once, with a variable-length attention kernel keeping every pair's
attention causal and private. Three savings over the padded forward:

* no padding: a batch costs exactly its real tokens;
* shared prefixes are computed once: the pairs of one request start with the same
  tokens (template, instruction, query), and requests with the same instruction start
  with the same template + instruction. The stream holds each shared stretch once (a
  prefix tree cut at those points) and each pair only as its *tail*. A segment's queries
  attend to its ancestors' keys and values plus its own, causally; its rotary positions
  continue after them. That is the same computation as the full sequences, done once per
  stretch instead of once per pair;
* the last layer runs only at each pair's last token (the only hidden state the score
  reads); its keys and values still come from every token.

Grouped-query attention goes to the kernel as is (8 key/value heads for 16 query
heads), so keys and values are never copied per query head. The attention kernel is
the grouped Triton kernel of :mod:`consumer.varlen_attention_kernel`, which reads each
segment's keys where they are in the stream (``key_pieces``); FlashAttention-2, for
shapes that kernel cannot tile, reads them gathered (``kv_index``). q/k norm + rotary
(+ the gather, for FlashAttention-2) is one Triton kernel (:mod:`consumer.qk_rope_kernel`).

Each decoder layer runs as compiled regions (norm + q/k/v products; output
projection + residual + norm + MLP + residual) around those kernels. One compiled
graph serves all layers and every token count, so compiling takes seconds, not the
minutes a whole-model graph takes. Needs CUDA and bf16/fp16.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from consumer import qk_rope_kernel, varlen_attention_kernel
from consumer.varlen_attention_kernel import KEY_PIECES

log = logging.getLogger(__name__)

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


def supports_packing(base: torch.nn.Module) -> bool:
    """True for a bias-free SiLU Qwen3 base model without sliding-window layers."""
    config = getattr(base, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    return (
        getattr(config, "model_type", None) == "qwen3"
        and "sliding_attention" not in layer_types
        and not getattr(config, "attention_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
    )


# ---- batch layout -----------------------------------------------------------------


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
    # the same batch in a captured graph's shapes (consumer.packed_graphs), if one fits
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


def _concat_ranges(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    lens = torch.tensor(lengths, dtype=torch.long)
    begin = torch.tensor(starts, dtype=torch.long)
    offsets = lens.cumsum(0) - lens
    return torch.arange(int(lens.sum())) + (begin - offsets).repeat_interleave(lens)


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


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
        ids=torch.tensor(list(itertools.chain.from_iterable(stream.chunks)), dtype=torch.long),
        positions=_concat_ranges(stream.q_first_position, stream.q_lengths),
        cu_q=_cumulative(stream.q_lengths),
        cu_k=_cumulative(k_lengths),
        kv_index=_concat_pieces(k_pieces) if shared else None,
        last=torch.tensor(last, dtype=torch.long),
        last_cu_q=torch.arange(len(seqs) + 1, dtype=torch.int32),
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
    return torch.tensor(flat, dtype=torch.int32).view(len(keys), KEY_PIECES, 2)


def _concat_pieces(pieces: list[tuple[int, int]]) -> torch.Tensor:
    starts, lengths = zip(*pieces, strict=True)
    return _concat_ranges(list(starts), list(lengths))


def _pin(inputs: PackedInputs) -> PackedInputs:
    """Page-locked copies of the tensors (for asynchronous uploads)."""
    return inputs.with_tensors(torch.Tensor.pin_memory)


# ---- decoder layer ------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm exactly: normalize in fp32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class LayerWeights:
    """One decoder layer's tensors (views of the model's own parameters)."""

    input_norm: torch.Tensor
    qkv: list[torch.Tensor]  # [q|k|v fused] or [q, k, v]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: list[torch.Tensor]  # [gate|up fused] or [gate, up]
    down: torch.Tensor


def projections(
    x: torch.Tensor, norm: torch.Tensor, qkv: list[torch.Tensor], eps: float, q_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm and the q/k/v products: (T, q_size), (T, kv_size), (T, kv_size)."""
    h = rms_norm(x, norm, eps)
    parts = [F.linear(h, w) for w in qkv]  # one product per weight; a fused one is split
    if len(parts) == 1:
        kv_size = (parts[0].shape[-1] - q_size) // 2
        parts = list(parts[0].split([q_size, kv_size, kv_size], dim=-1))
    q, k, v = parts
    return q, k, v


def attention_inputs(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: torch.Tensor,
    qkv: list[torch.Tensor],
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    eps: float,
    head_dim: int,
    q_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm, q/k/v projections, per-head q/k norms and rotary: (T, heads, dim) each."""
    n = x.shape[0]
    q, k, v = (p.reshape(n, -1, head_dim) for p in projections(x, norm, qkv, eps, q_size))
    q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def attention_output_and_mlp(
    x: torch.Tensor,
    attended: torch.Tensor,
    o: torch.Tensor,
    post_norm: torch.Tensor,
    gate_up: list[torch.Tensor],
    down: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Output projection and residual, then post-attention norm, SiLU MLP and residual."""
    x = x + F.linear(attended.reshape(x.shape[0], -1), o)
    h = rms_norm(x, post_norm, eps)
    parts = [F.linear(h, w) for w in gate_up]
    gate, up = parts if len(parts) == 2 else parts[0].chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down)


def _layer_weights(layer: Any, fuse: bool) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.gate_proj, mlp.up_proj]
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv=_fused(qkv) if fuse else [m.weight for m in qkv],
        q_norm=attn.q_norm.weight,
        k_norm=attn.k_norm.weight,
        o=attn.o_proj.weight,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=_fused(gate_up) if fuse else [m.weight for m in gate_up],
        down=mlp.down_proj.weight,
    )


def _fused(linears: list[torch.nn.Linear]) -> list[torch.Tensor]:
    """One weight for several bias-free linears on the same input.

    The modules' weights become views into it, so the model keeps working and the
    weights are stored once (no extra memory after the copy).
    """
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for module in linears:
        rows = module.weight.shape[0]
        module.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return [fused]


class PackedQwen3:
    """Runs a Qwen3 base model (``Qwen3Model``) on packed sequences.

    Args:
        base: the ``Qwen3Model`` (its weights are used in place).
        device: where it runs.
        attention: a varlen attention on gathered keys (FlashAttention-2's contract);
            tests pass a CPU stand-in.
        piecewise_attention: a varlen attention that reads each segment's keys from
            the stream in pieces (no gathered copies). With neither given: the grouped
            Triton kernel of :mod:`consumer.varlen_attention_kernel` (piecewise) where it
            runs for the model's heads (faster on the short segments of reranking), else
            FlashAttention-2.
        fuse_projections: run q/k/v and gate/up as one matrix product each (measured
            no faster than separate products on an H100, see docs/benchmarks.md).
        graphs: a :class:`consumer.packed_graphs.PackedGraphs` to replay small batches
            from, once :meth:`capture_graphs` has run.
        qk_kernel: q/k norm, rotary and key gathering in one Triton kernel
            (:mod:`consumer.qk_rope_kernel`) instead of compiled torch code and copies.
            None: on when the device is CUDA and the kernel runs for the head size.
    """

    def __init__(
        self,
        base: Any,
        device: str,
        attention: VarlenAttention | None = None,
        fuse_projections: bool = False,
        graphs: Any = None,
        qk_kernel: bool | None = None,
        piecewise_attention: PiecewiseAttention | None = None,
    ) -> None:
        if not supports_packing(base):
            raise ValueError("the packed path needs a bias-free SiLU Qwen3 model")
        self.base = base
        self.device = device
        config = base.config
        self._eps = float(config.rms_norm_eps)
        self._head_dim = int(getattr(config, "head_dim", None) or 0) or (
            config.hidden_size // config.num_attention_heads
        )
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(config.num_key_value_heads)
        if attention is None and piecewise_attention is None:
            attention, piecewise_attention = default_attention(
                self._heads, self._kv_heads, self._head_dim
            )
        if (attention is None) == (piecewise_attention is None):
            raise ValueError("pass either attention or piecewise_attention, not both")
        self.attention = attention
        self.piecewise_attention = piecewise_attention
        self._q_size = self._heads * self._head_dim
        self._scale = float(self._head_dim**-0.5)
        with torch.no_grad():
            self._layers = [_layer_weights(layer, fuse_projections) for layer in base.layers]
        self._projections: Callable[..., Any] = projections
        self._attention_inputs: Callable[..., Any] = attention_inputs
        self._attention_output_and_mlp: Callable[..., torch.Tensor] = attention_output_and_mlp
        self._compiled = False
        self.graphs = graphs
        if qk_kernel is None:
            qk_kernel = device.startswith("cuda") and qk_rope_kernel.supports(self._head_dim)
        # rows of [cos | sin] per position for the kernel; never reallocated, as captured
        # graphs keep its address
        self._rotary_table = (
            qk_rope_kernel.rotary_table(
                base.rotary_emb, int(config.max_position_embeddings), base.dtype, device
            )
            if qk_kernel
            else None
        )

    @property
    def uses_qk_kernel(self) -> bool:
        """Whether q/k norm and rotary run in :mod:`consumer.qk_rope_kernel`."""
        return self._rotary_table is not None

    def compile(self) -> None:
        """Compile the per-layer regions; one graph each serves all layers and sizes."""
        self._projections = torch.compile(projections)
        self._attention_inputs = torch.compile(attention_inputs)
        self._attention_output_and_mlp = torch.compile(attention_output_and_mlp)
        self._compiled = True

    def prepare(
        self, seqs: Sequence[list[int]], prefixes: Sequence[Prefix] | None = None
    ) -> PackedInputs:
        """Host tensors of one packed batch (pinned on CUDA); no GPU work.

        ``prefixes[i]``: where pair i's leading ids may be shared with other pairs (one
        length, or cut points such as :attr:`consumer.prompt.EncodedPair.share_points`;
        0 or None: nothing shared). Pairs with equal leading ids share them.
        """
        inputs = pack(seqs, prefixes)
        table = self._rotary_table
        if table is not None and inputs.max_k > table.shape[0]:
            raise ValueError(
                f"a pair of {inputs.max_k} tokens is longer than the model's "
                f"max_position_embeddings ({table.shape[0]})"
            )
        if self.graphs is not None:
            inputs.graph_inputs = self.graphs.fit(inputs)
        if self.device.startswith("cuda"):
            # only the tensors that will be uploaded: the graph's layout if one fits
            if inputs.graph_inputs is not None:
                inputs.graph_inputs.inputs = _pin(inputs.graph_inputs.inputs)
            else:
                inputs = _pin(inputs)
        return inputs

    def capture_graphs(self) -> None:
        """Capture the small-batch graphs (on the thread that runs the model; after compile).

        If capturing fails (e.g. out of memory on a big model), small batches run without
        graphs: slower for a lone request, otherwise the same. Logged as a warning.
        """
        if self.graphs is None:
            return
        try:
            with torch.inference_mode():
                self.graphs.capture(self.hidden_at, self.device)
        except Exception:
            log.warning("capturing CUDA graphs failed; small batches run without them",
                        exc_info=True)  # fmt: skip
            self.graphs = None
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def last_hidden_prepared(self, inputs: object) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each pair's last token."""
        assert isinstance(inputs, PackedInputs)
        if inputs.graph_inputs is not None and self.graphs is not None:
            return self.graphs.replay(inputs.graph_inputs)
        return self.hidden_at(inputs.moved(self.device))

    def last_hidden(
        self, seqs: Sequence[list[int]], prefixes: Sequence[Prefix] | None = None
    ) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each pair's last token."""
        return self.last_hidden_prepared(self.prepare(seqs, prefixes))

    def hidden_at(self, inputs: PackedInputs) -> torch.Tensor:
        """The decoder stack over one packed stream (tensors on the device): the
        final-normed hidden states at the ``last`` rows, (len(last), hidden).

        Every layer but the last runs on the whole stream; the last one only on each
        pair's last token (its keys and values still come from every token).
        """
        base = self.base
        x = base.embed_tokens(inputs.ids)
        rotary = self._rotary(x, inputs.positions)
        gathered = self.piecewise_attention is None  # else keys are read from the stream
        *layers, final = self._layers
        for w in layers:
            kv_index = inputs.kv_index if gathered else None
            q, k, v = self._attention_inputs_of(x, w, rotary, None, kv_index)
            attended = self._attend(
                q, k, v, inputs.cu_q, inputs.cu_k, inputs.key_pieces, inputs.max_q, inputs.max_k
            )
            x = self._output_and_mlp(x, attended, w)
        kv_index = inputs.last_kv_index if gathered else None
        q, k, v = self._attention_inputs_of(x, final, rotary, inputs.last, kv_index)
        attended = self._attend(
            q, k, v, inputs.last_cu_q, inputs.last_cu_k, inputs.last_key_pieces, 1, inputs.max_k
        )
        return base.norm(self._output_and_mlp(x.index_select(0, inputs.last), attended, final))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        key_pieces: torch.Tensor,
        max_q: int,
        max_k: int,
    ) -> torch.Tensor:
        if self.piecewise_attention is not None:
            return self.piecewise_attention(q, k, v, cu_q, key_pieces, max_q, self._scale)
        assert self.attention is not None
        return self.attention(q, k, v, cu_q, cu_k, max_q, max_k, self._scale)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the q/k step needs for rotary: (positions,) for the kernel, else (cos, sin)."""
        if self.uses_qk_kernel:
            return (positions,)
        cos, sin = self.base.rotary_emb(x, positions[None])
        return cos[0][:, None, :], sin[0][:, None, :]  # (T, 1, head_dim) broadcasts over heads

    def _attention_inputs_of(
        self,
        x: torch.Tensor,
        w: LayerWeights,
        rotary: tuple[torch.Tensor, ...],
        q_rows: torch.Tensor | None,
        kv_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed, rotated (rows, heads, head_dim) q of the ``q_rows`` (None: all) and k, v
        gathered by ``kv_index`` (None: the stream)."""
        self._mark_dynamic(x, *rotary)
        if self._rotary_table is not None:
            return self._kernel_attention_inputs(x, w, rotary[0], q_rows, kv_index)
        cos, sin = rotary
        q, k, v = self._attention_inputs(
            x, cos, sin, w.input_norm, w.qkv, w.q_norm, w.k_norm,
            self._eps, self._head_dim, self._q_size,
        )  # fmt: skip
        if q_rows is not None:
            q = q.index_select(0, q_rows)
        if kv_index is not None:
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        return q, k, v

    def _kernel_attention_inputs(
        self,
        x: torch.Tensor,
        w: LayerWeights,
        positions: torch.Tensor,
        q_rows: torch.Tensor | None,
        kv_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._rotary_table is not None
        q, k, v = self._projections(x, w.input_norm, w.qkv, self._eps, self._q_size)
        table, eps = self._rotary_table, self._eps
        q = qk_rope_kernel.norm_rope(q, self._heads, w.q_norm, table, positions, eps, q_rows)
        k = qk_rope_kernel.norm_rope(k, self._kv_heads, w.k_norm, table, positions, eps, kv_index)
        if kv_index is None:
            v = v.view(v.shape[0], self._kv_heads, self._head_dim)
        else:
            v = qk_rope_kernel.gather_heads(v, self._kv_heads, kv_index)
        return q, k, v

    def _output_and_mlp(
        self, x: torch.Tensor, attended: torch.Tensor, w: LayerWeights
    ) -> torch.Tensor:
        self._mark_dynamic(x, attended)
        return self._attention_output_and_mlp(
            x, attended, w.o, w.post_norm, w.gate_up, w.down, self._eps
        )

    def _mark_dynamic(self, *tensors: torch.Tensor) -> None:
        """The token count varies per batch: compile it as a symbol from the first call."""
        if self._compiled:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
