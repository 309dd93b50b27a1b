"""Varlen attention paths on the packed forward's batches: torch's (FlashAttention-2,
cuDNN, FlashAttention-3 where torch carries it) against the grouped Triton kernel of
``consumer.runtime.qwen3.varlen_attention_kernel`` in several tiles, with Hopper's tensor
memory accelerator (TMA) and warp specialization.

    python -m benchmarks.attention_kernels [--tokens 65536] [--calls 50]
        [--heads 16/8,32/8] [--layouts 8docs,rag] [--tiles 64/32/4/3,128/64/8/3/tma,...]

For each head layout (query/key-value heads, head dim 128: 16/8 is the 0.6B model's,
32/8 the 4B's and 8B's) and each batch layout (``8docs``: requests of 8 pairs, a
60-token template + instruction shared by all requests, a 15-40-token query, tails of
55-495 tokens; ``rag``: requests of 64 pairs with tails of 128-512 tokens; about
``--tokens`` stream tokens each), on random q/k/v, every kernel runs on the same
tensors: its time per call (median of ``--rounds`` timings of ``--calls`` calls, CUDA
events) and its largest difference from FlashAttention-2's output, and, on fresh
inputs, from an fp32 computation of the first segments. FlashAttention-2 and cuDNN read
gathered keys (the gather is not in their time); the Triton kernel reads them in place.
A path that fails prints its error instead. A call is one layer's attention; the model
makes 28 (0.6B) or 36 of them per batch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from consumer.runtime.qwen3.attention import flash_varlen_attention
from consumer.runtime.qwen3.layout import PackedInputs, Prefix, pack
from consumer.runtime.qwen3.varlen_attention_kernel import Tile, grouped_varlen_attention

DIM = 128
TEMPLATE = 60  # template + instruction tokens, shared by every request
# (pairs a request, shortest and longest tail) of each batch layout
LAYOUTS = {"8docs": (8, 55, 495), "rag": (64, 128, 512)}
DEFAULT_TILES = (
    "64/32/4/3",  # the default before Hopper variants
    "64/64/4/3",
    "128/32/4/3",
    "128/64/4/3",
    "128/64/8/3",
    "128/32/8/2",
    "256/32/8/2",
    "64/32/4/3/tma",
    "128/64/8/3/tma",
    "128/32/4/3/tma",
    "64/32/4/3/ws",
    "128/64/8/3/tma/ws",
)


def parse_tile(text: str) -> Tile:
    """``rows/keys/warps/stages[/tma][/ws]``."""
    parts = text.split("/")
    flags = set(parts[4:])
    if len(parts) < 4 or flags - {"tma", "ws"}:
        raise argparse.ArgumentTypeError(f"tile {text!r}: rows/keys/warps/stages[/tma][/ws]")
    rows, keys, warps, stages = (int(x) for x in parts[:4])
    return Tile(rows, keys, warps, stages, tma="tma" in flags, warp_specialize="ws" in flags)


def layout(name: str, tokens: int, seed: int = 0) -> tuple[list[list[int]], list[Prefix]]:
    """Pairs of ``name``'s requests (shared template, each request's query) up to
    ``tokens`` stream tokens; token values are segment labels, never used as ids."""
    pairs_a_request, shortest, longest = LAYOUTS[name]
    rng = random.Random(seed)
    seqs: list[list[int]] = []
    prefixes: list[Prefix] = []
    stream = 0
    request = 0
    while stream < tokens:
        head = [-1] * TEMPLATE + [request] * rng.randint(15, 40)
        stream += len(head) - TEMPLATE
        for _ in range(pairs_a_request):
            tail = rng.randint(shortest, longest)
            seqs.append(head + [0] * tail)
            prefixes.append((TEMPLATE, len(head)))
            stream += tail
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
    """cuDNN's varlen attention (torch's op), causal, keys gathered."""
    out = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu_q, cu_k, max_q, max_k, False, 0.0, True, False, scale=scale
    )
    return out[0]


def expanded(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``kernel`` on keys and values copied to every query head (for kernels without
    grouped heads; the copy is in its time)."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        return kernel(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), *rest)

    return run


def torch_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (the public varlen API, whichever backend
    torch picks): causal as its signature says (``is_causal``, or a window of no keys to
    the right), grouped heads where it takes them."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {"scale": scale} if "scale" in params else {}
    if "is_causal" in params:
        options["is_causal"] = True
    else:
        options["window_size"] = (-1, 0)
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    return out[0] if isinstance(out, tuple) else out


def flash_attention_3_status() -> str:
    """Whether this torch offers FlashAttention-3, and how it answered."""
    try:
        from torch.nn import attention

        impls = attention.list_flash_attention_impls()
        attention.activate_flash_attention_impl("FA3")
        current = attention.current_flash_attention_impl()
        return f"activated {current} (implementations: {impls})"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def time_ms(fn: Callable[[], torch.Tensor], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` calls (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def fp32_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: PackedInputs, segments: int
) -> list[tuple[slice, torch.Tensor]]:
    """fp32 attention of the first ``segments`` segments: (their query rows, output)."""
    out = []
    index = inputs.kv_index if inputs.kv_index is not None else torch.arange(k.shape[0])
    group = q.shape[1] // k.shape[1]
    for s in range(min(segments, inputs.cu_q.numel() - 1)):
        q0, q1 = int(inputs.cu_q[s]), int(inputs.cu_q[s + 1])
        rows = index[int(inputs.cu_k[s]) : int(inputs.cu_k[s + 1])].to(q.device)
        qs = q[q0:q1].float().transpose(0, 1)
        ks = k[rows].float().repeat_interleave(group, 1).transpose(0, 1)
        vs = v[rows].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * DIM**-0.5
        nq, nk = qs.shape[1], ks.shape[1]
        visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append((slice(q0, q1), (scores.softmax(-1) @ vs).transpose(0, 1)))
    return out


def random_qkv(
    tokens: int, heads: int, kv_heads: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(h: int) -> torch.Tensor:
        return torch.randn(tokens, h, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)

    return draw(heads), draw(kv_heads), draw(kv_heads)


def kernels(tiles: list[Tile], with_cudnn: bool) -> dict[str, tuple[bool, Callable[..., Any]]]:
    """name: (reads gathered keys, the call)."""
    out: dict[str, tuple[bool, Callable[..., Any]]] = {
        "flash2": (True, flash_varlen_attention),
        "torch_varlen_attn": (True, torch_varlen),
    }
    if with_cudnn:
        out["cudnn"] = (True, cudnn_attention)
        out["cudnn_expanded_gqa"] = (True, expanded(cudnn_attention))
    for tile in tiles:
        out["triton_" + tile.name] = (False, partial(grouped_varlen_attention, tile=tile))
    return out


def run_case(
    layout_name: str, heads: int, kv_heads: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    seqs, prefixes = layout(layout_name, args.tokens)
    inputs = pack(seqs, prefixes)
    t = inputs.ids.numel()
    q, k, v = random_qkv(t, heads, kv_heads, seed=0)
    fresh = random_qkv(t, heads, kv_heads, seed=1)
    index = (inputs.kv_index if inputs.kv_index is not None else torch.arange(t)).cuda()
    cu_q, cu_k, pieces = inputs.cu_q.cuda(), inputs.cu_k.cuda(), inputs.key_pieces.cuda()
    reference = fp32_reference(*fresh, inputs, segments=40)

    def call(gathered: bool, kernel: Callable[..., Any], q: Any, k: Any, v: Any) -> Any:
        if gathered:
            return partial(
                kernel, q, k[index], v[index], cu_q, cu_k, inputs.max_q, inputs.max_k, DIM**-0.5
            )
        return partial(kernel, q, k, v, cu_q, pieces, inputs.max_q, DIM**-0.5)

    baseline = flash_varlen_attention(
        q, k[index], v[index], cu_q, cu_k, inputs.max_q, inputs.max_k, DIM**-0.5
    )
    rows = []
    for name, (gathered, kernel) in kernels(args.tiles, args.cudnn).items():
        row: dict[str, Any] = {"heads": f"{heads}/{kv_heads}", "layout": layout_name,
                               "kernel": name, "q_tokens": t, "k_tokens": index.numel(),
                               "segments": inputs.cu_q.numel() - 1}  # fmt: skip
        try:
            timed = call(gathered, kernel, q, k, v)
            out = timed()
            row["max_abs_diff_vs_flash2"] = float((out - baseline).abs().max())
            got = call(gathered, kernel, *fresh)()
            row["max_abs_diff_vs_fp32"] = max(
                float((got[rows_].float() - want).abs().max()) for rows_, want in reference
            )
            slow = time_ms(timed, 1, 1) > 20  # cuDNN took ~50 ms a call here before
            row["ms_per_call"] = time_ms(timed, 2 if slow else args.calls, args.rounds)
        except Exception as exc:  # report and go on: this is a comparison
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """ms a call, by kernel (rows) and case (columns); the fastest Triton tile marked."""
    cases = sorted({(r["heads"], r["layout"]) for r in rows})
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = ["| kernel | " + " | ".join(f"{h} {lay}" for h, lay in cases) + " |",
             "|---|" + "---|" * len(cases)]  # fmt: skip
    by = {(r["kernel"], r["heads"], r["layout"]): r for r in rows}
    for name in names:
        cells = []
        for case in cases:
            r = by.get((name, *case), {})
            cells.append(f"{r['ms_per_call']:.3f}" if "ms_per_call" in r else "error")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--heads", default="16/8,32/8", help="query/key-value heads, comma-separated"
    )
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument(
        "--tiles",
        type=lambda text: [parse_tile(t) for t in text.split(",")],
        default=[parse_tile(t) for t in DEFAULT_TILES],
    )
    parser.add_argument("--no-cudnn", dest="cudnn", action="store_false")
    args = parser.parse_args(argv)
    import triton

    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
                      "flash_attention_3": flash_attention_3_status()}), flush=True)  # fmt: skip
    rows = []
    for heads_text in args.heads.split(","):
        heads, kv_heads = (int(x) for x in heads_text.split("/"))
        for layout_name in args.layouts.split(","):
            rows += run_case(layout_name, heads, kv_heads, args)
    print(table(rows))


if __name__ == "__main__":
    main()
