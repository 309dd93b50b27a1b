"""The gateway's Prometheus metrics (its own registry: tests make one each)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a lone request through Kafka (~10-20 ms) to a call that waits out its timeout.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.35, 0.5, 1, 2, 5, 10, 30)


class GatewayMetrics:
    """Calls by API and status, their duration, and how many are in flight."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "rerank_gateway_requests",
            "HTTP rerank calls answered, by API and HTTP status.",
            ["api", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "rerank_gateway_request_duration_seconds",
            "Time from the HTTP request to its answer, by API (all statuses).",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "rerank_gateway_in_flight_requests",
            "HTTP rerank calls waiting for their reply.",
            registry=self.registry,
        )
        self.workers = Gauge(
            "rerank_gateway_worker_members",
            "Members of the workers' consumer group at the last look (-1: not known).",
            registry=self.registry,
        )
