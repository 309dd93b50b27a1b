"""Engine benchmark: ``python -m benchmarks.engine_bench`` (a measurement, not a test).

Builds a random-weight Qwen3 reranker with the exact shape of a config file (default:
the released Qwen3-Reranker-0.6B, so compute cost equals the real model's), with the
real Qwen3 tokenizer, loads it through ``consumer.runtime.loader`` like the service does,
and drives the :class:`consumer.engine.engine.Engine` with synthetic requests:

1. tokenizer path alone (one calling thread, the service's encoder);
2. saturating load: ``--concurrency`` requests in flight, closed loop;
3. one request at a time on an idle engine;
4. the reference FastAPI recipe on the same pairs and card: seq-cls, fp16 on GPU,
   one padded forward of 8 pairs per request via AutoModelForSequenceClassification
   (the model part only, no HTTP server; a server would only add to its latency);
5. the strong reference (:mod:`benchmarks.strong_reference`): transformers alone done
   well, pairs sorted by length into token-budget batches, bf16, ``torch.compile`` on
   CUDA, only the yes/no rows of the LM head. The ratio is reported against both.

``--workload`` names the requests' shape (:data:`benchmarks.workload.WORKLOADS`: ``8docs``,
the default; ``rag``, 64 candidates of 128-512 tokens a request; ``rag-long``, the same with
one candidate in ten of 2,000-8,000 tokens). ``--split-long-documents`` has every request
ask for documents that do not fit ``--max-pair-tokens`` to be scored as windows.

Smoke run on a CPU: ``python -m benchmarks.engine_bench --pairs 64 --device cpu --config tiny
--skip-reference``. Only torch, transformers and tokenizers are imported (no Kafka,
Prometheus, pydantic or orjson), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import strong_reference
from benchmarks.device_time import DeviceTimedScorer
from benchmarks.host import cpu_model, positive_int
from benchmarks.workload import (
    CONFIGS,
    WORKLOADS,
    build_random_model,
    default_tokenizer_dir,
    workload_named,
    workload_requests,
)
from consumer.engine.api import ScoreRequest
from consumer.engine.engine import Engine
from consumer.engine.metrics import BatchReport, NoMetrics
from consumer.engine.settings import EngineSettings
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import TOKENIZER_BACKENDS, EncodedPair
from consumer.runtime.qwen3.forward import LAYER_PATHS
from consumer.runtime.scorer import Scorer

# The reference recipe's prompt (a typical FastAPI reranker wrapper), not the model card's.
REFERENCE_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
H100_SXM_DENSE_BF16_TFLOPS = 989.0  # NVIDIA spec sheet, dense (no sparsity)
ACHIEVABLE_BF16_TFLOPS = 790.0  # what docs/architecture.md's roofline uses


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a Qwen3 config."""

    layers: int
    heads: int
    head_dim: int
    non_embedding_params: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        h, layers = config["hidden_size"], config["num_hidden_layers"]
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        d = config.get("head_dim") or h // heads
        per_layer = (
            h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * config["intermediate_size"]
        )
        return cls(layers, heads, d, layers * per_layer)

    def flops(self, tokens: int, sum_sq_len: int) -> float:
        """2 x non-embedding params per token + 4 x layers x heads x head_dim x L^2 per sequence."""
        return (
            2.0 * self.non_embedding_params * tokens
            + 4.0 * self.layers * self.heads * self.head_dim * sum_sq_len
        )


FLOPS_FORMULA = "FLOPs = 2*P_nonemb*tokens + 4*layers*heads*head_dim*(query x key pairs attended)"
# What each count takes as tokens and attended pairs:
FLOP_COUNTS = (
    ("anchor", "every pair alone, full L^2 square (the anchor benchmarks' formula)"),
    ("needed", "causal (half the square), each shared head once: the least work that scores"),
    ("executed", "what the engine's layout runs: causal, padding included, shared heads once"),
)


