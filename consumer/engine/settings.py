"""The engine's knobs: batching, threads, and the out-of-memory budget policy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    """Batching and threading knobs of the engine.

    ``max_batch_tokens`` is in the scorer's cost units (padded tokens, or real tokens
    for packed batches); after an out-of-memory it is lowered by ``oom_budget_factor``,
    never below ``min_batch_tokens``, and raised again by the same factor (never above
    ``max_batch_tokens``) after ``oom_recovery_batches`` successful batches in a row, so
    a passing memory shortage does not cost throughput for the rest of the process.

    ``quick_backlog``: while fewer than this many quick batches' worth of tokens wait,
    batches are cut no bigger than the scorer's quick size (its largest CUDA graph), so a
    moderate load runs in batches that are cheap to issue; 0 always cuts the full budget
    (:mod:`consumer.engine.batcher`).

    ``split_long_documents``: a request that does not say gets its documents that do not fit
    the model scored as overlapping windows (True) or cut (False); windows overlap by
    ``window_overlap_tokens`` (at most half a window) and a document gets at most
    ``max_windows_per_document`` (the rest is cut and reported truncated).

    ``stall_timeout_s``: with work outstanding, the model must finish a batch at least
    this often; otherwise the engine declares itself failed (a hung GPU or driver), fails
    every pending request with :class:`consumer.engine.api.EngineFailed` and stays failed.
    """

    max_batch_tokens: int = 65536
    max_batch_pairs: int = 512
    max_wait_ms: float = 2.0
    tokenizer_threads: int = 4
    warmup: bool = True
    window_pairs: int = 4096
    quick_backlog: float = 4.0
    min_batch_tokens: int = 4096
    oom_budget_factor: float = 0.75
    oom_recovery_batches: int = 200
    close_timeout_s: float = 30.0
    stall_timeout_s: float = 120.0
    split_long_documents: bool = False
    window_overlap_tokens: int = 256
    max_windows_per_document: int = 16

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_pairs < 1:
            raise ValueError("max_batch_tokens and max_batch_pairs must be at least 1")
        if self.tokenizer_threads < 1:
            raise ValueError("tokenizer_threads must be at least 1")
        if self.quick_backlog < 0:
            raise ValueError("quick_backlog must not be negative")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if not 0 < self.oom_budget_factor < 1:
            raise ValueError("oom_budget_factor must be between 0 and 1")
        if self.oom_recovery_batches < 1:
            raise ValueError("oom_recovery_batches must be at least 1")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        if self.window_overlap_tokens < 0 or self.max_windows_per_document < 1:
            raise ValueError(
                "window_overlap_tokens must not be negative and max_windows_per_document "
                "must be at least 1"
            )
