"""The Triton kernels of the packed forward, run on the CPU by Triton's interpreter: q/k
norm + rotary + gather (consumer.runtime.qwen3.qk_rope_kernel), grouped varlen attention
(consumer.runtime.qwen3.varlen_attention_kernel) and the row kernels between the GEMMs
(consumer.runtime.qwen3.row_kernels, with and without FP8 quantization).

The interpreter executes each kernel's own code (indexing, masks, the order of its
arithmetic), so this checks the kernel itself, not a copy. One difference from a GPU:
the interpreter rounds fp32 to bf16 by truncation, so bf16 results may differ from
torch's round-to-nearest by a unit in the last place; on a GPU, ``python -m
benchmarks.gpu_check`` compares the whole packed path with the model card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consumer.runtime.qwen3 import qk_rope_kernel, varlen_attention_kernel

ROOT = Path(__file__).resolve().parents[2]
BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    assert qk_rope_kernel.triton is not None, "torch's Linux wheels ship triton"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_interpreted.py")],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_float32_matches_the_torch_steps(interpreted: dict[str, Any]) -> None:
    r = interpreted["float32"]
    assert r["max_abs_value"] > 1.0  # the check compares real values
    assert r["whole_max_abs_diff"] < 1e-5
    assert r["gathered_max_abs_diff"] < 1e-5


def test_bfloat16_within_rounding_of_the_torch_steps(interpreted: dict[str, Any]) -> None:
    r = interpreted["bfloat16"]
    # a few units in the last place of the largest values (see the module docstring)
    bound = 4 * BF16_ULP * r["max_abs_value"]
    assert r["whole_max_abs_diff"] <= bound
    assert r["gathered_max_abs_diff"] <= bound


def test_gather_copies_rows_exactly(interpreted: dict[str, Any]) -> None:
    assert interpreted["float32"]["gather_exact"] and interpreted["bfloat16"]["gather_exact"]


def test_attention_matches_per_segment_sdpa(interpreted: dict[str, Any]) -> None:
    """1, 2 and 4 query heads per key/value head, keys in up to three stream pieces; every
    layer's shape and the last one's; keys read by pointers and (Hopper's TMA) through
    tensor descriptors."""
    diffs = interpreted["attention"]
    assert len(diffs) == 18 and sum("/tma" in name for name in diffs) == 12
    assert all(diff < 1e-5 for diff in diffs.values()), diffs


def test_packed_forward_through_the_kernels_matches_the_torch_path(
    interpreted: dict[str, Any],
) -> None:
    """Template + instruction shared across requests, shared heads, a lone pair and the
    pruned last layer, in float32."""
    r = interpreted["packed"]
    assert r["rows"] == 6
    assert r["max_abs_value"] > 0.1
    assert r["max_abs_diff"] < 1e-5


def test_kernels_refuse_shapes_they_cannot_tile() -> None:
    """Such models get FlashAttention-2 and the torch q/k steps instead (no failed start)."""
    assert varlen_attention_kernel.supports(16, 8, 128)  # Qwen3-0.6B
    assert varlen_attention_kernel.supports(32, 8, 128)  # Qwen3-4B and 8B
    assert not varlen_attention_kernel.supports(12, 8, 128)  # heads do not group
    assert not varlen_attention_kernel.supports(16, 8, 96)  # not a power of two
    assert qk_rope_kernel.supports(128) and not qk_rope_kernel.supports(96)


def test_row_kernels_match_the_torch_steps_in_float32(interpreted: dict[str, Any]) -> None:
    """Residual add + RMSNorm, SiLU * up, and the scaled rows of the FP8 quantization."""
    r = interpreted["rows_float32"]
    assert r["add_max_abs"] > 1.0 and r["add_max_abs_diff"] == 0.0
    assert r["norm_max_abs"] > 1.0 and r["norm_max_abs_diff"] < 1e-5
    assert r["silu_max_abs"] > 1.0 and r["silu_max_abs_diff"] < 1e-5
    assert r["scale_max_rel_diff"] < 1e-6  # each row's largest magnitude maps to 448
    assert r["scaled_max_abs"] == 448.0
    # e4m3 keeps 3 mantissa bits: rounding moves a value by at most 1/16 of it
    assert r["dequantized_norm_max_abs_diff"] <= r["norm_max_abs"] / 16
    assert r["dequantized_silu_max_abs_diff"] <= r["silu_max_abs"] / 16


def test_row_kernels_within_rounding_in_bfloat16(interpreted: dict[str, Any]) -> None:
    """A unit in the last place per rounding step (the interpreter truncates; see the
    module docstring): SiLU * up rounds twice."""
    r = interpreted["rows_bfloat16"]
    for step, roundings in (("add", 1), ("norm", 2), ("silu", 2)):
        assert r[f"{step}_max_abs_diff"] <= roundings * BF16_ULP * r[f"{step}_max_abs"], step
    assert r["scale_max_rel_diff"] <= BF16_ULP


def test_a_row_of_zeros_quantizes_to_zeros_without_dividing_by_zero(
    interpreted: dict[str, Any],
) -> None:
    for dtype in ("rows_float32", "rows_bfloat16"):
        r = interpreted[dtype]
        assert 0 < r["zero_row_scale"] <= 1e-12
        assert r["zero_row_max_abs"] == 0.0


def test_fused_layers_compute_the_torch_paths_arithmetic(interpreted: dict[str, Any]) -> None:
    """In float32 the fused row kernels are the torch path's arithmetic; with FP8 linear
    layers the forward is the torch path with every GEMM's input and weight rounded to
    e4m3 (row-wise and per-channel scales), and visibly not the unrounded one."""
    r = interpreted["fused"]
    assert r["max_abs_value"] > 0.1
    assert r["kernels_max_abs_diff"] < 1e-5
    for path in ("fp8", "fp8-normed"):
        assert r[f"{path}_vs_emulated_max_abs_diff"] < 1e-4, path
        assert r[f"{path}_max_abs_diff"] > 1e-3, path  # the rounding happened
    # fewer GEMMs rounded, less drift (here: on a random tiny model)
    assert r["fp8-normed_max_abs_diff"] < r["fp8_max_abs_diff"]
    assert r["weight_max_rel_err"] <= 1 / 16


def test_fp8_keeps_the_last_layers_it_is_told_to_in_bf16(interpreted: dict[str, Any]) -> None:
    """``bf16_last_layers``: the FP8 forward is the emulation with those layers'
    GEMMs unrounded (and not the one rounding every layer); with every layer kept, it is
    the bf16 kernels path."""
    r = interpreted["fused"]
    assert r["fp8_last1_vs_emulated_max_abs_diff"] < 1e-4
    assert r["fp8_last1_vs_all_fp8_max_abs_diff"] > 1e-3
    assert r["fp8_last_all_max_abs_diff"] < 1e-5
