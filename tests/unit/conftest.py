"""Session-scoped tiny models for the unit tests (built once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import (
    build_tiny_bert_cross_encoder,
    build_tiny_qwen3_reranker,
    build_tiny_seqcls_from,
)


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3ForCausalLM reranker with the real Qwen3 tokenizer."""
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def tiny_seqcls_dir(tmp_path_factory: pytest.TempPathFactory, tiny_causal_dir: Path) -> Path:
    """The same tiny reranker converted to Qwen3ForSequenceClassification."""
    return build_tiny_seqcls_from(tiny_causal_dir, tmp_path_factory.mktemp("tiny-seqcls"))


@pytest.fixture(scope="session")
def tiny_bert_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT cross-encoder (non-Qwen3 seq-cls)."""
    return build_tiny_bert_cross_encoder(tmp_path_factory.mktemp("tiny-bert-ce"))
