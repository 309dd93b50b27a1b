"""The Triton kernels of the packed forward, run on the CPU by Triton's interpreter: q/k
norm + rotary + gather (consumer.runtime.qwen3.qk_rope_kernel) and grouped varlen attention
(consumer.runtime.qwen3.varlen_attention_kernel).

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
    layer's shape and the last one's."""
    diffs = interpreted["attention"]
    assert len(diffs) == 6
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
