"""Padding-free (packed) forward of a Hugging Face Qwen3 base model, for CUDA.

All pairs of a batch are concatenated into one (T, hidden) stream; rotary positions
restart at every pair and ``torch.nn.attention.varlen.varlen_attn`` keeps attention
causal inside each pair (``window_size=(-1, 0)``). It reuses the model's own modules
(norms, projections, MLP, rotary embedding), so it computes what the padded HF
forward computes, without the padding. Needs torch with ``varlen_attn`` (2.11+).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# (q, k, v, cu_seqlens, max_len, scale) -> (T, heads, head_dim)
VarlenAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor
]


def varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn``."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def causal_varlen_attention() -> VarlenAttention:
    """Causal varlen attention on torch's kernel, with grouped-query heads expanded if needed."""
    from torch.nn.attention.varlen import varlen_attn

    native_gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters

    def attend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
        scale: float,
    ) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if native_gqa:
            extra["enable_gqa"] = True
        elif k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = varlen_attn(
            q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), **extra
        )
        return out[0] if isinstance(out, tuple) else out

    return attend


def supports_packing(base: torch.nn.Module) -> bool:
    """True for a Qwen3 base model without sliding-window layers (which this path does not do)."""
    config = getattr(base, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    return getattr(config, "model_type", None) == "qwen3" and "sliding_attention" not in layer_types


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class PackedInputs:
    """Host tensors of one packed batch: flat ids, per-sequence positions, int32
    cu_seqlens, the index of every sequence's last token, the longest length, and the
    number of sequences (``last`` may hold more rows than that, see ``prepare``)."""

    ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    last: torch.Tensor
    max_len: int
    count: int


class PackedQwen3:
    """Runs a Qwen3 base model (``Qwen3Model``) on packed sequences."""

    def __init__(self, base: Any, device: str, attention: VarlenAttention | None = None) -> None:
        self.base = base
        self.device = device
        self.attention = attention or causal_varlen_attention()
        self._run: Callable[..., torch.Tensor] = self.forward_packed
        # per layer: (q|k|v weight, their output sizes, gate|up weight); see fuse_projections
        self._fused: list[tuple[torch.Tensor, list[int], torch.Tensor]] | None = None

    def fuse_projections(self) -> None:
        """Run q/k/v as one matrix product and gate/up as another (an experiment).

        Fewer, larger products and one read of the normed input instead of three. The
        weights are concatenated copies (about 0.8 GB more for the 0.6B model). Not on by
        default: its speed on the GPU is not measured yet (``benchmarks/forward_only.py
        --fuse-projections``). Call before :meth:`compile`.
        """
        fused = []
        for layer in self.base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            if any(m.bias is not None for m in (*qkv, mlp.gate_proj, mlp.up_proj)):
                raise ValueError("fused projections expect bias-free q/k/v and gate/up")
            fused.append(
                (
                    torch.cat([m.weight for m in qkv]).detach(),
                    [m.weight.shape[0] for m in qkv],
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                )
            )
        self._fused = fused
        self._run = self.forward_packed

    def compile(self) -> None:
        """Compile the packed forward with dynamic shapes (one graph for every batch)."""
        self._run = torch.compile(self.forward_packed, dynamic=True)

    def prepare(self, seqs: Sequence[list[int]]) -> PackedInputs:
        """Host tensors of one packed batch (pinned on CUDA); no GPU work."""
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        ends = lengths.cumsum(0)
        starts = ends - lengths
        total = int(ends[-1])
        # rotary positions restart at 0 in every sequence
        positions = torch.arange(total) - starts.repeat_interleave(lengths)
        cu = torch.cat((torch.zeros(1, dtype=torch.long), ends)).to(torch.int32)
        flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
        last = ends - 1
        if len(seqs) == 1:
            # torch.compile specializes a dimension of size 1: a one-pair batch would
            # recompile the whole stack (a minute on an H100 host) the first time a
            # one-document request comes. Gathering the last token twice keeps `last`
            # at size >= 2, so one dynamic graph serves every batch size.
            last = last.repeat(2)
        pin = self.device.startswith("cuda")

        def host(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory() if pin else t

        return PackedInputs(
            host(flat),
            host(positions),
            host(cu),
            host(last),
            max_len=int(lengths.max()),
            count=len(seqs),
        )

    @torch.inference_mode()
    def last_hidden_prepared(self, inputs: object) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each sequence's last token."""
        assert isinstance(inputs, PackedInputs)
        ids, positions, cu, last = (
            t.to(self.device, non_blocking=True)
            for t in (inputs.ids, inputs.positions, inputs.cu_seqlens, inputs.last)
        )
        return self._run(ids, positions, cu, inputs.max_len, last)[: inputs.count]

    def last_hidden(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each sequence's last token."""
        return self.last_hidden_prepared(self.prepare(seqs))

    def forward_packed(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder stack over one packed stream; returns normed hidden states at ``last``."""
        base = self.base
        x = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(x, positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # (T, 1, head_dim) broadcasts over heads
        n = ids.shape[0]
        for index, layer in enumerate(base.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(index, layer, h)
            q = attn.q_norm(q.view(n, -1, attn.head_dim))
            k = attn.k_norm(k.view(n, -1, attn.head_dim))
            v = v.view(n, -1, attn.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = self.attention(q, k, v, cu, max_len, attn.scaling)
            x = x + attn.o_proj(o.reshape(n, -1))
            x = x + self._mlp(index, layer, layer.post_attention_layernorm(x))
        return base.norm(x[last])

    def _qkv(
        self, index: int, layer: Any, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        if self._fused is None:
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        weight, sizes, _ = self._fused[index]
        q, k, v = torch.nn.functional.linear(h, weight).split(sizes, dim=-1)
        return q, k, v

    def _mlp(self, index: int, layer: Any, h: torch.Tensor) -> torch.Tensor:
        mlp = layer.mlp
        if self._fused is None:
            return mlp(h)
        gate, up = torch.nn.functional.linear(h, self._fused[index][2]).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)
