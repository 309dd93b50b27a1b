"""Runs the Triton kernels (qk_rope_kernel and varlen_attention_kernel of
consumer.runtime.qwen3) in Triton's CPU interpreter and prints what they computed.

Started by tests/unit/test_triton_kernels.py in a child process with
``TRITON_INTERPRET=1`` (Triton reads it when a kernel is defined, so it cannot be
switched on inside a test session that already imported the kernel). Prints one JSON
object of measured differences; the test asserts on them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from tiny_models import tiny_qwen3_config_dict
from transformers import Qwen3Config, Qwen3Model
from varlen_reference import piecewise_causal_attention, segment_causal_attention

from consumer.runtime.qwen3 import qk_rope_kernel
from consumer.runtime.qwen3.forward import PackedQwen3
from consumer.runtime.qwen3.layers import rms_norm, rotate_half
from consumer.runtime.qwen3.layout import pack
from consumer.runtime.qwen3.varlen_attention_kernel import grouped_varlen_attention

EPS = 1e-6


def torch_norm_rope(
    x: torch.Tensor, heads: int, weight: torch.Tensor, rotary: Any, positions: torch.Tensor
) -> torch.Tensor:
    """The same step as the packed path's torch code (Hugging Face's order of operations)."""
    cos, sin = rotary(x, positions[None])
    cos, sin = cos[0][:, None, :], sin[0][:, None, :]
    q = rms_norm(x.reshape(x.shape[0], heads, -1), weight, EPS)
    return q * cos + rotate_half(q) * sin


def kernel_against_torch(dtype: torch.dtype) -> dict[str, float | bool]:
    torch.manual_seed(0)
    config = Qwen3Config(**tiny_qwen3_config_dict())
    model = Qwen3Model(config)
    heads, dim = config.num_attention_heads, config.head_dim
    tokens = 41
    fused = torch.randn(tokens, 3 * heads * dim, dtype=dtype)
    x = fused[:, : heads * dim]  # rows with a stride, as a fused projection's output has
    weight = (1 + 0.3 * torch.randn(dim)).to(dtype)
    positions = torch.randint(0, config.max_position_embeddings, (tokens,))
    index = torch.randint(0, tokens, (57,))
    table = qk_rope_kernel.rotary_table(
        model.rotary_emb, config.max_position_embeddings, dtype, "cpu"
    )
    got = qk_rope_kernel.norm_rope(x, heads, weight, table, positions, EPS, index)
    want = torch_norm_rope(x, heads, weight, model.rotary_emb, positions)[index]
    whole = qk_rope_kernel.norm_rope(x, heads, weight, table, positions, EPS)
    want_whole = torch_norm_rope(x, heads, weight, model.rotary_emb, positions)
    gathered = qk_rope_kernel.gather_heads(x, heads, index)
    return {
        "gathered_max_abs_diff": float((got.float() - want.float()).abs().max()),
        "whole_max_abs_diff": float((whole.float() - want_whole.float()).abs().max()),
        "max_abs_value": float(want.float().abs().max()),
        "gather_exact": bool(torch.equal(gathered, x.reshape(tokens, heads, dim)[index])),
    }


def attention_against_reference() -> dict[str, float]:
    """Max |kernel - SDPA stand-in| per case: grouped heads 1, 2 and 4 per key/value head,
    segments longer than a tile, keys in one, two and three pieces (a stretch shared by
    two requests, each request's own head, the segment), and the last layer's one query
    per pair."""
    torch.manual_seed(0)
    common, head_a, head_b = [1] * 21, [7] * 16, [8] * 5
    seqs = [
        [*common, *head_a, *[2] * 150],
        [3] * 9,
        [*common, *head_a, 4, 4, 4],
        [*common, *head_b, *[5] * 70],
        [*common, *head_b, 6],
    ]
    inputs = pack(seqs, [(21, 37), 0, (21, 37), (21, 26), (21, 26)])
    assert int(inputs.key_pieces[:, 2, 1].count_nonzero()) > 0  # three pieces used
    diffs = {}
    for heads, kv_heads in ((2, 2), (4, 2), (8, 2)):
        dim = 32
        tokens = inputs.ids.numel()
        k, v = torch.randn(tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim)
        for name, rows, cu_q, pieces, max_q in (
            ("layer", tokens, inputs.cu_q, inputs.key_pieces, inputs.max_q),
            ("last", len(seqs), inputs.last_cu_q, inputs.last_key_pieces, 1),
        ):
            q = torch.randn(rows, heads, dim)
            args = (q, k, v, cu_q, pieces, max_q, dim**-0.5)
            got, want = grouped_varlen_attention(*args), piecewise_causal_attention(*args)
            diffs[f"{name}_{heads}_over_{kv_heads}"] = float((got - want).abs().max())
    return diffs


def packed_forward_through_the_kernels() -> dict[str, float | int]:
    """A tiny model's packed forward, shared heads and all, with both Triton kernels
    against the torch q/k steps and the SDPA stand-in."""
    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**tiny_qwen3_config_dict())).eval()
    head = [5, 6, 7, 8, 9]
    seqs = [
        [*head, 11, 12, 13],
        [21, 22],
        [*head, 14, 15, 16, 17],
        [*head, 18],
        [5, 6, 7, 30, 31, 32],
        [5, 6, 7, 30, 33],
    ]
    prefixes: list[int | tuple[int, int]] = [(3, 5), 0, (3, 5), (3, 5), (3, 4), (3, 4)]
    kernels = PackedQwen3(
        model, "cpu", qk_kernel=True, piecewise_attention=grouped_varlen_attention
    )
    plain = PackedQwen3(model, "cpu", segment_causal_attention, qk_kernel=False)
    assert kernels.uses_qk_kernel and not plain.uses_qk_kernel
    assert int(plain.prepare(seqs, prefixes).key_pieces[:, 2, 1].count_nonzero()) > 0
    got, want = kernels.last_hidden(seqs, prefixes), plain.last_hidden(seqs, prefixes)
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "max_abs_value": float(want.abs().max()),
        "rows": got.shape[0],
    }


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernel runs in Triton's interpreter)")
    print(json.dumps({
        "float32": kernel_against_torch(torch.float32),
        "bfloat16": kernel_against_torch(torch.bfloat16),
        "attention": attention_against_reference(),
        "packed": packed_forward_through_the_kernels(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
