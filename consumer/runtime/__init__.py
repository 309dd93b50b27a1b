"""The model runtime: load a checkpoint, turn requests into prompt tokens, score batches.

options (how to load) -> loader (checkpoint -> encoder + scorer) -> prompt (encoders) and
scorer (the protocol the engine drives) with its implementations; the packed Qwen3
forward with its CUDA graphs and Triton kernels is in :mod:`consumer.runtime.qwen3`.
"""
