"""Options that choose and shape the scoring model (device, dtype, limits, fast paths)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
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
    """

    model: str = "Qwen/Qwen3-Reranker-0.6B"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    max_pair_tokens: int = 8192
    compile: str = "auto"
    packed: str = "auto"
    cuda_graphs: str = "auto"
    cuda_graph_max_tokens: int = 8192
    layers: str = "auto"
    fp8_bf16_last_layers: int = 4
    tokenizer_backend: str = "auto"
    default_instruction: str = DEFAULT_INSTRUCTION
