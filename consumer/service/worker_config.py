"""Everything the Kafka worker needs to know, as one frozen value.

The entry point maps the service's settings onto a :class:`WorkerConfig`; the worker
never reads the environment itself, so tests build one directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from consumer.service.codec import RequestLimits
from producer_sdk.security import KafkaSecurity


@dataclass(frozen=True)
class WorkerConfig:
    """Configuration of one :class:`consumer.service.worker.Worker`.

    Kafka:
        bootstrap_servers: "host:port[,host:port...]" of the cluster.
        security: how to authenticate to and encrypt the connection.
        request_topic: topic the worker consumes requests from.
        reply_topic: default reply topic (a request without a ``reply-topic`` header).
        dlq_topic: dead-letter topic for records that cannot be answered.
        group_id: consumer group; every worker of one pool shares it.
        client_id: client id prefix of the consumer and producer (shows in broker logs).
        session_timeout_ms, heartbeat_interval_ms, max_poll_interval_ms: group
            membership timings, passed to the consumer unchanged. The worker keeps
            polling while the model is busy, so max_poll_interval only bounds a stuck
            event loop and the drain on shutdown.
        producer_linger_ms: how long the producer waits to batch replies; a few ms
            buys throughput for almost no latency.
        max_poll_records: most records taken from the consumer per poll.

    Replies:
        allowed_reply_topics: regular expression a reply topic must match in full
            (``re.fullmatch``). None (the default) allows the reply topic and every
            topic named ``<reply_topic>.<suffix>`` (``rerank.replies.team-a``). A request
            naming any other topic goes to the dead-letter topic, so a request cannot
            make the worker write into someone else's topic.
        reply_topic_wait_s: longest wait for the metadata of a reply topic the worker
            has not seen yet; a topic still unknown after it is treated as missing and
            the request goes to the dead-letter topic.
        missing_topic_ttl_s: how long "this topic does not exist" is remembered, so a
            burst of requests for a missing topic costs one lookup, and a topic created
            later is found again.

    Requests:
        limits: size limits of one request (over a limit: ``payload_too_large``).
        default_max_age_s: a request without a ``deadline-ms`` header expires this many
            seconds after its record timestamp and is answered ``deadline_exceeded``
            instead of being scored. 0 (the default) turns this off: record timestamps
            are usually set by the producer's clock (CreateTime), and a skewed clock
            would expire good requests. Turn it on for topics with LogAppendTime, or
            when callers that set no deadline give up after a known time.

    Flow control and lifecycle:
        inflight_high_pairs: pause every assigned partition when the (query, document)
            pairs accepted but not yet answered exceed this; Kafka is the buffer.
        inflight_low_pairs: resume once in-flight pairs fall to this or below.
        drain_timeout_s: on stop, how long in-flight requests may take to finish and
            be answered before the worker gives up on them (they stay uncommitted and
            are redelivered).
        revoke_timeout_s: on a rebalance, how long the worker waits for the revoked
            partitions' in-flight requests before committing what is done and letting
            the partitions go (the rest is redelivered to the new owner).
        commit_interval_s: how often finished offsets are committed.
        lag_interval_s: how often the consumer-lag metric is refreshed.
    """

    bootstrap_servers: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    request_topic: str = "rerank.requests"
    reply_topic: str = "rerank.replies"
    dlq_topic: str = "rerank.requests.dlq"
    group_id: str = "rerank-workers"
    client_id: str = "rerank-worker"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    producer_linger_ms: int = 5
    max_poll_records: int = 500
    allowed_reply_topics: str | None = None
    reply_topic_wait_s: float = 5.0
    missing_topic_ttl_s: float = 10.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    default_max_age_s: float = 0.0
    inflight_high_pairs: int = 4096
    inflight_low_pairs: int = 2048
    drain_timeout_s: float = 30.0
    revoke_timeout_s: float = 10.0
    commit_interval_s: float = 1.0
    lag_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for problem in self.problems():
            raise ValueError(problem)

    def problems(self) -> list[str]:
        """Every reason this configuration cannot work, one line each."""
        found: list[str] = []
        if not self.bootstrap_servers.strip():
            found.append("bootstrap_servers is empty")
        if self.inflight_high_pairs < 1:
            found.append("inflight_high_pairs must be >= 1")
        if not 0 <= self.inflight_low_pairs < self.inflight_high_pairs:
            found.append("inflight_low_pairs must be >= 0 and below inflight_high_pairs")
        if self.max_poll_records < 1:
            found.append("max_poll_records must be >= 1")
        for name in (
            "reply_topic_wait_s",
            "missing_topic_ttl_s",
            "drain_timeout_s",
            "revoke_timeout_s",
            "commit_interval_s",
            "lag_interval_s",
        ):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be > 0")
        if self.default_max_age_s < 0:
            found.append("default_max_age_s must be >= 0 (0 turns it off)")
        try:
            pattern = self.allowed_reply_pattern
        except re.error as exc:
            found.append(f"allowed_reply_topics is not a valid regular expression: {exc}")
        else:
            if not pattern.fullmatch(self.reply_topic):
                found.append(
                    f"allowed_reply_topics {self.allowed_reply_topics!r} does not allow the "
                    f"default reply topic {self.reply_topic!r}"
                )
        return found

    @property
    def allowed_reply_pattern(self) -> re.Pattern[str]:
        """The compiled reply-topic allow pattern (see ``allowed_reply_topics``)."""
        if self.allowed_reply_topics is not None:
            return re.compile(self.allowed_reply_topics)
        return re.compile(re.escape(self.reply_topic) + r"(\..+)?")
