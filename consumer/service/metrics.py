"""Prometheus metrics of the service, built against an injected registry.

Every metric the service exports is created here, so that the Grafana dashboard,
the alert rules and the tests have one list to check against.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from consumer.engine.metrics import BatchReport

# Latencies that matter for an online reranker: a few ms (one batch) up to tens of s
# (a backlog behind a paused partition).
LATENCY_BUCKETS = (
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_PAIRS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKENS_BUCKETS = (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class Metrics:
    """All metrics of one worker process; also the engine's
    :class:`consumer.engine.metrics.EngineMetrics`.

    Pass a fresh ``CollectorRegistry`` in tests; the service uses its own registry
    and serves it on ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rerank_requests",
            "Requests answered, by outcome (ok or an error code).",
            ["outcome"],
            registry=r,
        )
        self.pairs = Counter("rerank_pairs", "Query-document pairs scored.", registry=r)
        self.tokens = Counter("rerank_tokens", "Prompt tokens scored.", registry=r)
        self.truncated_pairs = Counter(
            "rerank_truncated_pairs", "Pairs whose document was truncated.", registry=r
        )
        self.request_latency = Histogram(
            "rerank_request_latency_seconds",
            "End to end: request record timestamp to reply acknowledged by the broker.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rerank_queue_wait_seconds",
            "Time a pair waited in the batcher queue.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "rerank_inference_seconds",
            "Model forward time of one batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_pairs = Histogram(
            "rerank_batch_pairs", "Pairs in one batch.", buckets=BATCH_PAIRS_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rerank_batch_tokens",
            "Padded tokens in one batch.",
            buckets=BATCH_TOKENS_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "rerank_batch_padding_ratio",
            "Share of a batch's tokens that are padding.",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.in_flight_pairs = Gauge(
            "rerank_in_flight_pairs", "Pairs accepted and not yet answered.", registry=r
        )
        self.in_flight_window = Gauge(
            "rerank_in_flight_window_pairs",
            "The high mark of pairs in flight now (it follows the measured rate).",
            registry=r,
        )
        self.paused = Gauge(
            "rerank_consumer_paused", "1 while the consumer's partitions are paused.", registry=r
        )
        self.ready = Gauge(
            "rerank_ready",
            "1 while the worker is ready (what /health/ready reports), else 0.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "rerank_consumer_lag",
            "Records behind the end of the partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.dlq_records = Counter(
            "rerank_dlq_records",
            "Records sent to the dead-letter topic, by error code.",
            ["code"],
            registry=r,
        )
        self.errors = Counter(
            "rerank_errors",
            "Error replies and dead-letter records, by error code.",
            ["code"],
            registry=r,
        )
        self.dead_letter_blocked = Gauge(
            "rerank_dead_letter_blocked",
            "Records that cannot be written to the dead-letter topic now; their partitions "
            "are held and stay uncommitted until it takes them.",
            registry=r,
        )
        self.lookahead_records = Gauge(
            "rerank_lookahead_records",
            "Records taken from the consumer and not yet let in (oldest first across "
            "partitions when the in-flight window is short).",
            registry=r,
        )
        self.outbox_records = Gauge(
            "rerank_outbox_records",
            "Exactly-once mode: answers waiting in the partitions' outboxes for their transaction.",
            registry=r,
        )
        self.outbox_bytes = Gauge(
            "rerank_outbox_bytes",
            "Exactly-once mode: bytes of the answers waiting for their transaction.",
            registry=r,
        )
        self.transactions = Counter(
            "rerank_transactions",
            "Exactly-once mode: partition transactions, by outcome (committed or failed).",
            ["outcome"],
            registry=r,
        )
        self.oom_splits = Counter(
            "rerank_oom_splits", "Batches split after running out of GPU memory.", registry=r
        )
        self.max_batch_tokens = Gauge(
            "rerank_max_batch_tokens", "Current token budget of one batch.", registry=r
        )
        self.model_info = Info("rerank_model", "The model this worker serves.", registry=r)
        self.gpu_memory = Gauge(
            "rerank_gpu_memory_bytes", "GPU memory held by torch.", ["kind"], registry=r
        )

    # ---- consumer.engine.metrics.EngineMetrics ----------------------------------------

    def batch_scored(self, report: BatchReport) -> None:
        """Count one scored batch and its pairs' waits."""
        self.batch_pairs.observe(len(report.pairs))
        self.batch_tokens.observe(report.cost_tokens)
        if report.cost_tokens > 0:
            self.padding_ratio.observe(max(0.0, 1.0 - report.real_tokens / report.cost_tokens))
        self.inference.observe(report.seconds)
        self.pairs.inc(len(report.pairs))
        self.tokens.inc(report.real_tokens)
        if truncated := report.truncated_pairs:
            self.truncated_pairs.inc(truncated)
        for wait in report.queue_waits_s:
            self.queue_wait.observe(wait)

    def token_budget_changed(self, max_batch_tokens: int) -> None:
        """The batch token budget gauge."""
        self.max_batch_tokens.set(max_batch_tokens)

    def out_of_memory_split(self) -> None:
        """Count a batch split after running out of memory."""
        self.oom_splits.inc()

    def model_started(self, name: str, kind: str, device: str, dtype: str) -> None:
        """The model-info metric."""
        self.model_info.info({"model": name, "kind": kind, "device": device, "dtype": dtype})
