"""The packed (padding-free) Qwen3 forward for CUDA, with its CUDA graphs and Triton kernels.

layout (one batch as one stream, shared prefixes once) -> forward (the decoder stack over
it) using layers (one decoder layer as compiled functions), attention (the varlen
contracts), varlen_attention_kernel and qk_rope_kernel (Triton), graphs (CUDA graphs of
small batches).
"""
