"""Score drift of each way of running the model, against the model card's recipe in fp32.

    python -m benchmarks.drift --tokenizer DIR [--config 0.6b] [--pairs 512]
        [--layers compiled,kernels,fp8,fp8-last0,fp8-last2] [--model CHECKPOINT_DIR]

Builds a random-weight model of ``--config`` (as the engine bench does, with a wider
initialisation so that scores spread), takes the engine bench's synthetic requests (8
documents each) and scores every pair:

* ``card_fp32``: the model card's recipe (transformers, one pair at a time, the
  full-vocabulary logits at the last token) in float32: the truth;
* ``card_bf16``: the same recipe in bfloat16, the yardstick a faster path is held to;
* ``engine_<layers>``: the engine's scorer in bfloat16 with each ``--layers`` path
  (``consumer.runtime.options.ModelOptions.layers``; ``fp8`` needs compute capability
  8.9 or newer; ``fp8`` keeps the default number of last layers in bf16,
  ``fp8-lastN`` (also ``fp8-normed-lastN``) keeps N).

For each it prints, against ``card_fp32``, over scores (sigmoid of the yes-no logit):
the largest and the mean absolute difference, the share of requests whose top document
is the same, and the Spearman rank correlation of each request's documents (mean and
worst). ``no_worse_than_card_bf16`` says whether a path agrees with fp32 at least as
well as the model card's own bf16 run: the rule for making it a default. Random weights
have no trained outlier channels, so FP8's drift on a trained checkpoint can be larger;
run this with ``--model`` on the real checkpoint where it can be downloaded.

The last line is the verdict on FP8 (:func:`fp8_verdict`): which FP8 way, if any, is
within the bounds the GPU parity check allows a bf16 path (twice the model card's own
bf16 drift, at least 0.02) with its ranking as good as the model card's bf16 within a
margin, the settings that turn it on, and otherwise what is missing.

A GPU check of the FP8 row kernels runs first: the Triton kernels' rounding to e4m3
against torch's on the same scaled rows (Triton's CPU interpreter cannot check that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check import reference_logits
from benchmarks.host import positive_int
from benchmarks.workload import (
    CONFIGS,
    build_random_model,
    default_tokenizer_dir,
    synthetic_requests,
)
from consumer.runtime.loader import LoadedModel, load_model
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import EncodedPair
from consumer.runtime.scorer import sigmoid

DOCS = 8
CHUNK_REQUESTS = 8  # requests per engine batch
# The FP8 verdict: as gpu_check bounds a bf16 path's largest score difference from fp32
# (twice the model card's own bf16 run, at least SCORE_FLOOR), with the ranking kept as
# well as the model card's bf16 run keeps it, less these margins
SCORE_FLOOR = 0.02
TOP1_MARGIN = 0.05
SPEARMAN_MARGIN = 0.01


def emit(**fields: Any) -> None:
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in fields.items()}))


def check_fp8_rounding(width: int = 3072, rows: int = 4096) -> dict[str, Any]:
    """The row kernel's FP8 output against torch's rounding of the same scaled rows."""
    from consumer.runtime.qwen3 import row_kernels

    torch.manual_seed(0)
    x = (torch.randn(rows, width, device="cuda") * torch.rand(rows, 1, device="cuda") * 8).to(
        torch.bfloat16
    )
    got, scales = row_kernels.quantize_rows(x)
    assert scales is not None
    want = (x.float() / scales).clamp(-448, 448).to(torch.float8_e4m3fn)
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    steps = (got.float() - want.float()).abs()[differ]
    return {
        "fp8_rounding_values": got.numel(),
        "fp8_rounding_mismatches": int(differ.sum()),
        # a mismatch that is one e4m3 step is a tie rounded the other way, not a bug
        "fp8_rounding_worst_rel_step": float((steps / want.float().abs()[differ]).max())
        if int(differ.sum())
        else 0.0,
    }


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long score lists (no ties expected)."""

    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def agreement(scores: list[float], truth: list[float]) -> dict[str, float]:
    """How ``scores`` agree with ``truth``, over all pairs and per request of ``DOCS``."""
    diffs = [abs(x - y) for x, y in zip(scores, truth, strict=True)]
    requests = [slice(i, i + DOCS) for i in range(0, len(truth), DOCS)]
    top1 = [
        max(range(DOCS), key=scores[r].__getitem__) == max(range(DOCS), key=truth[r].__getitem__)
        for r in requests
    ]
    rho = [spearman(scores[r], truth[r]) for r in requests]
    return {
        "max_abs_score_diff": max(diffs),
        "mean_abs_score_diff": statistics.fmean(diffs),
        "top1_agreement": sum(top1) / len(top1),
        "spearman_mean": statistics.fmean(rho),
        "spearman_min": min(rho),
    }


