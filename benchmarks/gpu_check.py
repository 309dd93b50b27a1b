"""GPU parity check: packed vs padded vs model-card reference on a random 0.6B-shaped model.

    python -m benchmarks.gpu_check TOKENIZER_DIR [N_PAIRS] [--config 0.6b|4b|8b|tiny]
        [--tiny] [--padded-compiled] [--variants packed_compiled,padded_eager,...]

Builds Qwen3ForCausalLM with random weights from a released config (``--config``, default
the 0.6B; benchmarks/configs/), saves it with the tokenizer into a temp
folder, loads it through :func:`consumer.runtime.loader.load_model` several ways
(packed+compiled, packed eager, packed with the fused row kernels (``layers=kernels``),
packed+compiled with CUDA graphs large enough for every batch, padded eager;
``--padded-compiled`` adds the padded path compiled, which takes minutes;
packed with FP8 linear layers where the GPU has them is reported but not judged: its
drift is measured by ``benchmarks.drift``) and scores ~64 mixed pairs (lengths
from a few to a few thousand tokens, CJK, emoji, truncated documents) in batches of
several sizes (the pairs of one request share their head in the packed batches; see
``check_batches``), one batch after another and all launched before any is collected. The
reference is the model card's way: one pair at a time, HF forward, full-vocabulary
logits at the last token. Prints JSON lines; exits 1 when a score
differs from the reference by more than ``SCORE_TOL``.

Needs only torch, transformers and this package (no Kafka or metrics dependencies).
``--tiny`` shrinks the model to toy size; without CUDA the script runs only the padded
eager path on CPU in float32 (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks.workload import CONFIGS, build_random_model
from consumer.runtime.loader import LoadedModel, load_model
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import EncodedPair
from consumer.runtime.qwen3.fused_layers import fp8_supported
from consumer.runtime.scorer import sigmoid

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# bf16 noise at toy size; at the full 0.6B depth the model card's own bf16 run is ~0.03
# from its float32 run, so the bound there is twice that (see main)
SCORE_TOL = 0.02
QUEUED_TOL = 1e-3  # logits launched ahead vs one by one: same kernels, same inputs
MAX_PAIR_TOKENS = 1024  # small enough that the longest documents below get truncated


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_model(folder: Path, tokenizer_dir: Path, config_name: str) -> None:
    """A random-weight checkpoint of a released shape (seeded) plus the real tokenizer."""
    config = json.loads(CONFIGS[config_name].read_text())
    # spread the random yes/no logits a little
    config["initializer_range"] = 0.1 if config_name == "tiny" else 0.05
    build_random_model(config, tokenizer_dir, folder, DEVICE, seed=0)


def mixed_requests(tokenizer: object, n_pairs: int) -> list[tuple[str, list[str], str | None]]:
    """Requests of 8 documents: random-token text of very different lengths, CJK and emoji."""
    rng = random.Random(0)

    def text(n: int) -> str:
        return str(tokenizer.decode([rng.randrange(1000, 100000) for _ in range(n)]))  # type: ignore[attr-defined]

    extras = ["北京烤鸭是北京最有名的菜。", "Rocket 🚀 launch 🌕", "", "x"]
    requests: list[tuple[str, list[str], str | None]] = []
    for r in range(max(1, n_pairs // 8)):
        docs = [text(rng.choice((3, 40, 200, 600, 1500, 3000))) for _ in range(7)]
        docs.append(extras[r % len(extras)])
        instruction = None if r % 2 else "Judge relevance for a technical question"
        requests.append((text(rng.randint(4, 40)), docs, instruction))
    return requests


def yes_no_ids(folder: Path) -> tuple[int, int]:
    """The token ids of "yes" and "no" in the tokenizer saved in ``folder``."""
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(str(folder))
    return tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")


@torch.inference_mode()
def card_recipe_logits(
    model: Any, yes_no: tuple[int, int], payloads: Sequence[Sequence[int]], device: str = DEVICE
) -> list[float]:
    """The model card's recipe on a loaded causal LM: one pair at a time, the yes minus
    the no logit of the full-vocabulary logits at the last token."""
    yes, no = yes_no
    out = []
    for payload in payloads:
        ids = torch.tensor([list(payload)], device=device)
        logits = model(input_ids=ids).logits[0, -1].float()
        out.append(float(logits[yes] - logits[no]))
    return out


def reference_logits(
    folder: Path, pairs: list[EncodedPair], dtype: torch.dtype = DTYPE
) -> list[float]:
    """Model card: HF causal LM, one pair at a time, full-vocabulary logits at the last token."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    payloads = [cast(list[int], pair.payload) for pair in pairs]
    return card_recipe_logits(model.to(DEVICE).eval(), yes_no_ids(folder), payloads)


