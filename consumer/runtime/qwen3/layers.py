"""One Qwen3 decoder layer as plain functions of its weights, so that
``torch.compile`` makes one graph that serves every layer and every token count.

The functions reproduce Hugging Face's Qwen3 rounding order exactly (RMSNorm in fp32,
cast back, then scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm exactly: normalize in fp32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class LayerWeights:
    """One decoder layer's tensors (views of the model's own parameters)."""

    input_norm: torch.Tensor
    qkv: list[torch.Tensor]  # [q, k, v]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: list[torch.Tensor]  # [gate, up]
    down: torch.Tensor


def projections(
    x: torch.Tensor, norm: torch.Tensor, qkv: list[torch.Tensor], eps: float, q_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm and the q/k/v products: (T, q_size), (T, kv_size), (T, kv_size)."""
    h = rms_norm(x, norm, eps)
    q, k, v = (F.linear(h, w) for w in qkv)
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
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
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
    gate, up = (F.linear(h, w) for w in gate_up)
    return x + F.linear(F.silu(gate) * up, down)


def layer_weights(layer: Any) -> LayerWeights:
    """The weights of one Hugging Face ``Qwen3DecoderLayer``, used in place."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv=[attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
        q_norm=attn.q_norm.weight,
        k_norm=attn.k_norm.weight,
        o=attn.o_proj.weight,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=[mlp.gate_proj.weight, mlp.up_proj.weight],
        down=mlp.down_proj.weight,
    )
