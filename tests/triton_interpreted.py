"""Runs the Triton kernels (qk_rope_kernel, varlen_attention_kernel and row_kernels of
consumer.runtime.qwen3) in Triton's CPU interpreter and prints what they computed.

The interpreter's own float-to-FP8 conversion is wrong where rounding carries into the
exponent (124.6 becomes 64, not 128), so here the quantizing kernels write their scaled
values unrounded (``row_kernels.FP8`` is set to float32) and torch rounds them to e4m3,
as a GPU's conversion instruction does; ``benchmarks.gpu_check`` compares the real
conversion on a GPU.

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

from consumer.runtime.qwen3 import qk_rope_kernel, row_kernels
from consumer.runtime.qwen3.forward import PackedQwen3
from consumer.runtime.qwen3.fused_layers import quantize_weight
from consumer.runtime.qwen3.layers import rms_norm, rotate_half
from consumer.runtime.qwen3.layout import pack
from consumer.runtime.qwen3.varlen_attention_kernel import Tile, grouped_varlen_attention

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
            want = piecewise_causal_attention(*args)
            got = grouped_varlen_attention(*args)
            diffs[f"{name}_{heads}_over_{kv_heads}"] = float((got - want).abs().max())
            # keys and values through tensor descriptors, piece by piece; smaller tiles
            # so that steps cross the pieces' ends
            for tile in (Tile(tma=True), Tile(rows=32, keys=16, tma=True)):
                got = grouped_varlen_attention(*args, tile=tile)
                diffs[f"{name}_{heads}_over_{kv_heads}_{tile.name}"] = float(
                    (got - want).abs().max()
                )
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


def row_kernels_against_torch(dtype: torch.dtype) -> dict[str, float]:
    """Residual add + RMSNorm, SiLU * up and row quantization against torch's steps."""
    torch.manual_seed(0)
    width, rows = 96, 7  # width not a power of two: the kernels mask the block's tail
    x = (4 * torch.randn(rows, width)).to(dtype)
    delta = torch.randn(rows, 2 * width).to(dtype)[:, :width]  # rows with a stride
    weight = (1 + 0.3 * torch.randn(width)).to(dtype)
    x[3] = 0  # a row of zeros must not divide by zero
    delta[3] = 0
    total, (normed, none) = row_kernels.add_norm(x, delta, weight, EPS, quantize=False)
    want_total = x + delta
    want_normed = rms_norm(want_total, weight, EPS)
    _, (scaled, scales) = row_kernels.add_norm(x, delta, weight, EPS, quantize=True)
    assert none is None and scales is not None
    gate_up = (3 * torch.randn(rows, 2 * width)).to(dtype)
    product, _ = row_kernels.silu_mul(gate_up, quantize=False)
    want_product = torch.nn.functional.silu(gate_up[:, :width]) * gate_up[:, width:]
    q_product, product_scales = row_kernels.silu_mul(gate_up, quantize=True)
    q_rows, row_scales = row_kernels.quantize_rows(want_product)
    assert product_scales is not None and row_scales is not None
    amax = want_normed.float().abs().amax(dim=1, keepdim=True)
    return {
        "add_max_abs_diff": float((total.float() - want_total.float()).abs().max()),
        "add_max_abs": float(want_total.float().abs().max()),
        "norm_max_abs_diff": float((normed.float() - want_normed.float()).abs().max()),
        "norm_max_abs": float(want_normed.float().abs().max()),
        "silu_max_abs_diff": float((product.float() - want_product.float()).abs().max()),
        "silu_max_abs": float(want_product.float().abs().max()),
        # the scaled rows: the row's largest magnitude maps to 448 (zero rows stay zero)
        "scale_max_rel_diff": float(
            ((scales[amax > 0] * 448 - amax[amax > 0]) / amax[amax > 0]).abs().max()
        ),
        "zero_row_scale": float(scales[3, 0]),
        "zero_row_max_abs": float(scaled[3].abs().max()),
        "scaled_max_abs": float(scaled.abs().max()),
        "dequantized_norm_max_abs_diff": float((scaled * scales - want_normed.float()).abs().max()),
        "dequantized_silu_max_abs_diff": float(
            (q_product * product_scales - want_product.float()).abs().max()
        ),
        "dequantized_rows_max_abs_diff": float(
            (q_rows * row_scales - want_product.float()).abs().max()
        ),
    }


