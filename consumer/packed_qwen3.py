"""Padding-free (packed) forward of a Hugging Face Qwen3 base model, for CUDA.

All pairs of a batch are concatenated into one (T, hidden) stream and run through
the decoder layers once, with FlashAttention's variable-length kernel keeping every
pair's attention causal and private. Two savings over the padded forward:

* no padding: a batch costs exactly its real tokens;
* a shared prefix is computed once: the pairs of one request start with the same
  tokens (template, instruction, query), so the stream holds that *head* once and
  each pair only as its *tail*. A tail's queries attend to the head's keys and values
  (gathered in front of the tail's own) plus its own, causally; its rotary positions
  continue after the head. That is the same computation as the full sequence, done
  once for the head instead of once per pair.

Grouped-query attention goes to the kernel as is (8 key/value heads for 16 query
heads), so keys and values are never copied per query head.

Each decoder layer runs as two compiled regions (norm + q/k/v + q/k norm + rotary;
output projection + residual + norm + MLP + residual) around the attention call.
One compiled graph serves all layers and every token count, so compiling takes
seconds, not the minutes a whole-model graph takes. Needs torch with
``torch.ops.aten._flash_attention_forward`` on CUDA (bf16/fp16).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, scale) -> (Tq, heads, head_dim)
# Causal with the diagonal at the bottom right when a k segment is longer than its q one.
VarlenAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, float],
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
    """Host tensors of one packed batch.

    ``ids``/``positions``: the stream. ``cu_q``/``cu_k``: int32 segment bounds of the
    queries (the stream) and of the keys (``kv_index`` gathers them from the stream;
    None when no pair shares a head, then keys are the stream itself). ``last``: the
    stream index of every pair's last token, in the batch's pair order.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_index: torch.Tensor | None
    last: torch.Tensor
    max_q: int
    max_k: int
    # the same batch in a captured graph's shapes (consumer.packed_graphs), if one fits
    graph_inputs: Any = None

    @property
    def shared(self) -> bool:
        """Whether some pairs share a head (keys are gathered)."""
        return self.kv_index is not None


