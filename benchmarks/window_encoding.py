"""How long the prompt encoder takes on long documents: truncating against splitting into
windows, on the CPU alone (no model).

    python -m benchmarks.window_encoding [--tokenizer DIR] [--workload rag-long]
        [--pairs 1024] [--max-pair-tokens 2048] [--rounds 5] [--backends tiktoken,huggingface]

Builds the workload's requests (benchmarks.workload, the real Qwen3 tokenizer), then for
each tokenizer backend times ``encode`` (documents over the window are cut) and
``encode_windows`` (they become overlapping windows, each with the characters it covers)
over every request, one thread, ``--rounds`` times; prints the median per request and the
pairs each way makes, with the machine and library versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

from benchmarks.host import cpu_model, positive_int
from benchmarks.workload import WORKLOADS, default_tokenizer_dir, workload_named, workload_requests
from consumer.engine.settings import EngineSettings
from consumer.runtime.options import DEFAULT_INSTRUCTION
from consumer.runtime.prompt import EncodedPair, Qwen3RerankerEncoder

QUERY_INSTRUCTION = None  # the default instruction, as most requests use it


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--workload", type=workload_named, default=WORKLOADS["rag-long"])
    parser.add_argument("--pairs", type=positive_int, default=1024)
    parser.add_argument("--max-pair-tokens", type=positive_int, default=2048)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--backends", default="tiktoken,huggingface")
    return parser.parse_args(argv)


Pairs = list[EncodedPair]
Encode = Callable[[str, list[str]], Pairs]


def timed(encode: Encode, requests: list[tuple[str, list[str]]], rounds: int) -> tuple[float, int]:
    """(median seconds for all requests, pairs made)."""
    seconds, pairs = [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        pairs = sum(len(encode(query, docs)) for query, docs in requests)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), pairs


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    requests = workload_requests(tokenizer_dir, args.workload, args.pairs, seed=0)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    defaults = EngineSettings()
    overlap, most = defaults.window_overlap_tokens, defaults.max_windows_per_document
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"tokenizers {version('tokenizers')}, tiktoken {version('tiktoken')}")  # fmt: skip
    print(f"workload {args.workload.name}: {len(requests)} requests, "
          f"{sum(len(d) for _, d in requests)} documents; window {args.max_pair_tokens} tokens, "
          f"overlap {overlap}, at most {most} windows; median of {args.rounds} rounds")  # fmt: skip
    for backend in args.backends.split(","):
        encoder = Qwen3RerankerEncoder(hf, args.max_pair_tokens, DEFAULT_INSTRUCTION, backend)

        def truncating(query: str, docs: list[str], e: Qwen3RerankerEncoder = encoder) -> Pairs:
            return e.encode(query, docs, QUERY_INSTRUCTION)

        def windows(query: str, docs: list[str], e: Qwen3RerankerEncoder = encoder) -> Pairs:
            return e.encode_windows(query, docs, QUERY_INSTRUCTION, overlap, most)

        cut, cut_pairs = timed(truncating, requests, args.rounds)
        split, split_pairs = timed(windows, requests, args.rounds)
        per_request = 1000 / len(requests)
        print(f"{encoder.backend:12} truncating {cut * per_request:7.2f} ms a request "
              f"({cut_pairs} pairs)   windows {split * per_request:7.2f} ms a request "
              f"({split_pairs} pairs)   windows/truncating {split / cut:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