# ---- measurements ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class BatchLog(NoMetrics):
    """The pairs and times of the model calls (the engine's metrics; filled on its
    inference thread)."""

    batches: list[list[EncodedPair]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def lengths(self) -> list[list[int]]:
        return [[p.tokens for p in batch] for batch in self.batches]

    def batch_scored(self, report: BatchReport) -> None:
        self.batches.append(list(report.pairs))
        self.seconds.append(report.seconds)

    def clear(self) -> None:
        self.batches.clear()
        self.seconds.clear()

    def flops(
        self, shape: ModelShape, packed: bool, works: Sequence[tuple[int, int]]
    ) -> dict[str, float]:
        """FLOPs of every batch, each way of :data:`FLOP_COUNTS`; ``works``: each batch's
        :func:`packed_work`."""
        totals = dict.fromkeys([name for name, _ in FLOP_COUNTS], 0.0)
        for batch, (stream, attended) in zip(self.batches, works, strict=True):
            totals["anchor"] += sum(shape.flops(p.tokens, p.tokens**2) for p in batch)
            totals["needed"] += shape.flops(stream, attended)
            if packed:
                totals["executed"] += shape.flops(stream, attended)
            else:
                longest = max(p.tokens for p in batch)
                causal = len(batch) * longest * (longest + 1) // 2
                totals["executed"] += shape.flops(longest * len(batch), causal)
        return totals


def packed_work(batch: Sequence[EncodedPair]) -> tuple[int, int]:
    """Stream tokens of a packed batch, and the causal (query, key) pairs its segments
    attend: a segment's q queries see its ancestors' k - q keys and the causal half of
    its own q x q block."""
    from consumer.runtime.qwen3.layout import pack

    inputs = pack([p.payload for p in batch], [p.share_points for p in batch])  # type: ignore[misc]
    q, k = inputs.cu_q.diff().long(), inputs.cu_k.diff().long()
    return inputs.ids.numel(), int((q * (k - q) + q * (q + 1) // 2).sum())


def measure_tokenizer(encoder: Any, requests: list[tuple[str, list[str]]]) -> dict[str, Any]:
    started = time.perf_counter()
    tokens = sum(p.tokens for q, docs in requests for p in encoder.encode(q, docs, None))
    seconds = time.perf_counter() - started
    return {
        "backend": getattr(encoder, "backend", "the model's tokenizer"),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
    }


async def saturate(
    engine: Engine,
    requests: list[tuple[str, list[str]]],
    concurrency: int,
    split: bool | None = None,
) -> dict[str, float]:
    """Closed loop: ``concurrency`` requests always in flight until all are answered
    (``split``: each request's ``split_long_documents``)."""
    queue = list(reversed(requests))
    latencies: list[float] = []
    tokens = split_documents = truncated = 0

    async def client() -> None:
        nonlocal tokens, split_documents, truncated
        while queue:
            query, docs = queue.pop()
            t0 = time.perf_counter()
            result = await engine.score(
                ScoreRequest(query, tuple(docs), split_long_documents=split)
            )
            latencies.append(time.perf_counter() - t0)
            tokens += result.prompt_tokens
            split_documents += sum(window is not None for window in result.windows)
            truncated += sum(result.truncated)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    pairs = sum(len(docs) for _, docs in requests)
    return {
        "requests": len(requests),
        "seconds": seconds,
        "pairs": pairs,
        "tokens": tokens,
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "req_p50_ms": 1000 * statistics.median(latencies),
        "req_p95_ms": 1000 * percentile(latencies, 0.95),
        "documents_split": split_documents,
        "documents_truncated": truncated,
    }


async def one_at_a_time(
    engine: Engine, requests: list[tuple[str, list[str]]], split: bool | None = None
) -> dict[str, float]:
    """Latency of one request at a time, and the median of its parts as the engine sees them
    (tokenizing, queue = in the engine but not in a model call, the model call)."""
    latencies: list[float] = []
    parts: dict[str, list[float]] = {"tokenize_ms": [], "queue_ms": [], "inference_ms": []}
    for query, docs in requests:
        t0 = time.perf_counter()
        result = await engine.score(ScoreRequest(query, tuple(docs), split_long_documents=split))
        latencies.append(time.perf_counter() - t0)
        parts["tokenize_ms"].append(result.extra.get("tokenize_ms", 0.0))
        parts["queue_ms"].append(result.queue_ms)
        parts["inference_ms"].append(result.inference_ms)
    return {
        "requests": len(requests),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        **{f"p50_{name}": statistics.median(values) for name, values in parts.items()},
    }


def model_options(args: argparse.Namespace, folder: Path, layers: str) -> ModelOptions:
    """The loader's options from the bench's arguments, with ``layers`` as the layer path."""
    return ModelOptions(
        model=str(folder),
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        packed=args.packed,
        layers=layers,
        fp8_bf16_last_layers=args.fp8_bf16_last_layers,
        max_pair_tokens=args.max_pair_tokens,
        tokenizer_backend=args.tokenizer_backend,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
    )


def engine_settings(args: argparse.Namespace, warmup: bool = True) -> EngineSettings:
    return EngineSettings(
        max_batch_tokens=args.max_batch_tokens,
        max_batch_pairs=args.max_batch_pairs,
        max_wait_ms=args.max_wait_ms,
        tokenizer_threads=args.tokenizer_threads,
        warmup=warmup,
    )


@dataclass
class BenchEngine:
    """An engine started over a loaded model, with the bench's batch log and device timer."""

    engine: Engine
    log: BatchLog
    timed: DeviceTimedScorer | None
    packed: bool
    model: dict[str, Any]


async def start_engine(
    args: argparse.Namespace, model: Any, load_s: float, encoder: Any = None, warmup: bool = True
) -> BenchEngine:
    """An engine over ``model`` (``encoder``: another prompt encoder than the model's)."""
    log = BatchLog()
    timed = DeviceTimedScorer(model.scorer) if model.device.startswith("cuda") else None
    scorer: Scorer = timed if timed is not None else model.scorer
    engine = Engine(
        encoder or model.encoder, scorer, model.name, engine_settings(args, warmup), log
    )
    t0 = time.perf_counter()
    await engine.start()
    info = {
        "kind": model.kind,
        "device": model.device,
        "dtype": model.dtype,
        "packed": model.scorer.traits.packed,
        "compile": args.compile,
        "load_s": round(load_s, 1),
        "warmup_s": round(time.perf_counter() - t0, 1),
    }
    return BenchEngine(engine, log, timed, model.scorer.traits.packed, info)


async def measure_load(
    bench: BenchEngine,
    args: argparse.Namespace,
    requests: list[tuple[str, list[str]]],
    shape: ModelShape,
    split: bool | None = None,
) -> dict[str, Any]:
    """The saturating load on ``requests`` after ``--warm-pairs`` of them unmeasured."""
    engine, log, timed, packed = bench.engine, bench.log, bench.timed, bench.packed
    docs = len(requests[0][1])
    if args.warm_pairs:
        await saturate(engine, requests[: max(1, args.warm_pairs // docs)], args.concurrency, split)
    log.clear()
    if timed is not None:
        timed.reset()
    before = (engine.stats.real_tokens, engine.stats.cost_tokens, engine.stats.oom_splits)
    load: dict[str, Any] = dict(await saturate(engine, requests, args.concurrency, split))
    real = engine.stats.real_tokens - before[0]
    cost = engine.stats.cost_tokens - before[1]
    lengths = log.lengths
    works = [packed_work(batch) for batch in log.batches]
    flops = log.flops(shape, packed, works)
    computed = sum(stream for stream, _ in works) if packed else cost
    # CUDA events: each batch's span on the device (benchmarks/device_time.py)
    load["device_busy_share"] = timed.busy_s / load["seconds"] if timed is not None else None
    load.update(
        batches=len(lengths),
        mean_batch_pairs=statistics.mean(len(x) for x in lengths),
        padding_overhead=cost / real,
        computed_token_share=computed / real,
        # tokens the model ran: the packed stream (shared heads once), or padded batches
        computed_tokens_per_s=computed / load["seconds"],
        # the host's view: from a batch's launch (or the previous batch's end) to its
        # results read back; not a device counter
        batch_in_flight_share=sum(log.seconds) / load["seconds"],
        **{f"{name}_tflops": total / load["seconds"] / 1e12 for name, total in flops.items()},
        oom_splits=engine.stats.oom_splits - before[2],
        max_batch_tokens_end=engine.max_batch_tokens,
    )
    return load


async def run_engine(
    args: argparse.Namespace, folder: Path, requests: list[tuple[str, list[str]]], shape: ModelShape
) -> dict[str, Any]:
    from consumer.runtime.loader import load_model

    t0 = time.perf_counter()
    model = await asyncio.to_thread(load_model, model_options(args, folder, args.layers))
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"tokenizer": measure_tokenizer(model.encoder, requests)}
    bench = await start_engine(args, model, load_s)
    out["model"] = bench.model
    split = True if args.split_long_documents else None
    out["load"] = await measure_load(bench, args, requests, shape, split)
    out["idle"] = await one_at_a_time(bench.engine, requests[: args.idle_requests], split)
    await bench.engine.close()
    del bench, model
    return out


def run_reference(
    args: argparse.Namespace,
    config: dict[str, Any],
    tokenizer_dir: Path,
    requests: list[tuple[str, list[str]]],
    device: str,
) -> dict[str, Any]:
    """The reference recipe: seq-cls, fp16 (fp32 on CPU), one padded forward per request."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        model: Any = Qwen3ForSequenceClassification(
            Qwen3Config(**dict(config, num_labels=1, pad_token_id=tok.pad_token_id))
        )
    model = model.to(dtype).eval()
    texts = [
        [f"{REFERENCE_INSTRUCTION}\nQuery: {q}\nDocument: {d}" for d in docs]
        for q, docs in requests
    ]
    result = time_reference(model, tok, texts, device)
    result["dtype"] = str(dtype).removeprefix("torch.")
    model = None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def time_reference(model: Any, tok: Any, texts: list[list[str]], device: str) -> dict[str, Any]:
    """Tokenize, pad and score each request's pairs in one forward, as the recipe does."""
    import torch

    @torch.inference_mode()
    def one(batch: list[str]) -> int:
        enc = tok(batch, truncation=True, max_length=8192, padding=True, return_tensors="pt")
        enc = enc.to(device)
        model(**enc).logits.squeeze(-1).float().cpu().tolist()
        return int(enc["attention_mask"].sum())

    for batch in texts[:2]:  # warm-up
        one(batch)
    latencies, tokens = [], 0
    started = time.perf_counter()
    for batch in texts:
        t0 = time.perf_counter()
        tokens += one(batch)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    pairs = sum(len(b) for b in texts)
    return {
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "req_p50_ms": 1000 * statistics.median(latencies),
        "req_p95_ms": 1000 * percentile(latencies, 0.95),
    }


# ---- report ---------------------------------------------------------------------------


def hardware(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cpu = cpu_model()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--pairs", type=int, default=2048, help="pairs in the load phase")
    p.add_argument(
        "--workload",
        type=workload_named,
        default=WORKLOADS["8docs"],
        help="the requests' shape: "
        + ", ".join(f"{w.name} ({w.description})" for w in WORKLOADS.values()),
    )
    p.add_argument(
        "--docs-per-request",
        type=positive_int,
        default=None,
        help="documents a request (default: the workload's)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="requests in flight under load; 256 x 8 docs = 2048 pairs, the service's default "
        "low-water mark (with the default --pairs that is one burst)",
    )
    p.add_argument(
        "--idle-requests", type=int, default=32, help="one-at-a-time requests on an idle engine"
    )
    p.add_argument(
        "--warm-pairs", type=int, default=512, help="unmeasured load before the measured one"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--packed", choices=("auto", "on", "off"), default="auto")
    p.add_argument(
        "--layers",
        choices=("auto", *LAYER_PATHS),
        default="auto",
        help="how the packed path runs each layer (fp8: FP8 linear layers)",
    )
    p.add_argument(
        "--fp8-bf16-last-layers",
        type=int,
        default=ModelOptions.fp8_bf16_last_layers,
        help="with an FP8 layer path: the last decoder layers kept in bf16",
    )
    p.add_argument(
        "--max-pair-tokens",
        type=positive_int,
        default=ModelOptions.max_pair_tokens,
        help="the model's window: most tokens of one prompt",
    )
    p.add_argument(
        "--split-long-documents",
        action="store_true",
        help="every request asks for documents over the window to be scored as windows",
    )
    p.add_argument(
        "--tokenizer-backend",
        choices=TOKENIZER_BACKENDS,
        default="auto",
        help="how prompts are tokenized (auto: tiktoken when it reproduces the tokenizer)",
    )
    p.add_argument(
        "--cuda-graph-max-tokens",
        type=positive_int,
        default=ModelOptions.cuda_graph_max_tokens,
        help="the largest batch (tokens) a CUDA graph is captured for; the capture log line "
        "gives the graphs' GPU memory",
    )
    p.add_argument("--max-batch-tokens", type=int, default=65536)
    p.add_argument("--max-batch-pairs", type=int, default=512)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--tokenizer-threads", type=int, default=4)
    p.add_argument(
        "--config", default="0.6b", help="a config.json path, or one of: " + ", ".join(CONFIGS)
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="folder with the Qwen3 tokenizer files"
    )
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_BF16_TFLOPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true", help="run neither reference")
    p.add_argument(
        "--skip-seed-reference",
        action="store_true",
        help="run the strong reference only (the seed recipe pads a request's documents "
        "to its longest: long-document workloads make it slow)",
    )
    p.add_argument(
        "--reference-pairs",
        type=int,
        default=None,
        help="time the reference on the first N pairs only (default: all); it runs one "
        "request after another at a steady rate, so fewer pairs give the same pairs/s sooner",
    )
    p.add_argument(
        "--strong-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile in the strong reference (auto: on CUDA only)",
    )
    p.add_argument(
        "--strong-budget",
        type=positive_int,
        default=32768,
        help="padded tokens a batch of the strong reference",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="Python's GIL switch interval (default: Python's own, 5 ms)",
    )
    p.add_argument("--json", action="store_true", help="one machine-readable JSON line at the end")
    args = p.parse_args(argv)
    if args.docs_per_request is None:
        args.docs_per_request = args.workload.docs_per_request
    return args


def report_lines(r: dict[str, Any], peak: float) -> list[str]:
    """The human-readable report."""
    hw, engine = r["hardware"], r["engine"]
    load, idle, model = engine["load"], engine["idle"], engine["model"]
    docs = r["settings"]["docs_per_request"]
    lines = [
        f"hardware     {hw.get('gpu', 'no GPU')} | {hw['cpu']} ({hw['cpu_cores']} cores)",
        f"software     python {hw['python']}, torch {hw['torch']}, "
        f"transformers {hw['transformers']}",
        f"model        {r['config']} shape, random weights, {model['kind']}, "
        f"{model['device']} {model['dtype']}, packed={model['packed']}, "
        f"compile={model['compile']} (load {model['load_s']} s, warm-up {model['warmup_s']} s)",
        f"settings     {json.dumps(r['settings'])}",
        f"workload     {r['settings']['workload']}: {load['pairs']} pairs, {load['tokens']} "
        f"prompt tokens (mean {load['tokens'] / load['pairs']:.0f} a pair), {docs} docs a "
        f"request, {min(r['settings']['concurrency'], load['requests'])} of "
        f"{load['requests']} requests in flight at a time; {load['documents_split']} "
        f"documents split into windows, {load['documents_truncated']} truncated",
        f"tokenizer    {engine['tokenizer']['tokens_per_s']:,} tokens/s "
        f"from one calling thread (the service's encoder, {engine['tokenizer']['backend']}; "
        "the Rust tokenizer spreads a "
        f"batch over cores unless TOKENIZERS_PARALLELISM=false; {os.cpu_count()} cores here)",
        f"throughput   {load['pairs_per_s']:.1f} pairs/s, {load['tokens_per_s']:,.0f} prompt "
        f"tokens/s, {load['computed_tokens_per_s']:,.0f} tokens/s computed, "
        f"{load['batches']} batches of {load['mean_batch_pairs']:.0f} pairs on average",
        f"padding      cost {load['padding_overhead']:.3f}x the real tokens, computed "
        f"{load['computed_token_share']:.3f}x (packed: shared heads once); "
        f"a batch on the device (host's view) {100 * load['batch_in_flight_share']:.0f}% of "
        "the wall time",
    ]
    if load["device_busy_share"] is not None:
        lines.append(
            f"device       busy {100 * load['device_busy_share']:.1f}% of the wall time "
            "(CUDA events around each batch; gaps inside a batch count as busy)"
        )
    lines += [
        f"compute      {FLOPS_FORMULA}",
    ]
    for name, meaning in FLOP_COUNTS:
        value = load[f"{name}_tflops"]
        lines.append(
            f"             {name}: {value:.1f} TFLOP/s = {100 * value / peak:.1f}% of "
            f"{peak:.0f} (dense bf16 peak), {100 * value / ACHIEVABLE_BF16_TFLOPS:.1f}% of "
            f"{ACHIEVABLE_BF16_TFLOPS:.0f} (achievable bf16); {meaning}"
        )
    lines += [
        f"under load   request p50 {load['req_p50_ms']:.1f} ms, p95 {load['req_p95_ms']:.1f} ms",
        f"idle engine  one {docs}-doc request at a time: p50 {idle['p50_ms']:.1f} ms, "
        f"p95 {idle['p95_ms']:.1f} ms ({idle['requests']} requests); medians of its parts: "
        f"tokenize {idle['p50_tokenize_ms']:.1f} ms, queue {idle['p50_queue_ms']:.1f} ms, "
        f"model {idle['p50_inference_ms']:.1f} ms",
    ]
    ref = r.get("reference")
    if ref:
        lines += [
            f"reference    seq-cls {ref['dtype']}, one padded forward per {docs}-doc request "
            f"(model part only, no HTTP), first {ref['pairs']} of the same pairs:",
            f"             {ref['pairs_per_s']:.1f} pairs/s, request p50 "
            f"{ref['req_p50_ms']:.1f} ms, p95 {ref['req_p95_ms']:.1f} ms",
            f"ratio        engine / reference = {r['speedup']:.2f}x pairs/s "
            "(same workload, same device, same process)",
        ]
    strong = r.get("strong_reference")
    if strong:
        lines += [
            f"strong ref.  transformers alone, {strong['dtype']}, compiled={strong['compiled']}, "
            f"pairs sorted by length into {strong['budget_tokens']}-token batches, yes/no "
            f"rows only, offline (knows every pair up front), same {strong['pairs']} pairs:",
            f"             {strong['pairs_per_s']:.1f} pairs/s ({strong['batches']} batches, "
            f"p50 {strong['batch_p50_ms']:.1f} ms; tokenizing {strong['tokenize_s']:.2f} s "
            f"of it; warm-up {strong['warm_up_s']:.1f} s)",
            f"ratio        engine / strong reference = {r['speedup_strong']:.2f}x pairs/s",
        ]
    return lines


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config_path = CONFIGS.get(args.config, Path(args.config))
    config = json.loads(config_path.read_text())
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    device = resolve_device(args.device)
    args.device = device
    shape = ModelShape.from_config(config)
    workload = replace(args.workload, docs_per_request=args.docs_per_request)
    requests = workload_requests(tokenizer_dir, workload, args.pairs, args.seed)
    report: dict[str, Any] = {
        "config": args.config,
        "hardware": hardware(device),
        "non_embedding_params": shape.non_embedding_params,
        "settings": {
            k: getattr(args, k)
            for k in (
                "max_batch_tokens",
                "max_batch_pairs",
                "max_wait_ms",
                "tokenizer_threads",
                "concurrency",
                "docs_per_request",
                "warm_pairs",
                "compile",
                "packed",
                "layers",
                "fp8_bf16_last_layers",
                "max_pair_tokens",
                "split_long_documents",
                "dtype",
            )
        },
    }
    report["settings"]["workload"] = args.workload.name
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as tmp:
        await asyncio.to_thread(
            build_random_model, config, tokenizer_dir, Path(tmp), device, args.seed
        )
        report["engine"] = await run_engine(args, Path(tmp), requests, shape)
    gc.collect()
    if not args.skip_reference:
        subset = requests
        if args.reference_pairs:
            subset = requests[: max(1, args.reference_pairs // args.docs_per_request)]
        if not args.skip_seed_reference:
            report["reference"] = await asyncio.to_thread(
                run_reference, args, config, tokenizer_dir, subset, device
            )
            report["reference"]["pairs"] = sum(len(docs) for _, docs in subset)
            report["speedup"] = (
                report["engine"]["load"]["pairs_per_s"] / report["reference"]["pairs_per_s"]
            )
        compile_strong = args.strong_compile == "on" or (
            args.strong_compile == "auto" and device.startswith("cuda")
        )
        report["strong_reference"] = await asyncio.to_thread(
            strong_reference.run,
            config,
            tokenizer_dir,
            subset,
            device,
            compile_strong,
            args.strong_budget,
            args.seed,
            args.max_pair_tokens,
        )
        report["speedup_strong"] = (
            report["engine"]["load"]["pairs_per_s"] / report["strong_reference"]["pairs_per_s"]
        )
    return report


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # the loader's step times and the CUDA graphs' capture line (time, GPU memory) on stderr
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("consumer.runtime").setLevel(logging.INFO)
    if args.switch_interval_ms is not None:
        # how long the inference thread may wait for the GIL while tokenizer threads hold it
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    report = asyncio.run(main_async(args))
    report["switch_interval_ms"] = sys.getswitchinterval() * 1000.0
    print("\n".join(report_lines(report, args.peak_tflops)))
    if args.json:
        print(json.dumps(_rounded(report)))


def _rounded(value: Any) -> Any:
    """Floats cut to 4 decimals, recursively (for a readable JSON line)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
