"""Micro-benchmark of the request/reply codec: ``python -m benchmarks.codec_bench``.

Decodes a request of 8 documents of 1 KB each and encodes its success reply, in a
loop on one core, and prints requests per second. A probe, not a test.
"""

from __future__ import annotations

import argparse
import random
import string
import time

import orjson

from consumer.service.codec import (
    DecodedRequest,
    RequestLimits,
    decode_request,
    encode_success,
    reply_headers,
)


def _sample_request(documents: int, doc_bytes: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + " "
    docs = ["".join(rng.choices(alphabet, k=doc_bytes)) for _ in range(documents)]
    body = {"query": "what is a reranker?", "documents": docs, "top_n": 5}
    headers = [
        ("correlation-id", b"0f8fad5b-d9cb-469f-a165-70867728950e"),
        ("reply-topic", b"rerank.replies"),
        ("deadline-ms", str(int(time.time() * 1000) + 30_000).encode()),
    ]
    return orjson.dumps(body), headers


def run(iterations: int, documents: int, doc_bytes: int) -> dict[str, float]:
    """Time decode-only, encode-only and decode+encode; returns requests/s for each."""
    value, headers = _sample_request(documents, doc_bytes)
    limits = RequestLimits()
    rng = random.Random(1)
    scores = [rng.random() for _ in range(documents)]
    logits = [s * 10 - 5 for s in scores]

    def decode() -> object:
        return decode_request(value, headers, limits)

    def encode() -> object:
        return encode_success(
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            model="Qwen/Qwen3-Reranker-0.6B",
            documents=docs,
            scores=scores,
            logits=logits,
            top_n=5,
            return_documents=False,
            raw_scores=False,
            prompt_tokens=2960,
            queue_ms=1.5,
            inference_ms=20.25,
            total_ms=23.0,
        ), reply_headers("0f8fad5b-d9cb-469f-a165-70867728950e")

    decoded = decode_request(value, headers, limits)
    if not isinstance(decoded, DecodedRequest):
        raise SystemExit(f"sample request rejected: {decoded}")
    docs = decoded.request.documents

    def both() -> None:
        decode()
        encode()

    rates = {}
    for name, fn in (("decode", decode), ("encode", encode), ("decode+encode", both)):
        for _ in range(min(1000, iterations)):  # warm-up
            fn()
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        rates[name] = iterations / (time.perf_counter() - start)
    return rates


def main() -> None:
    """Print requests/s of the codec."""
    parser = argparse.ArgumentParser(description="codec micro-benchmark")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--doc-bytes", type=int, default=1024)
    args = parser.parse_args()
    rates = run(args.iterations, args.documents, args.doc_bytes)
    print(
        f"{args.documents} documents x {args.doc_bytes} bytes, "
        f"{args.iterations} iterations, one core:"
    )
    for name, rate in rates.items():
        print(f"  {name:14s} {rate:12,.0f} requests/s  ({1e6 / rate:7.2f} us/request)")


if __name__ == "__main__":
    main()
