"""Packed forward alone, variant against variant, in one process on one GPU.

    python -m benchmarks.forward_only --tokenizer DIR [--pairs 4096]
        [--variants default,graphs,torch-qk,no-share,expanded-gqa] [--rounds 2] [--profile]

Builds the random 0.6B-shaped model and synthetic workload of ``benchmarks.engine_bench``,
tokenizes everything first, cuts batches in request order by the token budget (as the
engine's batcher does for a packed scorer), then times the packed forward batch after
batch on one thread, for each variant:

* ``default``: what the service runs without CUDA graphs: the template + instruction
  computed once a batch and each request's query once, the grouped Triton attention
  kernel reading keys in place, q/k norm + rotary in the Triton kernel of
  ``consumer.runtime.qwen3.qk_rope_kernel``, the last layer only at each pair's last token;
* ``graphs``: the default plus CUDA graphs for batches up to 8,192 tokens (what the
  service runs); ``graphs-wide``: with the wider buckets of the first version (every
  segment up to 1,024 tokens, a slot per 32 tokens);
* ``flash-attention``: the default with FlashAttention-2 (keys and values gathered
  first) instead of the grouped Triton attention kernel of
  ``consumer.runtime.qwen3.varlen_attention_kernel``;
* ``torch-qk``: q/k norm and rotary as compiled torch code (the path before the kernel);
* ``request-heads``: each request's head computed once, but the template + instruction
  once per request instead of once per batch (the layout before cut points);
* ``no-share``: every pair computes its own template, instruction and query;
* ``expanded-gqa``: k and v copied to every query head before the kernel, as torch's
  ``varlen_attn`` without ``enable_gqa`` needs;
* ``kernels``: the default with each layer's row-wise steps in the fused Triton kernels
  of ``consumer.runtime.qwen3.fused_layers`` (residual add + norm in one pass, SiLU * up,
  q/k/v and gate/up each one GEMM) instead of compiled torch regions;
* ``fp8``: ``kernels`` with FP8 linear layers (activations quantized inside those
  kernels, ``torch._scaled_mm`` with row-wise scales); ``fp8-normed``: only the q/k/v and
  gate/up GEMMs in FP8; ``fp8-graphs``: ``fp8`` with CUDA graphs; ``fp8-lastN``: ``fp8``
  with the last N decoder layers in bf16 (``fp8`` itself keeps none);
* ``attention=TILE`` (e.g. ``attention=64/32/4/3``): the default with the Triton
  attention kernel in that tile (``benchmarks.attention_kernels`` names them) instead
  of its default one.

Each variant first runs every batch once (compiling, filling the allocator's cache), then
the variants are timed in turn, ``--rounds`` times, so an order effect shows.
``--profile`` prints torch.profiler's kernel table of the first two variants, and each
one's kernel time by kind (matrix products, attention, ...). It also
times one 8-document request alone (the floor of the idle engine's latency; "issue" is
the time until the GPU work is queued, the rest is waiting for the GPU) and prints how
far each variant's hidden states are from the first variant's. Compare its numbers only
with numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import (
    CONFIGS,
    WORKLOADS,
    default_tokenizer_dir,
    workload_named,
    workload_requests,
)
from consumer.runtime.prompt import EncodedPair
from consumer.runtime.qwen3.attention import flash_varlen_attention
from consumer.runtime.qwen3.forward import LAYER_PATHS, PackedQwen3
from consumer.runtime.qwen3.graphs import PackedGraphs, make_buckets
from consumer.runtime.qwen3.layout import Prefix
from consumer.runtime.qwen3.varlen_attention_kernel import grouped_varlen_attention

VARIANTS = (
    "default",
    "graphs",
    "graphs-wide",
    "flash-attention",
    "torch-qk",
    "request-heads",
    "no-share",
    "expanded-gqa",
    "kernels",
    "fp8",
    "fp8-normed",
    "fp8-graphs",
)


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


def known_variant(name: str) -> bool:
    """One of :data:`VARIANTS`, ``fp8-lastN`` or ``attention=TILE``."""
    if name.startswith("attention="):
        from benchmarks.attention_kernels import parse_tile

        parse_tile(name.removeprefix("attention="))
        return True
    return name in VARIANTS or bool(re.fullmatch(r"fp8-last\d+", name))


def build_variant(base: Any, name: str) -> PackedQwen3:
    if name.startswith("attention="):
        from benchmarks.attention_kernels import parse_tile

        tile = parse_tile(name.removeprefix("attention="))
        packed = PackedQwen3(
            base, "cuda", piecewise_attention=partial(grouped_varlen_attention, tile=tile)
        )
        packed.compile()
        return packed
    if last := re.fullmatch(r"fp8-last(\d+)", name):
        return PackedQwen3(base, "cuda", layer_path="fp8", bf16_last_layers=int(last[1]))
    attention = {
        "expanded-gqa": expanded_gqa_attention,
        "flash-attention": flash_varlen_attention,
    }.get(name)
    graphs = None
    if name in ("graphs", "fp8-graphs"):
        graphs = PackedGraphs()
    elif name == "graphs-wide":  # the first buckets: one 1,024 segment length, T // 32 + 8
        graphs = PackedGraphs(make_buckets(segment_lengths=(1024,), tokens_per_segment=32))
    qk_kernel = False if name == "torch-qk" else None
    layer_path = {"fp8-graphs": "fp8"}.get(name, name if name in LAYER_PATHS else "compiled")
    packed = PackedQwen3(
        base, "cuda", attention, graphs=graphs, qk_kernel=qk_kernel, layer_path=layer_path
    )
    packed.compile()
    return packed


Runner = Callable[[list[EncodedPair]], tuple[float, float]]


def sharing(name: str) -> Callable[[EncodedPair], Prefix]:
    """What a variant lets pairs share: template + instruction across requests and each
    request's head (the default), only each request's head, or nothing."""
    if name == "no-share":
        return lambda pair: 0
    if name == "request-heads":
        return lambda pair: pair.shared_prefix
    return lambda pair: pair.share_points


def runner(packed: PackedQwen3, share: Callable[[EncodedPair], Prefix]) -> Runner:
    """Runs one batch; returns (seconds to issue the GPU work, seconds until its result)."""

    def run(batch: list[EncodedPair]) -> tuple[float, float]:
        t0 = time.perf_counter()
        prefixes = [share(p) for p in batch]
        inputs = packed.prepare([p.payload for p in batch], prefixes)  # type: ignore[misc]
        hidden = packed.last_hidden_prepared(inputs)
        issued = time.perf_counter()
        hidden.float().cpu()
        return issued - t0, time.perf_counter() - t0

    return run


def time_variant(
    run: Runner, batches: list[list[EncodedPair]], requests: list[list[EncodedPair]]
) -> dict[str, float]:
    """Throughput over all batches, then one request at a time (issue and total times)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        run(batch)
    seconds = time.perf_counter() - t0
    lone = [run(request) for request in requests[:50]]
    return {
        "seconds": seconds,
        "one_request_p50_ms": 1000 * statistics.median(t for _, t in lone),
        "one_request_issue_p50_ms": 1000 * statistics.median(i for i, _ in lone),
    }


