"""The engine on several workloads and layer paths in one process, against the strong
reference on the same requests: the tables of docs/benchmarks.md ("RAG-shaped requests").

    python -m benchmarks.rag_tables --tokenizer DIR [--config 0.6b] [--layers compiled,fp8]
        [--phases 8docs:8192,rag:4096,rag-long:2048@compiled] [--windows 2048:2048]
        [--strong rag:2048,rag-long:1024] [--strong-compile on]

One random-weight checkpoint of ``--config``'s shape is built and loaded once per layer
path (``--layers``); each path's engine (defaults otherwise, as ``benchmarks.engine_bench``
drives it) then runs every phase: ``WORKLOAD:PAIRS`` is the saturating load of the
engine bench on the first PAIRS pairs of that workload's requests
(``benchmarks.workload.WORKLOADS``), then ``--idle-requests`` of them one at a time; an
``@LAYERS`` suffix runs the phase with that layer path only. ``--windows TOKENS:PAIRS``
measures splitting long documents on the first layer path: an engine over the same model
whose encoder's window is TOKENS, on the first PAIRS pairs of ``rag-long``, with the
documents over the window truncated and then split into windows (the request field).
``--strong WORKLOAD:PAIRS``: the strong reference (``benchmarks.strong_reference``) on
the first PAIRS pairs of the same requests. Every result is one JSON line; a table ends
the output. A phase that fails prints its error and the rest go on.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import engine_bench, strong_reference
from benchmarks.workload import (
    CONFIGS,
    WORKLOADS,
    build_random_model,
    default_tokenizer_dir,
    workload_requests,
)

Phase = tuple[str, int, str | None]  # workload, pairs, layer path (None: every one)
Run = tuple[str, int, int | None, bool | None]  # workload, pairs, window, split


def parse_phases(text: str) -> list[Phase]:
    """``WORKLOAD:PAIRS[@LAYERS]``, comma-separated."""
    phases: list[Phase] = []
    for item in filter(None, text.split(",")):
        spec, _, layers = item.partition("@")
        name, _, pairs = spec.partition(":")
        if name not in WORKLOADS or not pairs.isdigit() or int(pairs) < 1:
            raise argparse.ArgumentTypeError(
                f"phase {item!r}: WORKLOAD:PAIRS[@LAYERS] with WORKLOAD one of "
                + ", ".join(WORKLOADS)
            )
        phases.append((name, int(pairs), layers or None))
    return phases


def parse_windows(text: str) -> tuple[int, int] | None:
    """``TOKENS:PAIRS`` (or empty: none)."""
    if not text:
        return None
    tokens, _, pairs = text.partition(":")
    if not (tokens.isdigit() and pairs.isdigit()):
        raise argparse.ArgumentTypeError(f"windows {text!r}: TOKENS:PAIRS")
    return int(tokens), int(pairs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rag_tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--config", default="0.6b", help="one of " + ", ".join(CONFIGS))
    p.add_argument("--device", default="auto")
    p.add_argument("--layers", default="compiled,fp8", help="layer paths, comma-separated")
    p.add_argument(
        "--phases", type=parse_phases, default=parse_phases("8docs:4096,rag:2048,rag-long:1024")
    )
    p.add_argument("--windows", type=parse_windows, default=None)
    p.add_argument("--strong", type=parse_phases, default=[])
    p.add_argument("--strong-compile", choices=("on", "off"), default="off")
    p.add_argument("--idle-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    # the engine bench's own knobs, at its defaults
    bench = engine_bench.parse_args([])
    for name in (
        "concurrency", "warm_pairs", "max_batch_tokens", "max_batch_pairs", "max_wait_ms",
        "tokenizer_threads", "fp8_bf16_last_layers", "max_pair_tokens", "strong_budget",
        "cuda_graph_max_tokens",
    ):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(bench, name)),
                       default=getattr(bench, name))  # fmt: skip
    args = p.parse_args(argv)
    for name in ("dtype", "compile", "packed", "tokenizer_backend"):
        setattr(args, name, getattr(bench, name))
    return args


def emit(**fields: Any) -> None:
    print(json.dumps(engine_bench._rounded(fields)), flush=True)


def gpu_memory_gib() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


async def engine_phases(
    args: argparse.Namespace,
    folder: Path,
    layers: str,
    requests: dict[str, list[tuple[str, list[str]]]],
    shape: engine_bench.ModelShape,
    windows: bool,
) -> list[dict[str, Any]]:
    """Load the model with ``layers``, run its phases (and the windows' when asked)."""
    import torch

    from consumer.runtime.loader import load_model

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = await asyncio.to_thread(load_model, engine_bench.model_options(args, folder, layers))
    bench = await engine_bench.start_engine(args, model, time.perf_counter() - t0)
    emit(config=args.config, layers=layers, model=bench.model, **gpu_memory_gib())
    runs: list[Run] = [
        (name, pairs, None, None) for name, pairs, only in args.phases if only in (None, layers)
    ]
    results = await run_phases(args, bench, runs, requests, shape, layers)
    await bench.engine.close()
    if windows and args.windows:
        # the same model behind an encoder with a narrower window (no second warm-up)
        window, pairs = args.windows
        encoder = windowed_encoder(folder, window)
        narrow = await engine_bench.start_engine(args, model, 0.0, encoder, warmup=False)
        splits: list[Run] = [("rag-long", pairs, window, split) for split in (False, True)]
        results += await run_phases(args, narrow, splits, requests, shape, layers)
        await narrow.engine.close()
    del bench, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


async def run_phases(
    args: argparse.Namespace,
    bench: engine_bench.BenchEngine,
    runs: list[Run],
    requests: dict[str, list[tuple[str, list[str]]]],
    shape: engine_bench.ModelShape,
    layers: str,
) -> list[dict[str, Any]]:
    """Each (workload, pairs, window, split) on ``bench``: load, then idle requests."""
    results = []
    for name, pairs, window, split in runs:
        share = requests[name][: max(1, pairs // WORKLOADS[name].docs_per_request)]
        row: dict[str, Any] = {"config": args.config, "layers": layers, "workload": name,
                               "window": window or args.max_pair_tokens,
                               "split_long_documents": bool(split)}  # fmt: skip
        try:
            row["load"] = await engine_bench.measure_load(bench, args, share, shape, split)
            idle = share[: args.idle_requests]
            row["idle"] = await engine_bench.one_at_a_time(bench.engine, idle, split)
            row.update(gpu_memory_gib())
        except Exception as exc:  # report and go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        emit(**row)
        results.append(row)
    return results


def windowed_encoder(folder: Path, window: int) -> Any:
    """The model's prompt encoder with a window of ``window`` tokens."""
    from transformers import AutoTokenizer

    from consumer.runtime.options import DEFAULT_INSTRUCTION
    from consumer.runtime.prompt import Qwen3RerankerEncoder

    return Qwen3RerankerEncoder(
        AutoTokenizer.from_pretrained(str(folder)), window, DEFAULT_INSTRUCTION
    )


def strong_runs(
    args: argparse.Namespace,
    config: dict[str, Any],
    tokenizer_dir: Path,
    requests: dict[str, list[tuple[str, list[str]]]],
    device: str,
) -> list[dict[str, Any]]:
    results = []
    for name, pairs, _ in args.strong:
        share = requests[name][: max(1, pairs // WORKLOADS[name].docs_per_request)]
        row: dict[str, Any] = {"config": args.config, "strong_reference": name}
        try:
            row.update(strong_reference.run(
                config, tokenizer_dir, share, device, args.strong_compile == "on",
                args.strong_budget, args.seed, args.max_pair_tokens,
            ))  # fmt: skip
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        emit(**row)
        results.append(row)
    return results


def table(engine_rows: list[dict[str, Any]], strong_rows: list[dict[str, Any]]) -> str:
    """pairs/s, prompt and computed tokens/s and the idle request, per phase; the strong
    reference's pairs/s and the engine's ratio to it on the same workload."""
    strong = {r["strong_reference"]: r for r in strong_rows if "pairs_per_s" in r}
    lines = [
        "| shape | layers | workload | window | long documents | pairs/s | prompt tokens/s "
        "| computed tokens/s | idle request p50 / p95 ms | vs strong reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in engine_rows:
        if "load" not in r:
            lines.append(f"| {r['config']} | {r['layers']} | {r['workload']} | error |")
            continue
        load, idle = r["load"], r["idle"]
        ref = strong.get(r["workload"])
        if ref and (r["split_long_documents"] or r["window"] != ref["max_tokens"]):
            ref = None  # the reference scores the same prompts only at its own window
        ratio = f"{load['pairs_per_s'] / ref['pairs_per_s']:.2f}x" if ref else "-"
        mode = "windows" if r["split_long_documents"] else "truncated"
        lines.append(
            f"| {r['config']} | {r['layers']} | {r['workload']} | {r['window']} | {mode} "
            f"| {load['pairs_per_s']:,.1f} | {load['tokens_per_s']:,.0f} "
            f"| {load['computed_tokens_per_s']:,.0f} | {idle['p50_ms']:.1f} / "
            f"{idle['p95_ms']:.1f} | {ratio} |"
        )
    for name, r in strong.items():
        lines.append(
            f"| {r['config']} | strong reference (compiled={r['compiled']}) | {name} | "
            f"{r['max_tokens']} | truncated | {r['pairs_per_s']:,.1f} | {r['tokens_per_s']:,.0f} "
            f"| - | - | - |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    config = json.loads(Path(CONFIGS.get(args.config, args.config)).read_text())
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    device = engine_bench.resolve_device(args.device)
    args.device = device
    shape = engine_bench.ModelShape.from_config(config)
    wanted: dict[str, int] = {}
    for name, pairs, _ in [*args.phases, *args.strong]:
        wanted[name] = max(wanted.get(name, 0), pairs)
    if args.windows:
        wanted["rag-long"] = max(wanted.get("rag-long", 0), args.windows[1])
    requests = {
        name: workload_requests(tokenizer_dir, WORKLOADS[name], pairs, args.seed)
        for name, pairs in wanted.items()
    }
    emit(config=args.config, hardware=engine_bench.hardware(device), settings={
        k: v for k, v in vars(args).items() if k not in ("tokenizer",)
    })  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rerank-rag-") as tmp:
        t0 = time.perf_counter()
        await asyncio.to_thread(build_random_model, config, tokenizer_dir, Path(tmp), device, 0)
        emit(config=args.config, built_s=time.perf_counter() - t0)
        for i, layers in enumerate(args.layers.split(",")):
            rows += await engine_phases(args, Path(tmp), layers, requests, shape, windows=i == 0)
    strong_rows = strong_runs(args, config, tokenizer_dir, requests, device)
    print(table(rows, strong_rows))


def main(argv: list[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("consumer.runtime").setLevel(logging.INFO)
    asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    main()
