"""Varlen attention kernels on one packed batch's shapes: FlashAttention-2, the grouped
Triton kernel of ``consumer.varlen_attention_kernel`` (in several tile shapes) and cuDNN.

    PYTHONPATH=. python benchmarks/attention_kernels.py [--tokens 50000] [--cudnn]

Builds the segment layout of a packed batch like the engine's (requests of 8 pairs:
a shared head of 75-100 tokens, tails of 55-495 tokens; and the same pairs without
sharing), random q/k/v with the 0.6B model's heads (16 query, 8 key/value, dim 128),
then times each kernel over 50 calls and prints how far its output is from
FlashAttention's. Triton tiles are named rows/keys/warps/stages. A kernel that fails
prints its error instead. Numbers are for one attention call of one layer; the model
makes 28 per batch.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from functools import partial

import torch

from consumer import varlen_attention_kernel
from consumer.packed_qwen3 import flash_varlen_attention, pack

HEADS, KV_HEADS, DIM = 16, 8, 128


def layout(tokens: int, share: bool, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    seqs: list[list[int]] = []
    prefixes: list[int] = []
    total = 0
    request = 0
    while total < tokens:
        head = [request] * rng.randint(75, 100)
        for _ in range(8):
            seqs.append(head + [0] * rng.randint(55, 495))
            prefixes.append(len(head) if share else 0)
            total += len(seqs[-1])
        request += 1
    return seqs, prefixes


def cudnn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    out = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu_q, cu_k, max_q, max_k, False, 0.0, True, False, scale=scale
    )
    return out[0]


def expanded(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: object) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        return kernel(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), *rest)

    return run


# (query rows, keys per step, warps, pipeline stages) of the Triton kernel
TRITON_TILES = ((64, 32, 4, 2), (64, 32, 2, 2), (64, 32, 4, 3), (64, 16, 4, 2),
                (32, 32, 2, 2), (128, 32, 4, 2), (128, 64, 4, 2))  # fmt: skip


def triton_tile(rows: int, keys: int, warps: int, stages: int) -> Callable[..., torch.Tensor]:
    """The grouped Triton kernel with its tile constants set for this call."""
    module = varlen_attention_kernel

    def run(*args: object) -> torch.Tensor:
        saved = (module.ROWS, module.KEYS_PER_STEP, module.NUM_WARPS, module.NUM_STAGES)
        module.ROWS, module.KEYS_PER_STEP, module.NUM_WARPS, module.NUM_STAGES = (
            rows, keys, warps, stages,
        )  # fmt: skip
        try:
            return module.grouped_varlen_attention(*args)  # type: ignore[arg-type]
        finally:
            module.ROWS, module.KEYS_PER_STEP, module.NUM_WARPS, module.NUM_STAGES = saved

    return run


def time_ms(fn: Callable[[], torch.Tensor], calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=50000)
    parser.add_argument("--cudnn", action="store_true", help="also time cuDNN (slow)")
    args = parser.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cudnn": torch.backends.cudnn.version()}))  # fmt: skip
    kernels = {"flash": flash_varlen_attention}
    for tile in TRITON_TILES:
        kernels["triton_" + "/".join(map(str, tile))] = triton_tile(*tile)
    if args.cudnn:
        kernels.update(cudnn=cudnn_attention, cudnn_expanded_gqa=expanded(cudnn_attention))
    for share in (False, True):
        seqs, prefixes = layout(args.tokens, share)
        inputs = pack(seqs, prefixes)
        t, tk = inputs.ids.numel(), inputs.kv_index.numel() if inputs.kv_index is not None else 0
        tk = tk or t
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(t, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(tk, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(tk, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        cu_q, cu_k = inputs.cu_q.cuda(), inputs.cu_k.cuda()
        call = (q, k, v, cu_q, cu_k, inputs.max_q, inputs.max_k, DIM**-0.5)
        baseline = flash_varlen_attention(*call)
        for name, kernel in kernels.items():
            segments = inputs.cu_q.numel() - 1
            row: dict[str, object] = {"kernel": name, "shared_heads": share}
            row.update(q_tokens=t, k_tokens=tk, segments=segments)
            try:
                out = kernel(*call)
                row["max_abs_diff_vs_flash"] = round(float((out - baseline).abs().max()), 5)
                row["ms_per_call"] = round(time_ms(partial(kernel, *call)), 3)
            except Exception as exc:  # report and go on: this is a probe
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