# Kinds of kernel by name (first match wins): how the profile's kernel time splits
KERNEL_KINDS = (
    ("attention", r"_attention_tile|flash|fmha|cudnn|attention"),
    ("q/k norm + rotary", r"_norm_rope_rows|gather_heads"),
    ("matrix products", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas|_scaled_mm|matmul"),
    # everything else: norms, SiLU x up, residual adds, quantizing, copies
)


def kernel_shares(events: list[tuple[str, float]]) -> dict[str, float]:
    """Each kind's share of the kernel time, from (kernel name, device microseconds)."""
    totals: dict[str, float] = {}
    for name, us in events:
        kind = next(
            (kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.I)), "other"
        )
        totals[kind] = totals.get(kind, 0.0) + us
    whole = sum(totals.values()) or 1.0
    return {kind: us / whole for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def print_profile(run: Runner, batches: list[Any]) -> dict[str, Any]:
    """torch.profiler's kernel table for a few batches: where the GPU time goes; returns
    the kernel time (ms) and each kind's share of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            run(batch)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=30), flush=True)
    kernels = [
        (e.key, float(getattr(e, "self_device_time_total", None) or e.self_cuda_time_total))
        for e in averages
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    return {
        "kernel_ms": sum(us for _, us in kernels) / 1000,
        "shares": kernel_shares(kernels),
    }


def random_base(config: dict[str, Any], tokenizer_dir: Path) -> tuple[Any, Any]:
    """A random-weight Qwen3 base model of ``config``'s shape on the GPU in bf16 (built in
    memory: a 4B or 8B checkpoint takes longer to save and load than to draw), and the
    service's prompt encoder with the real tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from consumer.runtime.options import DEFAULT_INSTRUCTION
    from consumer.runtime.prompt import Qwen3RerankerEncoder

    torch.manual_seed(0)
    with torch.device("cuda"):
        base: Any = Qwen3Model(Qwen3Config(**config))
    base = base.to(torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return base, Qwen3RerankerEncoder(tokenizer, 8192, DEFAULT_INSTRUCTION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=65536)
    parser.add_argument("--config", default="0.6b")
    parser.add_argument(
        "--workload",
        type=workload_named,
        default=WORKLOADS["8docs"],
        help="the requests' shape: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the variants")
    parser.add_argument("--profile", action="store_true", help="kernel tables of two variants")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the packed forward needs CUDA")
    names = args.variants.split(",")
    unknown = {name for name in names if not known_variant(name)}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    config = json.loads(CONFIGS.get(args.config, Path(args.config)).read_text())
    raw = workload_requests(tokenizer_dir, args.workload, args.pairs, 0)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    base, encoder = random_base(config, tokenizer_dir)
    requests = [encoder.encode(q, docs, None) for q, docs in raw]
    pairs = [p for r in requests for p in r]
    tokens = sum(p.tokens for p in pairs)
    batches = batches_in_order(pairs, args.budget)
    check = batches[0][:64]
    runs: dict[str, Runner] = {}
    hidden: dict[str, torch.Tensor] = {}
    for name in names:
        packed = build_variant(base, name)
        share = sharing(name)
        runs[name] = runner(packed, share)
        t0 = time.perf_counter()
        for batch in [*batches, *requests[:50]]:  # compiles, fills the allocator's cache
            runs[name](batch)
        packed.capture_graphs()
        prefixes = [share(p) for p in check]
        inputs = packed.prepare([p.payload for p in check], prefixes)  # type: ignore[misc]
        hidden[name] = packed.last_hidden_prepared(inputs).float()
        first = hidden[names[0]]
        drift = float((hidden[name] - first).abs().max() / first.abs().max())
        emit(variant=name, warmup_s=time.perf_counter() - t0, max_rel_diff_vs_first=drift)
    for round_ in range(1, args.rounds + 1):
        for name in names:
            result = time_variant(runs[name], batches, requests)
            emit(
                round=round_,
                variant=name,
                pairs=len(pairs),
                batches=len(batches),
                pairs_per_s=len(pairs) / result["seconds"],
                tokens_per_s=tokens / result["seconds"],
                one_8doc_request_p50_ms=result["one_request_p50_ms"],
                one_8doc_request_issue_p50_ms=result["one_request_issue_p50_ms"],
            )
    if args.profile:
        for name in names[:2]:
            print(f"== {name}: 3 batches from the middle, then 5 single requests")
            kinds = print_profile(runs[name], [*batches[len(batches) // 2 :][:3], *requests[:5]])
            emit(profile=name, kernel_ms=kinds["kernel_ms"], shares=kinds["shares"])


def emit(**fields: Any) -> None:
    print(json.dumps(_rounded(fields)))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    main()