def _concat_ranges(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    lens = torch.tensor(lengths, dtype=torch.long)
    begin = torch.tensor(starts, dtype=torch.long)
    offsets = lens.cumsum(0) - lens
    return torch.arange(int(lens.sum())) + (begin - offsets).repeat_interleave(lens)


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _groups(seqs: Sequence[list[int]], prefixes: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(shared head length, member indices) per group, in order of first appearance.

    Pairs group when their first ``prefix`` ids are equal; a head always leaves every
    member at least one token of its own. Head length 0 means "not shared".
    """
    by_head: dict[tuple[int, ...], list[int]] = {}
    groups: list[tuple[int, list[int]]] = []
    for index, (seq, prefix) in enumerate(zip(seqs, prefixes, strict=True)):
        if prefix <= 0:
            groups.append((0, [index]))
            continue
        members = by_head.get(key := tuple(seq[:prefix]))
        if members is None:
            by_head[key] = members = []
            groups.append((prefix, members))
        members.append(index)
    out = []
    for prefix, members in groups:
        head = min(prefix, min(len(seqs[i]) for i in members) - 1)
        out.append((head if len(members) > 1 and head > 0 else 0, members))
    return out


def pack(seqs: Sequence[list[int]], prefixes: Sequence[int] | None = None) -> PackedInputs:
    """Lay a batch out as one stream; ``prefixes[i]`` = ids pair i may share (0: none)."""
    prefixes = prefixes if prefixes is not None else [0] * len(seqs)
    chunks: list[list[int]] = []
    q_lengths: list[int] = []
    q_first_position: list[int] = []
    k_piece_starts: list[int] = []
    k_piece_lengths: list[int] = []
    k_lengths: list[int] = []
    last = [0] * len(seqs)
    offset = 0

    def segment(tokens: list[int], position: int, head_start: int, head: int) -> int:
        nonlocal offset
        start = offset
        chunks.append(tokens)
        q_lengths.append(len(tokens))
        q_first_position.append(position)
        if head:
            k_piece_starts.append(head_start)
            k_piece_lengths.append(head)
        k_piece_starts.append(start)
        k_piece_lengths.append(len(tokens))
        k_lengths.append(head + len(tokens))
        offset += len(tokens)
        return offset - 1

    if any(not seq for seq in seqs):
        raise ValueError("every sequence needs at least one token")
    for head, members in _groups(seqs, prefixes):
        head_start = offset
        if head:
            segment(seqs[members[0]][:head], 0, 0, 0)
        for index in members:
            last[index] = segment(seqs[index][head:], head, head_start, head)
    shared = len(k_piece_starts) > len(q_lengths)
    return PackedInputs(
        ids=torch.tensor(list(itertools.chain.from_iterable(chunks)), dtype=torch.long),
        positions=_concat_ranges(q_first_position, q_lengths),
        cu_q=_cumulative(q_lengths),
        cu_k=_cumulative(k_lengths),
        kv_index=_concat_ranges(k_piece_starts, k_piece_lengths) if shared else None,
        last=torch.tensor(last, dtype=torch.long),
        max_q=max(q_lengths),
        max_k=max(k_lengths),
    )


def _pin(inputs: Any) -> None:
    """Page-locked copies of an inputs object's tensors (for asynchronous uploads)."""
    for name in ("ids", "positions", "cu_q", "cu_k", "kv_index", "last"):
        tensor = getattr(inputs, name)
        if tensor is not None:
            setattr(inputs, name, tensor.pin_memory())


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
    h = rms_norm(x, norm, eps)
    parts = [F.linear(h, w) for w in qkv]  # one product per weight; a fused one is split
    if len(parts) == 1:
        kv_size = (parts[0].shape[-1] - q_size) // 2
        parts = list(parts[0].split([q_size, kv_size, kv_size], dim=-1))
    q, k, v = (p.reshape(n, -1, head_dim) for p in parts)
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
        attention: the varlen attention (tests pass a CPU stand-in).
        fuse_projections: run q/k/v and gate/up as one matrix product each (measured
            slower than separate products on an H100, see docs/benchmarks.md).
        graphs: a :class:`consumer.packed_graphs.PackedGraphs` to replay small batches
            from, once :meth:`capture_graphs` has run.
    """

    def __init__(
        self,
        base: Any,
        device: str,
        attention: VarlenAttention | None = None,
        fuse_projections: bool = False,
        graphs: Any = None,
    ) -> None:
        if not supports_packing(base):
            raise ValueError("the packed path needs a bias-free SiLU Qwen3 model")
        self.base = base
        self.device = device
        self.attention = attention or flash_varlen_attention
        config = base.config
        self._eps = float(config.rms_norm_eps)
        self._head_dim = int(getattr(config, "head_dim", None) or 0) or (
            config.hidden_size // config.num_attention_heads
        )
        self._q_size = config.num_attention_heads * self._head_dim
        self._scale = float(self._head_dim**-0.5)
        with torch.no_grad():
            self._layers = [_layer_weights(layer, fuse_projections) for layer in base.layers]
        self._attention_inputs: Callable[..., Any] = attention_inputs
        self._attention_output_and_mlp: Callable[..., torch.Tensor] = attention_output_and_mlp
        self._compiled = False
        self.graphs = graphs

    def compile(self) -> None:
        """Compile the two per-layer regions; one graph each serves all layers and sizes."""
        self._attention_inputs = torch.compile(attention_inputs)
        self._attention_output_and_mlp = torch.compile(attention_output_and_mlp)
        self._compiled = True

    def prepare(
        self, seqs: Sequence[list[int]], prefixes: Sequence[int] | None = None
    ) -> PackedInputs:
        """Host tensors of one packed batch (pinned on CUDA); no GPU work.

        ``prefixes[i]``: how many leading ids pair i shares with the other pairs of its
        request (0 or None: nothing shared). Pairs with equal leading ids share them.
        """
        inputs = pack(seqs, prefixes)
        if self.graphs is not None:
            inputs.graph_inputs = self.graphs.fit(inputs)
        if self.device.startswith("cuda"):
            # only the tensors that will be uploaded: the graph's layout if one fits
            _pin(inputs.graph_inputs if inputs.graph_inputs is not None else inputs)
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

        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        kv_index = None if inputs.kv_index is None else moved(inputs.kv_index)
        return self.hidden_at(
            moved(inputs.ids),
            moved(inputs.positions),
            moved(inputs.cu_q),
            moved(inputs.cu_k),
            kv_index,
            inputs.max_q,
            inputs.max_k,
            moved(inputs.last),
        )

    def hidden_at(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        kv_index: torch.Tensor | None,
        max_q: int,
        max_k: int,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """Final-normed hidden states of the stream at the ``last`` indices."""
        x = self.forward_packed(ids, positions, cu_q, cu_k, kv_index, max_q, max_k)
        return self.base.norm(x[last])

    def last_hidden(
        self, seqs: Sequence[list[int]], prefixes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each pair's last token."""
        return self.last_hidden_prepared(self.prepare(seqs, prefixes))

    def forward_packed(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        kv_index: torch.Tensor | None,
        max_q: int,
        max_k: int,
    ) -> torch.Tensor:
        """The decoder stack over one packed stream: (T, hidden), before the final norm."""
        base = self.base
        x = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(x, positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # (T, 1, head_dim) broadcasts over heads
        for w in self._layers:
            self._mark_dynamic(x, cos, sin)
            q, k, v = self._attention_inputs(
                x, cos, sin, w.input_norm, w.qkv, w.q_norm, w.k_norm,
                self._eps, self._head_dim, self._q_size,
            )  # fmt: skip
            if kv_index is not None:
                k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
            attended = self.attention(q, k, v, cu_q, cu_k, max_q, max_k, self._scale)
            self._mark_dynamic(x, attended)
            x = self._attention_output_and_mlp(
                x, attended, w.o, w.post_norm, w.gate_up, w.down, self._eps
            )
        return x

    def _mark_dynamic(self, *tensors: torch.Tensor) -> None:
        """The token count varies per batch: compile it as a symbol from the first call."""
        if self._compiled:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
