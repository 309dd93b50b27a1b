"""How fast a prompt encoder tokenizes: synthetic requests through ``encode``, timed.

Used by the benchmark to show that CPU tokenization is not the bottleneck.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from consumer.runtime.prompt import PromptEncoder

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "it",
    "from",
    "at",
    "this",
    "be",
    "are",
    "an",
    "or",
    "was",
    "which",
    "model",
    "search",
    "query",
    "document",
    "ranking",
    "retrieval",
    "kafka",
    "batch",
    "token",
    "latency",
    "throughput",
    "gpu",
    "cpu",
    "data",
    "neural",
    "network",
    "language",
    "reranker",
    "relevance",
    "passage",
    "answer",
    "question",
    "system",
    "service",
    "worker",
    "北京",
    "东京",
    "数据",
    "模型",
    "检索",
    "查询",
    "文档",
    "排序",
    "😀",
    "🚀",
    "café",
    "naïve",
    "résumé",
    "2024",
    "3.14",
    "42",
]


@dataclass(frozen=True)
class EncoderThroughput:
    """Result of :func:`measure_encoder_throughput`."""

    pairs: int
    tokens: int
    seconds: float

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def synthetic_requests(
    requests: int, docs_per_request: int, doc_words: tuple[int, int], seed: int
) -> list[tuple[str, list[str]]]:
    """Deterministic (query, documents) requests of mixed English, CJK and emoji words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))

    return [
        (text(4, 24), [text(*doc_words) for _ in range(docs_per_request)]) for _ in range(requests)
    ]


def measure_encoder_throughput(
    encoder: PromptEncoder,
    requests: int = 256,
    docs_per_request: int = 8,
    doc_words: tuple[int, int] = (30, 400),
    seed: int = 0,
) -> EncoderThroughput:
    """Encode synthetic requests (as the service does: one call per request) and time it."""
    work = synthetic_requests(requests, docs_per_request, doc_words, seed)
    t0 = time.perf_counter()
    tokens = pairs = 0
    for query, docs in work:
        for pair in encoder.encode(query, docs, None):
            tokens += pair.tokens
            pairs += 1
    return EncoderThroughput(pairs, tokens, max(time.perf_counter() - t0, 1e-9))
