"""Where a request's host time goes, on this machine: tokenizing and batch preparing.

    python -m benchmarks.lone_path [--tokenizer DIR] [--requests 300]

Times, per 8-document request of the engine bench's workload (median of ``--requests``),
for both tokenizer backends of the service's encoder
(:class:`consumer.runtime.prompt.Qwen3RerankerEncoder`): ``huggingface`` (the model's own
Rust tokenizer) and ``tiktoken`` (the same ids, :mod:`consumer.runtime.bpe`):

* ``encode``: the encoder, called on this thread;
* ``encode via pool``: the same handed to a 4-thread pool and waited for, as the engine does;
* ``pool rate``: 64 requests handed to that pool at once, in thousands of prompt tokens a
  second (what the encoder can feed the model under load);
* ``batch call only`` (huggingface): the tokenizer's own batch call, without the prompts;
* ``split over 4 threads`` (huggingface): the documents split in 4 chunks, each chunk's
  batch call on its own pool thread (the Rust tokenizer releases the GIL);
* ``pack`` and ``pack + graph layout``: the packed stream of the request's 8 pairs
  (:func:`consumer.runtime.qwen3.layout.pack`), then laid out into its CUDA graph bucket;
* ``pack 216 pairs``: the packed stream of 27 requests, a batch the size the engine cuts
  under saturation (the inference thread packs each batch while the GPU runs the last).

Run with ``TOKENIZERS_PARALLELISM=false`` as well: the tokenizer spreads one batch call
over every core unless told not to.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.workload import default_tokenizer_dir, synthetic_requests
from consumer.runtime.options import DEFAULT_INSTRUCTION

if TYPE_CHECKING:
    from consumer.runtime.prompt import Qwen3RerankerEncoder
    from consumer.runtime.qwen3.layout import PackedInputs


def median_ms(work: Callable[[int], object], count: int) -> float:
    times = []
    for i in range(count):
        started = time.perf_counter()
        work(i)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def pool_rate(
    pool: concurrent.futures.ThreadPoolExecutor,
    encoder: Qwen3RerankerEncoder,
    requests: list[tuple[str, list[str]]],
    rounds: int = 5,
) -> float:
    """Best of ``rounds``: thousands of prompt tokens a second, 64 requests on the pool."""
    best = 0.0
    for r in range(rounds):
        chunk = requests[r * 64 : (r + 1) * 64]
        started = time.perf_counter()
        futures = [pool.submit(encoder.encode, q, d, None) for q, d in chunk]
        tokens = sum(p.tokens for f in futures for p in f.result())
        best = max(best, tokens / (time.perf_counter() - started) / 1000)
    return round(best, 1)


def encoder_rows(
    backend: str,
    encoder: Qwen3RerankerEncoder,
    requests: list[tuple[str, list[str]]],
    pool: concurrent.futures.ThreadPoolExecutor,
    n: int,
) -> dict[str, float]:
    """The ``encode``, ``encode via pool`` and ``pool rate`` rows of one backend."""

    def encode(i: int) -> object:
        query, docs = requests[i % len(requests)]
        return encoder.encode(query, docs, None)

    def via_pool(i: int) -> object:
        query, docs = requests[i % len(requests)]
        return pool.submit(encoder.encode, query, docs, None).result()

    return {
        f"encode ({backend})": median_ms(encode, n),
        f"encode via pool ({backend})": median_ms(via_pool, n),
        f"pool rate, k tokens/s ({backend})": pool_rate(pool, encoder, requests),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from consumer.runtime.prompt import Qwen3RerankerEncoder
    from consumer.runtime.qwen3.graphs import lay_out, make_buckets
    from consumer.runtime.qwen3.layout import pack

    directory = args.tokenizer or default_tokenizer_dir()
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    encoders = {
        backend: Qwen3RerankerEncoder(hf_tokenizer, 8192, DEFAULT_INSTRUCTION, backend)
        for backend in ("huggingface", "tiktoken")
    }
    encoder = encoders["huggingface"]
    requests = synthetic_requests(directory, 4096, 8, 0)
    pool = concurrent.futures.ThreadPoolExecutor(4)
    batch = encoder._encode_batch  # the tokenizer's own batch call

    def request(i: int) -> tuple[str, list[str]]:
        return requests[i % len(requests)]

    def documents(i: int) -> list[str]:
        return [" " + d for d in request(i)[1]]

    def split(i: int) -> None:
        docs = documents(i)
        chunks = [docs[k::4] for k in range(4)]
        for f in [pool.submit(batch, c, add_special_tokens=False) for c in chunks if c]:
            f.result()

    pairs = [encoder.encode(q, d, None) for q, d in requests[:64]]
    ids = [[list(p.payload) for p in ps] for ps in pairs]  # type: ignore[call-overload]
    buckets = make_buckets()

    def packed(i: int) -> PackedInputs:
        k = i % len(pairs)
        return pack(ids[k], [p.share_points for p in pairs[k]])

    saturated = [k % len(pairs) for k in range(27)]

    def packed_saturated(i: int) -> PackedInputs:
        rows = [(row, p) for k in saturated for row, p in zip(ids[k], pairs[k], strict=True)]
        return pack([row for row, _ in rows], [p.share_points for _, p in rows])

    def laid_out(i: int) -> object:
        inputs = packed(i)
        return lay_out(inputs, next(b for b in buckets if b.fits(inputs)))

    n = args.requests
    results: dict[str, float] = {}
    for backend, coder in encoders.items():
        results |= encoder_rows(backend, coder, requests, pool, n)
    results["batch call only (huggingface)"] = median_ms(
        lambda i: batch(documents(i), add_special_tokens=False), n
    )
    results["split over 4 threads (huggingface)"] = median_ms(split, n)
    results["pack"] = median_ms(packed, n)
    results["pack + graph layout"] = median_ms(laid_out, n)
    results["pack 216 pairs"] = median_ms(packed_saturated, max(1, n // 10))
    tokens = statistics.mean(sum(p.tokens for p in ps) for ps in pairs)
    print(
        f"{os.cpu_count()} cores, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}"
        f", 8 documents a request, {tokens:.0f} prompt tokens on average; median ms:"
    )
    for name, ms in results.items():
        print(f"  {name:38s} {ms:9.3f}")
    pool.shutdown()


if __name__ == "__main__":
    main()
