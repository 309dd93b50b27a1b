"""Runs consumer.qk_rope_kernel in Triton's CPU interpreter and prints what it computed.

Started by tests/unit/test_qk_rope_kernel.py in a child process with
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
from varlen_reference import segment_causal_attention

from consumer import qk_rope_kernel
from consumer.packed_qwen3 import PackedQwen3, _rotate_half, rms_norm

EPS = 1e-6


def torch_norm_rope(
    x: torch.Tensor, heads: int, weight: torch.Tensor, rotary: Any, positions: torch.Tensor
) -> torch.Tensor:
    """The same step as the packed path's torch code (Hugging Face's order of operations)."""
    cos, sin = rotary(x, positions[None])
    cos, sin = cos[0][:, None, :], sin[0][:, None, :]
    q = rms_norm(x.reshape(x.shape[0], heads, -1), weight, EPS)
    return q * cos + _rotate_half(q) * sin


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


def packed_forward_with_and_without_kernel() -> dict[str, float | bool]:
    """A tiny model's packed forward, shared heads and all, through both q/k paths."""
    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**tiny_qwen3_config_dict())).eval()
    head = [5, 6, 7, 8, 9]
    seqs = [[*head, 11, 12, 13], [21, 22], [*head, 14, 15, 16, 17], [*head, 18]]
    prefixes = [5, 0, 5, 5]
    outputs = {}
    for use_kernel in (True, False):
        packed = PackedQwen3(model, "cpu", segment_causal_attention, qk_kernel=use_kernel)
        assert packed.uses_qk_kernel == use_kernel
        outputs[use_kernel] = packed.last_hidden(seqs, prefixes)
    return {
        "max_abs_diff": float((outputs[True] - outputs[False]).abs().max()),
        "max_abs_value": float(outputs[False].abs().max()),
        "rows": outputs[True].shape[0],
    }


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernel runs in Triton's interpreter)")
    print(json.dumps({
        "float32": kernel_against_torch(torch.float32),
        "bfloat16": kernel_against_torch(torch.bfloat16),
        "packed": packed_forward_with_and_without_kernel(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