def fp8_rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to e4m3 with one scale per row (its largest magnitude over 448)."""
    scale = (t.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=1e-12)
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def fp8_emulated(
    model: Any, seqs: list[list[int]], prefixes: Any, path: str, bf16_last_layers: int = 0
) -> torch.Tensor:
    """The torch path (consumer.runtime.qwen3.layers) with the linear layers that ``path``
    runs in FP8 computing on inputs and weights rounded as an FP8 GEMM's are, but for
    those of the last ``bf16_last_layers`` layers."""
    import types

    from consumer.runtime.qwen3 import layers

    names = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    if path == "fp8":
        names += ["o_proj", "down_proj"]
    rounded = {
        id(getattr(module, name).weight)
        for layer in model.layers[: len(model.layers) - bf16_last_layers]
        for module in (layer.self_attn, layer.mlp)
        for name in names
        if hasattr(module, name)
    }
    real = layers.F

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in rounded:
            return real.linear(x, weight)
        return fp8_rounded(x.float()) @ fp8_rounded(weight.float()).t()

    plain = PackedQwen3(model, "cpu", segment_causal_attention, qk_kernel=False)
    layers.F = types.SimpleNamespace(linear=linear, silu=real.silu)  # type: ignore[assignment]
    try:
        return plain.last_hidden(seqs, prefixes)
    finally:
        layers.F = real


def fused_forward_against_the_torch_path() -> dict[str, float]:
    """A tiny model's packed forward through the fused row kernels: in float32 (the same
    arithmetic as the torch path), with FP8 linear layers (all, and only those fed by a
    norm) against their torch emulation, and FP8 weights alone."""
    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**tiny_qwen3_config_dict())).eval()
    seqs = [[5, 6, 7, 8, 9, 11, 12], [21, 22], [5, 6, 7, 8, 9, 14, 15, 16], [30]]
    prefixes: list[int | tuple[int, int]] = [5, 0, 5, 0]
    plain = PackedQwen3(model, "cpu", segment_causal_attention, qk_kernel=False)
    want = plain.last_hidden(seqs, prefixes)
    out = {"max_abs_value": float(want.abs().max())}
    # keys read in place by the Triton attention kernel, and gathered for the stand-in
    attentions = {
        "kernels": {"piecewise_attention": grouped_varlen_attention},
        "fp8": {"attention": segment_causal_attention},
        "fp8-normed": {"piecewise_attention": grouped_varlen_attention},
    }
    for path, attention in attentions.items():
        fused = PackedQwen3(model, "cpu", qk_kernel=True, layer_path=path, **attention)
        got = fused.last_hidden(seqs, prefixes)
        out[f"{path}_max_abs_diff"] = float((got - want).abs().max())
        if path != "kernels":
            emulated = fp8_emulated(model, seqs, prefixes, path)
            out[f"{path}_vs_emulated_max_abs_diff"] = float((got - emulated).abs().max())
    # the last layer (of 2) keeps bf16 GEMMs; all of them: the kernels path itself
    last = PackedQwen3(
        model, "cpu", qk_kernel=True, layer_path="fp8", bf16_last_layers=1,
        attention=segment_causal_attention,
    )  # fmt: skip
    got = last.last_hidden(seqs, prefixes)
    out["fp8_last1_vs_emulated_max_abs_diff"] = float(
        (got - fp8_emulated(model, seqs, prefixes, "fp8", bf16_last_layers=1)).abs().max()
    )
    out["fp8_last1_vs_all_fp8_max_abs_diff"] = float(
        (got - fp8_emulated(model, seqs, prefixes, "fp8")).abs().max()
    )
    every = PackedQwen3(
        model, "cpu", qk_kernel=True, layer_path="fp8", bf16_last_layers=2,
        piecewise_attention=grouped_varlen_attention,
    )  # fmt: skip
    out["fp8_last_all_max_abs_diff"] = float((every.last_hidden(seqs, prefixes) - want).abs().max())
    weight = model.layers[0].mlp.down_proj.weight.detach()
    linear = quantize_weight(weight)
    assert linear.scale is not None
    dequantized = linear.weight.float() * linear.scale.t()
    out["weight_max_rel_err"] = float(
        ((dequantized - weight).abs() / weight.abs().amax(dim=1, keepdim=True)).max()
    )
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernel runs in Triton's interpreter)")
    row_kernels.FP8 = torch.float32  # scaled values unrounded (see the module docstring)
    print(json.dumps({
        "float32": kernel_against_torch(torch.float32),
        "bfloat16": kernel_against_torch(torch.bfloat16),
        "attention": attention_against_reference(),
        "packed": packed_forward_through_the_kernels(),
        "rows_float32": row_kernels_against_torch(torch.float32),
        "rows_bfloat16": row_kernels_against_torch(torch.bfloat16),
        "fused": fused_forward_against_the_torch_path(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
