"""Options that choose and shape the scoring model (device, dtype, limits, fast paths)."""

from __future__ import annotations

from pydantic import Field
from pydantic.dataclasses import dataclass as checked_dataclass

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@checked_dataclass(frozen=True)
class ModelOptions:
    """How to load and run the scoring model.

    ``"auto"`` values are resolved by :mod:`consumer.runtime.loader`:
    device -> cuda if available else cpu; dtype -> bfloat16 on cuda, float32 on cpu;
    attn_implementation -> sdpa; compile -> on for cuda, off for cpu;
    packed -> the padding-free varlen path when on cuda and
    FlashAttention's varlen op exists (Qwen3 models only), else padded batches;
    cuda_graphs -> small packed batches replayed from CUDA graphs when packed is on;
    cuda_graph_max_tokens -> the largest batch (stream tokens) a graph is captured for;
    layers -> how the packed path runs each decoder layer: "compiled" (torch.compile
    regions), "kernels" (fused row kernels around model-dtype GEMMs) or "fp8" (the same
    with FP8 linear layers; Hopper or newer); auto -> compiled;
    fp8_bf16_last_layers -> with an FP8 layer path, how many of the last decoder layers
    keep model-dtype linear layers (embeddings, norms and the yes/no head always do);
    tokenizer_backend -> how Qwen3 prompts become ids: "tiktoken", "huggingface", or
    auto (tiktoken when it reproduces the model's tokenizer; see
    :mod:`consumer.runtime.bpe`).
    ``model_name`` is what replies call the model; None: the hub id, or a folder's last part
    (:func:`consumer.runtime.loader.model_name`), never a path.
    """

    model: str = Field(default="Qwen/Qwen3-Reranker-0.6B", min_length=1)
    model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = Field(default="auto", min_length=1)
    max_pair_tokens: int = Field(default=8192, gt=0)
    compile: str = "auto"
    packed: str = "auto"
    cuda_graphs: str = "auto"
    cuda_graph_max_tokens: int = Field(default=8192, ge=512)
    layers: str = "auto"
    fp8_bf16_last_layers: int = Field(default=4, ge=0)
    tokenizer_backend: str = "auto"
    default_instruction: str = Field(default=DEFAULT_INSTRUCTION, min_length=1)
