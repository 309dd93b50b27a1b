"""Packed forward alone, variant against variant, in one process on one GPU.

    PYTHONPATH=. python benchmarks/forward_only.py --tokenizer DIR [--pairs 4096]
        [--variants default,no-share,separate-projections,expanded-gqa] [--profile]

Builds the random 0.6B-shaped model and synthetic workload of ``consumer.bench``,
tokenizes everything first, cuts batches in request order by the token budget (as the
engine's batcher does for a packed scorer), then times the packed forward batch after
batch on one thread, for each variant:

* ``default``: what the service runs (fused q/k/v and gate/up, grouped-query heads
  passed to FlashAttention as they are, each request's shared head computed once);
* ``no-share``: every pair computes its own template, instruction and query;
* ``separate-projections``: q, k, v, gate and up as five matrix products;
* ``expanded-gqa``: k and v copied to every query head before the kernel, as torch's
  ``varlen_attn`` without ``enable_gqa`` needs.

It also times one 8-document request alone (the floor of the idle engine's latency) and
prints how far each variant's hidden states are from the default's. Compare its
numbers only with numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from consumer.bench import CONFIGS, build_random_model, default_tokenizer_dir, synthetic_requests
from consumer.model_loader import load_model
from consumer.model_options import ModelOptions
from consumer.packed_qwen3 import PackedQwen3, flash_varlen_attention
from consumer.prompt import EncodedPair

VARIANTS = ("default", "no-share", "separate-projections", "expanded-gqa")


def batches_in_order(pairs: list[EncodedPair], budget: int) -> list[list[EncodedPair]]:
    """Pairs in request order, cut whenever the next one would pass the token budget."""
    out: list[list[EncodedPair]] = []
    current: list[EncodedPair] = []
    total = 0
    for pair in pairs:
        if current and total + pair.tokens > budget:
            out.append(current)
            current, total = [], 0
        current.append(pair)
        total += pair.tokens
    if current:
        out.append(current)
    return out


def expanded_gqa_attention(*args: Any) -> torch.Tensor:
    """Flash varlen after copying k and v to every query head (the old path)."""
    q, k, v, *rest = args
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return flash_varlen_attention(q, k, v, *rest)


def build_variant(base: Any, name: str) -> PackedQwen3:
    attention = expanded_gqa_attention if name == "expanded-gqa" else None
    packed = PackedQwen3(base, "cuda", attention, fuse_projections=name != "separate-projections")
    packed.compile()
    return packed


def runner(packed: PackedQwen3, share: bool) -> Callable[[list[EncodedPair]], torch.Tensor]:
    def run(batch: list[EncodedPair]) -> torch.Tensor:
        prefixes = [p.shared_prefix if share else 0 for p in batch]
        inputs = packed.prepare([p.payload for p in batch], prefixes)  # type: ignore[misc]
        return packed.last_hidden_prepared(inputs).float().cpu()

    return run


def time_variant(
    run: Callable[[list[EncodedPair]], torch.Tensor],
    batches: list[list[EncodedPair]],
    requests: list[list[EncodedPair]],
) -> dict[str, float]:
    t0 = time.perf_counter()
    for batch in [*batches[:2], *requests[:3]]:
        run(batch)
    warm = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        run(batch)
    seconds = time.perf_counter() - t0
    lone = []
    for request in requests[:50]:
        t1 = time.perf_counter()
        run(request)
        lone.append(time.perf_counter() - t1)
    return {
        "warmup_s": warm,
        "seconds": seconds,
        "one_request_p50_ms": 1000 * statistics.median(lone),
        "one_request_min_ms": 1000 * min(lone),
    }


def print_profile(run: Callable[[list[EncodedPair]], torch.Tensor], batches: list[Any]) -> None:
    """torch.profiler's kernel table for a few batches: where the GPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            run(batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=65536)
    parser.add_argument("--config", default="0.6b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="kernel table of the default")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the packed forward needs CUDA")
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    config = json.loads(CONFIGS.get(args.config, Path(args.config)).read_text())
    raw = synthetic_requests(tokenizer_dir, args.pairs, 8, 0)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    with tempfile.TemporaryDirectory() as tmp:
        build_random_model(config, tokenizer_dir, Path(tmp), "cuda", 0)
        model = load_model(ModelOptions(model=tmp, packed="off", compile="off"))
        requests = [model.encoder.encode(q, docs, None) for q, docs in raw]
        pairs = [p for r in requests for p in r]
        tokens = sum(p.tokens for p in pairs)
        batches = batches_in_order(pairs, args.budget)
        base = model.scorer._base  # type: ignore[attr-defined]
        check = batches[0][:64]
        reference: torch.Tensor | None = None
        for name in names:
            run = runner(build_variant(base, name), share=name != "no-share")
            hidden = run(check)
            reference = hidden if reference is None else reference
            result = time_variant(run, batches, requests)
            drift = float((hidden - reference).abs().max() / reference.abs().max())
            print(
                json.dumps(
                    {
                        "variant": name,
                        "pairs": len(pairs),
                        "batches": len(batches),
                        "budget": args.budget,
                        "pairs_per_s": round(len(pairs) / result["seconds"], 1),
                        "tokens_per_s": round(tokens / result["seconds"]),
                        "warmup_s": round(result["warmup_s"], 1),
                        "one_8doc_request_p50_ms": round(result["one_request_p50_ms"], 2),
                        "one_8doc_request_min_ms": round(result["one_request_min_ms"], 2),
                        "max_rel_diff_vs_first_variant": round(drift, 5),
                    }
                ),
                flush=True,
            )
            if args.profile and name == "default":
                print_profile(run, batches[len(batches) // 2 :][:3])


if __name__ == "__main__":
    main()
