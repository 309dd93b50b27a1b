"""Varlen attention kernels on one packed batch's shapes: FlashAttention-2, the grouped
Triton kernel of ``consumer.runtime.qwen3.varlen_attention_kernel`` (in several tile
shapes) and cuDNN.

    python -m benchmarks.attention_kernels [--tokens 50000] [--cudnn]

Builds the segment layout of a packed batch like the engine's (requests of 8 pairs: a
template + instruction shared by all requests, each request's query, tails of 55-495
tokens; and the same pairs without sharing), random q/k/v with the 0.6B model's heads
(16 query, 8 key/value, dim 128), then times each kernel over 50 calls and prints how far
its output is from FlashAttention's. The Triton kernel reads keys where they are in the
stream; FlashAttention-2 reads them gathered (the gather is not in its time). Triton
tiles are named rows/keys/warps/stages. A kernel that fails prints its error instead.
Numbers are for one attention call of one layer; the model makes 28 per batch.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from functools import partial

import torch

from consumer.runtime.qwen3 import varlen_attention_kernel
from consumer.runtime.qwen3.attention import flash_varlen_attention
from consumer.runtime.qwen3.layout import Prefix, pack

HEADS, KV_HEADS, DIM = 16, 8, 128


def layout(tokens: int, share: bool, seed: int = 0) -> tuple[list[list[int]], list[Prefix]]:
    """Requests of 8 pairs: a 60-token template + instruction shared by all requests, a
    15-40-token query, then documents of 55-495 tokens."""
    rng = random.Random(seed)
    seqs: list[list[int]] = []
    prefixes: list[Prefix] = []
    total = 0
    request = 0
    while total < tokens:
        head = [-1] * 60 + [request] * rng.randint(15, 40)
        for _ in range(8):
            seqs.append(head + [0] * rng.randint(55, 495))
            prefixes.append((60, len(head)) if share else 0)
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
TRITON_TILES = ((64, 32, 4, 3), (64, 32, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3))


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
    gathered = {"flash": flash_varlen_attention}
    if args.cudnn:
        gathered.update(cudnn=cudnn_attention, cudnn_expanded_gqa=expanded(cudnn_attention))
    piecewise = {"triton_" + "/".join(map(str, tile)): triton_tile(*tile) for tile in TRITON_TILES}
    for share in (False, True):
        seqs, prefixes = layout(args.tokens, share)
        inputs = pack(seqs, prefixes)
        t = inputs.ids.numel()
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(t, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(t, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(t, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        index = inputs.kv_index.cuda() if inputs.kv_index is not None else torch.arange(t).cuda()
        cu_q, cu_k = inputs.cu_q.cuda(), inputs.cu_k.cuda()
        calls = {
            # FlashAttention-2 reads gathered keys (the gather itself is not timed here)
            **{name: partial(kernel, q, k[index], v[index], cu_q, cu_k, inputs.max_q,
                             inputs.max_k, DIM**-0.5) for name, kernel in gathered.items()},
            **{name: partial(kernel, q, k, v, cu_q, inputs.key_pieces.cuda(), inputs.max_q,
                             DIM**-0.5) for name, kernel in piecewise.items()},
        }  # fmt: skip
        baseline = calls["flash"]()
        for name, call in calls.items():
            row: dict[str, object] = {"kernel": name, "shared_heads": share}
            row.update(q_tokens=t, k_tokens=index.numel(), segments=inputs.cu_q.numel() - 1)
            try:
                out = call()
                row["max_abs_diff_vs_flash"] = round(float((out - baseline).abs().max()), 5)
                row["ms_per_call"] = round(time_ms(call), 3)
            except Exception as exc:  # report and go on: this is a probe
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
