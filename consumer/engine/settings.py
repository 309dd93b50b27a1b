"""The engine's knobs: batching, threads, and the out-of-memory budget policy."""

from __future__ import annotations

from pydantic import Field
from pydantic.dataclasses import dataclass as checked_dataclass


@checked_dataclass(frozen=True)
class EngineSettings:
    """Batching and threading knobs of the engine.

    ``max_batch_tokens`` is in the scorer's cost units (padded tokens, or real tokens
    for packed batches); after an out-of-memory it is lowered by ``oom_budget_factor``,
    never below ``min_batch_tokens``, and raised again by the same factor (never above
    ``max_batch_tokens``) after ``oom_recovery_batches`` successful batches in a row, so
    a passing memory shortage does not cost throughput for the rest of the process.

    ``quick_batch_backlog``: while fewer than this many quick batches' worth of tokens wait,
    batches are cut no bigger than the scorer's quick size (its largest CUDA graph), so a
    moderate load runs in batches that are cheap to issue; 0 always cuts the full budget
    (:mod:`consumer.engine.batcher`).

    ``late_cut``: with the model busy, the batch former cuts the next batch only when the
    model is due to need it (predicted from the batches measured so far), less the
    measured time to prepare and launch a batch and ``late_cut_margin_ms``, so the batch
    takes every request that waits by then instead of committing early to the first one;
    False cuts it as soon as the slot ahead is free (:mod:`consumer.engine.pacing`).

    ``split_long_documents``: a request that does not say gets its documents that do not fit
    the model scored as overlapping windows (True) or cut (False); windows overlap by
    ``window_overlap_tokens`` (at most half a window) and a document gets at most
    ``max_windows_per_document`` (the rest is cut and reported truncated).

    ``engine_stall_timeout_s``: with work outstanding, the model must finish a batch at least
    this often; otherwise the engine declares itself failed (a hung GPU or driver), fails
    every pending request with :class:`consumer.engine.api.EngineFailed` and stays failed.
    """

    max_batch_tokens: int = Field(default=65536, gt=0)
    max_batch_pairs: int = Field(default=512, gt=0)
    max_wait_ms: float = Field(default=2.0, ge=0)
    tokenizer_threads: int = Field(default=4, gt=0)
    warmup: bool = True
    window_pairs: int = Field(default=4096, gt=0)
    quick_batch_backlog: float = Field(default=4.0, ge=0)
    late_cut: bool = True
    late_cut_margin_ms: float = Field(default=1.0, ge=0)
    min_batch_tokens: int = Field(default=4096, gt=0)
    oom_budget_factor: float = Field(default=0.75, gt=0, lt=1)
    oom_recovery_batches: int = Field(default=200, ge=1)
    close_timeout_s: float = Field(default=30.0, gt=0)
    engine_stall_timeout_s: float = Field(default=120.0, gt=0)
    split_long_documents: bool = False
    window_overlap_tokens: int = Field(default=256, ge=0)
    max_windows_per_document: int = Field(default=16, ge=1)