def check_batches(pairs: list[EncodedPair]) -> list[list[int]]:
    """Pair indices in batches: the first two requests alone (8 pairs sharing a head, small
    enough for a CUDA graph), then the other pairs length-sorted in batches of 1, 7 and
    the rest (the rest too large for a graph)."""
    requests = [list(range(0, 8)), list(range(8, 16))]
    order = sorted(range(16, len(pairs)), key=lambda i: pairs[i].tokens)
    cuts = [0, 1, 8, len(order)]
    return [*requests, *(order[lo:hi] for lo, hi in itertools.pairwise(cuts))]


def graphs_for_every_batch(pairs: list[EncodedPair]) -> int:
    """A largest CUDA graph that holds every batch of :func:`check_batches` (1,024-token steps)."""
    largest = max(sum(pairs[i].tokens for i in batch) for batch in check_batches(pairs))
    return -(-largest // 1024) * 1024


def score_in_batches(loaded: LoadedModel, pairs: list[EncodedPair]) -> tuple[list[float], float]:
    """Scores of every pair, batch after batch (see check_batches)."""
    logits = [0.0] * len(pairs)
    sync()
    t0 = time.perf_counter()
    for batch in check_batches(pairs):
        for i, x in zip(batch, loaded.scorer.score([pairs[i] for i in batch]), strict=True):
            logits[i] = x
    sync()
    return logits, time.perf_counter() - t0


def launch_all_then_collect(loaded: LoadedModel, pairs: list[EncodedPair]) -> list[float]:
    """The same batches as the engine drives a pipelined scorer, all queued at once.

    Every batch is launched before the first is collected (the engine goes two deep), so
    a batch that reads another's buffers (e.g. a CUDA graph's shared output) shows here.
    """
    scorer = loaded.scorer
    batches = check_batches(pairs)
    handles = [scorer.launch(scorer.prepare([pairs[i] for i in b])) for b in batches]
    logits = [0.0] * len(pairs)
    for batch, handle in zip(batches, handles, strict=True):
        for i, x in zip(batch, scorer.collect(handle), strict=True):
            logits[i] = x
    return logits


def max_diff(a: list[float], b: list[float], calibrate: bool) -> float:
    if calibrate:
        a, b = [sigmoid(x) for x in a], [sigmoid(x) for x in b]
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# name: (packed, compile, layers, whether CUDA graphs take every batch of check_batches,
# sized once the pairs are known; else the default largest graph)
Variant = tuple[str, str, str, bool]
VARIANTS: dict[str, Variant] = {
    "packed_compiled": ("on", "on", "auto", False),
    "packed_eager": ("on", "off", "auto", False),
    "packed_kernels": ("on", "auto", "kernels", False),
    # the batch of the longest pairs fits no default graph: here it replays one (its
    # capture takes a graph per 1,024 tokens up to that batch: minutes at 8B, 256 pairs)
    "packed_large_graphs": ("on", "on", "auto", True),
    "padded_eager": ("off", "off", "auto", False),
    "packed_fp8": ("on", "auto", "fp8", False),  # reported only (benchmarks.drift judges it)
    "padded_compiled": ("off", "on", "auto", False),  # minutes: only when asked
}


def select_variants(padded_compiled: bool, names: list[str] | None) -> dict[str, Variant]:
    """The ways to run, by name: ``names`` if given, else every way this device has
    (``padded_compiled`` only when asked); on a CPU only the padded eager path."""
    if DEVICE != "cuda":
        return {"padded_eager": VARIANTS["padded_eager"]}
    if names is None:
        names = [n for n in VARIANTS if n != "padded_compiled" or padded_compiled]
    if "packed_fp8" in names and not fp8_supported(DEVICE):
        names = [n for n in names if n != "packed_fp8"]
    return {name: VARIANTS[name] for name in names}


def variant_names(text: str) -> list[str]:
    """``--variants``: comma-separated names of :data:`VARIANTS`."""
    given = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(given - set(VARIANTS))
    if unknown or not given:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(VARIANTS)
        )
    names = [n for n in VARIANTS if n in given]  # in the order they run
    if names[0] == "packed_large_graphs":
        raise argparse.ArgumentTypeError(
            "packed_large_graphs sizes its graphs from the pairs another way encodes first: "
            "name one more (packed_compiled)"
        )
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` without the program's name."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("tokenizer_dir", type=Path)
    p.add_argument("n_pairs", type=int, nargs="?", default=64)
    p.add_argument("--config", default="0.6b", choices=sorted(CONFIGS), help="model shape")
    p.add_argument("--tiny", action="store_true", help="the same as --config tiny")
    p.add_argument("--padded-compiled", action="store_true", help="also the padded path compiled")
    p.add_argument(
        "--variants",
        type=variant_names,
        default=None,
        help="only these ways (comma-separated; the model card's bf16 and fp32 runs always "
        "run): " + ", ".join(VARIANTS),
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.config = "tiny"
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    tokenizer_dir, n_pairs, padded_compiled = args.tokenizer_dir, args.n_pairs, args.padded_compiled
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else None
    emit(
        torch=torch.__version__, device=DEVICE, gpu=gpu, cuda=torch.version.cuda, config=args.config
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"qwen3-reranker-{args.config}-random"
        build_model(folder, tokenizer_dir, args.config)
        variants = select_variants(padded_compiled, args.variants)
        default_graphs = ModelOptions.cuda_graph_max_tokens
        results: dict[str, list[float]] = {}
        worst_queued = 0.0  # launch/collect vs score: the same computation, so ~equal
        pairs: list[EncodedPair] = []
        for name, (packed, compile_, layers, large_graphs) in variants.items():
            options = ModelOptions(
                model=str(folder),
                max_pair_tokens=MAX_PAIR_TOKENS,
                packed=packed,
                compile=compile_,
                layers=layers,
                cuda_graph_max_tokens=(
                    graphs_for_every_batch(pairs) if large_graphs else default_graphs
                ),
            )
            loaded = load_model(options)
            if not pairs:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(folder))
                for query, docs, instruction in mixed_requests(tok, n_pairs):
                    pairs += loaded.encoder.encode(query, docs, instruction)
                lengths = [p.tokens for p in pairs]
                emit(
                    pairs=len(pairs),
                    min_len=min(lengths),
                    max_len=max(lengths),
                    truncated=sum(p.truncated for p in pairs),
                )
            t0 = time.perf_counter()
            loaded.scorer.warmup(loaded.encoder)
            warm_s = time.perf_counter() - t0
            score_in_batches(loaded, pairs)  # first pass may still specialize shapes
            results[name], seconds = score_in_batches(loaded, pairs)
            queued = launch_all_then_collect(loaded, pairs)
            queued_diff = max_diff(queued, results[name], calibrate=False)
            worst_queued = max(worst_queued, queued_diff)
            emit(compare=f"{name} launched ahead vs one by one", max_abs_logit_diff=queued_diff)
            emit(
                variant=name,
                packed=loaded.scorer.traits.packed,
                warmup_s=round(warm_s, 1),
                score_s=round(seconds, 3),
                batch_cost=loaded.scorer.batch_cost(pairs),
                real_tokens=sum(p.tokens for p in pairs),
            )
            del loaded
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        results["reference"] = reference_logits(folder, pairs)
        truth = reference_logits(folder, pairs, torch.float32)
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            emit(
                compare=f"{a} vs {b}",
                max_abs_logit_diff=round(max_diff(results[a], results[b], False), 5),
                max_abs_score_diff=round(max_diff(results[a], results[b], True), 5),
            )
    # Low precision is judged against the model card in float32: each way must be about as
    # close to it as the model card's own run in the same precision is.
    errors = {name: max_diff(logits, truth, calibrate=True) for name, logits in results.items()}
    low_precision = DTYPE in (torch.bfloat16, torch.float16)
    allowed = max(SCORE_TOL, 2 * errors["reference"]) if low_precision else SCORE_TOL
    for name, error in errors.items():
        emit(compare=f"{name} vs reference_fp32", max_abs_score_diff=round(error, 5))
    # FP8 drifts by design; benchmarks.drift measures how far (docs/benchmarks.md)
    worst = max((error for name, error in errors.items() if name != "packed_fp8"), default=0.0)
    queued_ok = worst_queued <= QUEUED_TOL
    spread = max(truth) - min(truth)
    emit(
        reference_logit_spread=round(spread, 3),
        worst_score_diff_vs_fp32=round(worst, 5),
        allowed=round(allowed, 5),
        launched_ahead_ok=queued_ok,
        ok=worst <= allowed and queued_ok,
    )
    if DEVICE == "cuda":
        emit(max_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    return 0 if worst <= allowed and queued_ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