def path_options(name: str) -> dict[str, Any]:
    """ModelOptions fields of a ``--layers`` entry: a layer path, or ``fp8-lastN`` /
    ``fp8-normed-lastN`` (that FP8 path with its last N layers in bf16)."""
    path, _, last = name.rpartition("-last")
    if path.startswith("fp8") and last.isdigit():
        return {"layers": path, "fp8_bf16_last_layers": int(last)}
    return {"layers": name}


def fp8_verdict(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Which FP8 ways (``engine_fp8...`` of ``rows``, each its :func:`agreement` with
    fp32) are safe to turn on by the rule in the module docstring, judged against
    ``rows["card_bf16"]``; the settings of the one with the fewest bf16 layers, or what is
    missing."""
    card = rows["card_bf16"]
    bounds = {
        "max_abs_score_diff": max(SCORE_FLOOR, 2 * card["max_abs_score_diff"]),
        "top1_agreement": card["top1_agreement"] - TOP1_MARGIN,
        "spearman_mean": card["spearman_mean"] - SPEARMAN_MARGIN,
    }
    fp8 = {name: a for name, a in rows.items() if name.startswith("engine_fp8")}

    def misses(a: dict[str, float]) -> list[str]:
        out = []
        if a["max_abs_score_diff"] > bounds["max_abs_score_diff"]:
            out.append(f"max |score diff| {a['max_abs_score_diff']:.3f} > "
                       f"{bounds['max_abs_score_diff']:.3f}")  # fmt: skip
        if a["top1_agreement"] < bounds["top1_agreement"]:
            out.append(f"top-1 {a['top1_agreement']:.3f} < {bounds['top1_agreement']:.3f}")
        if a["spearman_mean"] < bounds["spearman_mean"]:
            out.append(f"Spearman {a['spearman_mean']:.3f} < {bounds['spearman_mean']:.3f}")
        return out

    missing = {name: misses(a) for name, a in fp8.items()}
    safe = [name for name, m in missing.items() if not m]

    def bf16_layers(name: str) -> int:
        return int(path_options(name.removeprefix("engine_")).get("fp8_bf16_last_layers", 99))

    verdict: dict[str, Any] = {"fp8_bounds": bounds, "fp8_safe": safe}
    if safe:
        best = min(safe, key=bf16_layers)
        options = path_options(best.removeprefix("engine_"))
        settings = f"RERANK_LAYERS={options['layers']}"
        if "fp8_bf16_last_layers" in options:
            settings += f" RERANK_FP8_BF16_LAST_LAYERS={options['fp8_bf16_last_layers']}"
        verdict["advice"] = f"FP8 is safe to turn on for this checkpoint: {settings}"
    elif fp8:
        verdict["fp8_missing"] = missing
        verdict["advice"] = (
            "no FP8 way measured is safe for this checkpoint: keep RERANK_LAYERS=auto. One "
            "would be once it stays within every bound of fp8_bounds (fp8_missing says by "
            "how much each misses): try more bf16 last layers (fp8-lastN, a larger N), and "
            "measure the trained checkpoint itself (--model DIR), since random weights "
            "drift far more than the published trained-checkpoint figures (docs/engine.md)"
        )
    else:
        verdict["advice"] = "no FP8 way was measured (--layers names none)"
    return verdict


def engine_logits(loaded: LoadedModel, pairs: list[EncodedPair]) -> tuple[list[float], float]:
    """The engine scorer's logits, 8 requests a batch, and its warm-up seconds."""
    t0 = time.perf_counter()
    loaded.scorer.warmup(loaded.encoder)
    warm = time.perf_counter() - t0
    logits: list[float] = []
    step = CHUNK_REQUESTS * DOCS
    for i in range(0, len(pairs), step):
        logits += loaded.scorer.score(pairs[i : i + step])
    return logits, warm


def add_workload_arguments(parser: argparse.ArgumentParser, pairs: int) -> None:
    """The random model and its requests: --tokenizer, --config, --pairs (default
    ``pairs``), --init-range and --seed."""
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--config", default="0.6b", help="one of " + ", ".join(CONFIGS))
    parser.add_argument("--pairs", type=positive_int, default=pairs)
    parser.add_argument("--init-range", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)


def random_model_config(args: argparse.Namespace) -> dict[str, Any]:
    """``--config``'s shape, initialised with ``--init-range`` so that scores spread."""
    config: dict[str, Any] = json.loads(CONFIGS.get(args.config, Path(args.config)).read_text())
    config["initializer_range"] = args.init_range
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_arguments(parser, pairs=512)
    parser.add_argument(
        "--layers",
        default="compiled,kernels,fp8",
        help="ways to run, comma-separated: layer paths, fp8-lastN, fp8-normed-lastN",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="a checkpoint folder instead of random weights"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the engine's bf16 and FP8 paths need CUDA")
    emit(gpu=torch.cuda.get_device_name(), torch=torch.__version__, config=args.config)
    emit(**check_fp8_rounding())
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    config = random_model_config(args)
    raw = synthetic_requests(tokenizer_dir, args.pairs, DOCS, args.seed)
    logits: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or Path(tmp)
        if args.model is None:
            build_random_model(config, tokenizer_dir, folder, "cuda", args.seed)
        pairs: list[EncodedPair] | None = None
        for layers in args.layers.split(","):
            options = ModelOptions(model=str(folder), cuda_graphs="off", **path_options(layers))
            loaded = load_model(options)
            if pairs is None:  # every path has the same encoder: encode once
                pairs = [p for q, docs in raw for p in loaded.encoder.encode(q, docs, None)]
            name = f"engine_{layers}"
            logits[name], warm = engine_logits(loaded, pairs)
            emit(variant=name, warmup_s=warm)
            del loaded
            torch.cuda.empty_cache()
        assert pairs is not None, "--layers names at least one path"
        logits["card_bf16"] = reference_logits(folder, pairs, torch.bfloat16)
        truth = reference_logits(folder, pairs, torch.float32)
    truth_scores = [sigmoid(x) for x in truth]
    spread = [statistics.pstdev(truth_scores[i : i + DOCS]) for i in range(0, len(pairs), DOCS)]
    emit(pairs=len(pairs), score_spread_within_request_mean=statistics.fmean(spread))
    card = agreement([sigmoid(x) for x in logits["card_bf16"]], truth_scores)
    rows = {}
    for name, values in logits.items():
        a = rows[name] = agreement([sigmoid(x) for x in values], truth_scores)
        no_worse = (
            a["max_abs_score_diff"] <= card["max_abs_score_diff"]
            and a["top1_agreement"] >= card["top1_agreement"]
            and a["spearman_mean"] >= card["spearman_mean"]
        )
        emit(variant=name, vs="card_fp32", **a, no_worse_than_card_bf16=no_worse)
    print(json.dumps(fp8_verdict(rows)))


if __name__ == "__main__":
    main()
