"""FP8 score drift by scale granularity, emulated in float32: no GPU needed.

    python -m benchmarks.fp8_emulation [--tokenizer DIR] [--config 0.6b] [--pairs 64]
        [--variants row,block128,tensor,row-bf16-ends4]

Issue 14 asks for per-row or per-block FP8 scales, chosen by measurement. On a GPU,
``benchmarks.drift`` measures the engine's FP8 path (per-row scales) against the model
card's recipe in fp32. This script asks the question before any kernel exists: it runs
the model card's recipe (transformers, one pair at a time) in float32, with the inputs and
the weights of every linear layer of the decoder rounded to e4m3 as an FP8 GEMM would see
them, and compares the scores with the same recipe unrounded (the truth) and with the
recipe in bfloat16 (the yardstick the agreement rule holds FP8 to).

Variants (each rounds both operands of all seven projections of each layer):

* ``row``: a scale per token (activations) and per output channel (weights), over the
  whole reduction: what the engine's FP8 path does;
* ``block128``: a scale per token and 128 input channels, and per 128 x 128 weight tile
  (the DeepSeek-V3 recipe);
* ``tensor``: one scale per tensor;
* any of them with ``-bf16-firstN``, ``-bf16-lastN`` or ``-bf16-endsN``: the first N, the
  last N, or the first and the last N decoder layers left unrounded.

The model is built with random weights as ``benchmarks.drift`` builds it
(``initializer_range`` 0.05, so that scores spread). The product's FP8 rounding matches
torch's ``float8_e4m3fn`` conversion of the same scaled values (``benchmarks.drift``
checks that on the GPU), which is what this script uses; the matrix products accumulate
in float32 here as they do on the GPU, but their outputs are not rounded to bf16, so this
measures the rounding of FP8's inputs alone.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks.drift import (
    DOCS,
    add_workload_arguments,
    agreement,
    emit,
    random_model_config,
)
from benchmarks.gpu_check import card_recipe_logits, yes_no_ids
from benchmarks.host import cpu_model
from benchmarks.workload import (
    build_random_model,
    default_tokenizer_dir,
    synthetic_requests,
)
from consumer.runtime.options import DEFAULT_INSTRUCTION
from consumer.runtime.prompt import Qwen3RerankerEncoder
from consumer.runtime.scorer import sigmoid

E4M3_MAX = 448.0
BLOCK = 128
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def round_e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``x`` scaled so that ``amax`` maps to e4m3's largest value, rounded, scaled back."""
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"block scales need a multiple of {BLOCK} channels, not {x.shape[-1]}")
    return x.unflatten(-1, (-1, BLOCK))


def round_activations(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Activations ``[..., K]`` rounded with a scale per token (``row``), per token and
    128 channels (``block128``) or one for the tensor (``tensor``)."""
    if granularity == "tensor":
        return round_e4m3(x, x.abs().amax())
    if granularity == "row":
        return round_e4m3(x, x.abs().amax(-1, keepdim=True))
    blocks = _blocks(x)
    return round_e4m3(blocks, blocks.abs().amax(-1, keepdim=True)).flatten(-2)


def round_weight(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """A weight ``[N, K]`` rounded with a scale per output channel (``row``), per
    128 x 128 tile (``block128``) or one for the tensor (``tensor``)."""
    if granularity == "tensor":
        return round_e4m3(w, w.abs().amax())
    if granularity == "row":
        return round_e4m3(w, w.abs().amax(-1, keepdim=True))
    n, k = w.shape
    if n % BLOCK or k % BLOCK:
        raise ValueError(f"tile scales need multiples of {BLOCK}, not a {n} x {k} weight")
    tiles = w.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    return round_e4m3(tiles, tiles.abs().amax(dim=(1, 3), keepdim=True)).reshape(n, k)


def parse_variant(name: str) -> tuple[str, int, int]:
    """``block128-bf16-ends4`` -> ("block128", 4, 4): the granularity, and how many of the
    first and of the last decoder layers are left unrounded."""
    granularity, _, kept = name.partition("-bf16-")
    if granularity not in ("row", "block128", "tensor"):
        raise SystemExit(f"unknown granularity in variant {name!r}")
    if not kept:
        return granularity, 0, 0
    match = re.fullmatch(r"(first|last|ends)(\d+)", kept)
    if match is None:
        raise SystemExit(f"variant {name!r}: say -bf16-firstN, -bf16-lastN or -bf16-endsN")
    where, n = match[1], int(match[2])
    return granularity, n if where != "last" else 0, n if where != "first" else 0


def rounded_linear(linear: torch.nn.Linear, granularity: str) -> Callable[[torch.Tensor], Any]:
    """A forward for ``linear`` that sees both operands as an FP8 GEMM would."""
    weight = round_weight(linear.weight.detach().float(), granularity)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(round_activations(x, granularity), weight, linear.bias)

    return forward


def apply_variant(model: Any, variant: str) -> None:
    """Round the projections of ``model``'s decoder layers as ``variant`` says."""
    granularity, first, last = parse_variant(variant)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        if index < first or index >= len(layers) - last:
            continue
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                module = getattr(parent, name, None)
                if module is not None:
                    module.forward = rounded_linear(module, granularity)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_arguments(parser, pairs=64)
    parser.add_argument("--variants", default="row,block128,tensor")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for variant in variants:
        parse_variant(variant)  # a typo fails before the model is built
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    emit(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        config=args.config,
    )
    config = random_model_config(args)
    raw = synthetic_requests(tokenizer_dir, args.pairs, DOCS, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        build_random_model(config, tokenizer_dir, Path(folder), "cpu", args.seed)
        yes_no = yes_no_ids(Path(folder))
        tok = AutoTokenizer.from_pretrained(folder)
        encoder = Qwen3RerankerEncoder(tok, 8192, DEFAULT_INSTRUCTION, "huggingface")
        payloads: list[list[int]] = [
            cast(list[int], p.payload) for q, docs in raw for p in encoder.encode(q, docs, None)
        ]

        def run(dtype: torch.dtype, variant: str | None) -> list[float]:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            if variant is not None:
                try:
                    apply_variant(model, variant)
                except ValueError as exc:  # block scales on a shape they do not divide
                    raise SystemExit(f"variant {variant}: {exc}") from None
            t0 = time.perf_counter()
            logits = card_recipe_logits(model, yes_no, payloads, "cpu")
            emit(
                variant=variant or f"card_{str(dtype).removeprefix('torch.')}",
                seconds=time.perf_counter() - t0,
            )
            return logits

        truth = [sigmoid(x) for x in run(torch.float32, None)]
        results = {"card_bfloat16": run(torch.bfloat16, None)}
        for variant in variants:
            results[variant] = run(torch.float32, variant)
    emit(pairs=len(payloads))
    for name, logits in results.items():
        emit(variant=name, vs="card_fp32", **agreement([sigmoid(x) for x in logits], truth))


if __name__ == "__main__":
    main()
