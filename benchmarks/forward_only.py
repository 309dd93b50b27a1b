"""Scorer-only throughput: the model path without the engine, to split a gap between them.

    PYTHONPATH=. python benchmarks/forward_only.py --tokenizer DIR [--pairs 4096]

Builds the same random 0.6B-shaped model and synthetic workload as ``consumer.bench``,
tokenizes everything first, cuts batches from globally length-sorted pairs by a token
budget (as the shared packed probe does), then times ``scorer.score`` batch after batch
on one thread. Compare its pairs/s with the engine's (``python -m consumer.bench``) from
the same run: the difference is what the engine (tokenizer threads, batch former,
futures) costs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from consumer.bench import CONFIGS, build_random_model, default_tokenizer_dir, synthetic_requests
from consumer.model_loader import load_model
from consumer.model_options import ModelOptions
from consumer.prompt import EncodedPair


def batches_by_budget(pairs: list[EncodedPair], budget: int) -> list[list[EncodedPair]]:
    """Length-sorted pairs cut whenever the next one would pass the token budget."""
    out: list[list[EncodedPair]] = []
    current: list[EncodedPair] = []
    total = 0
    for pair in sorted(pairs, key=lambda p: p.tokens):
        if current and total + pair.tokens > budget:
            out.append(current)
            current, total = [], 0
        current.append(pair)
        total += pair.tokens
    if current:
        out.append(current)
    return out


def native_gqa_attention() -> Any:
    """Causal varlen flash attention that takes k/v with fewer heads than q (an experiment).

    FlashAttention handles grouped-query attention itself; torch 2.11's ``varlen_attn``
    has no ``enable_gqa``, so ``consumer.packed_qwen3`` copies k and v to every query head
    first (16% of the GPU time in the profile of docs/benchmarks.md, with the kernels
    around it). This calls the flash op underneath directly. Unverified on a GPU: the run
    compares its scores with the default path before timing it.
    """
    import torch

    def attend(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float) -> Any:
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        return out[0]

    return attend


def print_profile(scorer: object, batches: list[list[EncodedPair]]) -> None:
    """torch.profiler's kernel table for a few batches: where the GPU time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    score = scorer.score  # type: ignore[attr-defined]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            score(batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
    )
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=65536)
    parser.add_argument("--config", default="0.6b")
    parser.add_argument(
        "--fuse-projections",
        action="store_true",
        help="q/k/v and gate/up as one matrix product each (PackedQwen3.fuse_projections)",
    )
    parser.add_argument(
        "--native-gqa",
        action="store_true",
        help="flash attention on 8 kv heads without copying them (see native_gqa_attention)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print the top GPU kernels of 3 batches"
    )
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run only
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    config = json.loads(CONFIGS.get(args.config, Path(args.config)).read_text())
    requests = synthetic_requests(tokenizer_dir, args.pairs, 8, 0)
    with tempfile.TemporaryDirectory() as tmp:
        build_random_model(config, tokenizer_dir, Path(tmp), device, 0)
        model = load_model(ModelOptions(model=tmp))
        pairs = [p for q, docs in requests for p in model.encoder.encode(q, docs, None)]
        if args.native_gqa or args.fuse_projections:
            # A variant is checked against the default path first (two compiles).
            packed = getattr(model.scorer, "_packed", None)
            if packed is None:
                raise SystemExit("--native-gqa and --fuse-projections need the packed (CUDA) path")
            baseline = model.scorer.score(pairs[:64])
            if args.native_gqa:
                packed.attention = native_gqa_attention()
            if args.fuse_projections:
                packed.fuse_projections()
            packed.compile()
            variant = model.scorer.score(pairs[:64])
            drift = max(abs(a - b) for a, b in zip(baseline, variant, strict=True))
            print(json.dumps({"variant_vs_default_max_abs_logit_diff": round(drift, 5)}))
        batches = batches_by_budget(pairs, args.budget)
        t0 = time.perf_counter()
        model.scorer.warmup(model.encoder)
        for batch in batches[:2]:
            model.scorer.score(batch)
        warm_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in batches:
            model.scorer.score(batch)
        seconds = time.perf_counter() - t0
        if args.profile:
            print_profile(model.scorer, batches[len(batches) // 2 :][:3])
    tokens = sum(p.tokens for p in pairs)
    print(
        json.dumps(
            {
                "what": "scorer only, pre-tokenized, globally length-sorted batches",
                "gpu": torch.cuda.get_device_name() if device == "cuda" else "none (cpu)",
                "packed": bool(getattr(model.scorer, "packed", False)),
                "fused_projections": args.fuse_projections,
                "native_gqa": args.native_gqa,
                "pairs": len(pairs),
                "batches": len(batches),
                "budget": args.budget,
                "warmup_s": round(warm_s, 1),
                "pairs_per_s": round(len(pairs) / seconds, 1),
                "tokens_per_s": round(tokens / seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
