"""Everything the Kafka worker needs to know, as one frozen value.

The entry point maps the service's settings onto a :class:`WorkerConfig`; the worker
never reads the environment itself, so tests build one directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from consumer.service.codec import RequestLimits
from consumer.service.committer import COMMIT_TIMEOUT_S
from producer_sdk.security import KafkaSecurity

DELIVERY_MODES = ("at_least_once", "exactly_once")
# Time the revoke handler needs beyond its wait and its commit (the last poll, callbacks).
REBALANCE_MARGIN_S = 5.0


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
        rebalance_timeout_ms: how long the group waits for members to finish their
            revoke handlers before it drops the slow ones. It must cover the revoke
            wait plus the commit that follows (``problems`` checks it).
        group_instance_id: static membership: a member that comes back under the same
            id within ``session_timeout_ms`` gets its partitions back without a
            rebalance (a rolling restart moves nothing). One id per worker, stable
            across its restarts (the GPU index, a StatefulSet ordinal). None: dynamic.
        connect_timeout_s: at start, how long to keep trying to reach the brokers
            before giving up (0: for as long as the worker runs).
        producer_linger_ms: how long the producer waits to batch replies. 0: replies
            go at once and batch by themselves while a send is in flight (5 ms cost a
            lone request 4.5 ms on an H200 and bought no throughput, docs/benchmarks.md).
        max_poll_records: most records taken from the consumer per poll.

    Replies:
        delivery: "at_least_once" (default): a reply is produced the moment its request is
            answered; a crash can repeat replies (the SDK drops duplicates).
            "exactly_once": each partition's replies, dead-letter records and offsets go
            into one Kafka transaction, so a ``read_committed`` reader sees every reply
            once, through crashes (:mod:`consumer.service.transactions`); replies become
            visible at the transaction's commit, up to ``commit_interval_s`` later.
        transactional_id_prefix: exactly-once mode: the start of each partition's
            transactional id; one per deployment sharing a cluster.
        allowed_reply_topics: regular expression a reply topic must match in full
            (``re.fullmatch``). None (the default) allows the reply topic and every
            topic named ``<reply_topic>.<suffix>`` (``rerank.replies.team-a``). A request
            naming any other topic goes to the dead-letter topic, so a request cannot
            make the worker write into someone else's topic.
        reply_topic_wait_s: longest wait for the metadata of a reply topic the worker
            has not seen yet; a lookup that fails or times out is tried again.
        reply_timeout_s: a reply that keeps failing (broker away, topic lookups
            timing out) is tried again for this long, or until the request's deadline,
            then the request goes to the dead-letter topic.
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
        inflight_target_s: the high mark follows the worker's measured rate: the pairs
            it answers in this many seconds, never above ``inflight_high_pairs`` nor
            below ``inflight_min_pairs`` (the low mark keeps its ratio to the high one).
            0 (the default): the fixed marks. docs/worker.md has the measured trade-off.
        inflight_min_pairs: the smallest high mark, and the mark before a rate is
            measured.
        drain_timeout_s: on stop, how long in-flight requests may take to finish and
            be answered before the worker gives up on them (they stay uncommitted and
            are redelivered).
        revoke_timeout_s: on a rebalance, how long the worker waits for the revoked
            partitions' in-flight requests before committing what is done and letting
            the partitions go (the rest is redelivered to the new owner).
        commit_interval_s: after a request finishes its offset is committed within this
            long (and never more often); short, so that a worker killed without warning
            leaves few answered requests uncommitted (each is answered again).
        max_uncommitted_records: a partition whose records wait in this number behind
            an unfinished one (a reply being retried) stops fetching until it clears,
            so memory stays bounded.
        max_record_attempts: a record started this many times without being finished
            (each time its worker died or left mid-record) is a poison record: it is
            dead-lettered instead of processed again (:mod:`consumer.service.attempts`).
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
    rebalance_timeout_ms: int = 60_000
    group_instance_id: str | None = None
    connect_timeout_s: float = 300.0
    producer_linger_ms: int = 0
    max_poll_records: int = 500
    allowed_reply_topics: str | None = None
    delivery: str = "at_least_once"
    transactional_id_prefix: str = "rerank"
    reply_topic_wait_s: float = 5.0
    reply_timeout_s: float = 30.0
    missing_topic_ttl_s: float = 10.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    default_max_age_s: float = 0.0
    inflight_high_pairs: int = 4096
    inflight_low_pairs: int = 2048
    inflight_target_s: float = 0.0
    inflight_min_pairs: int = 1024
    drain_timeout_s: float = 30.0
    revoke_timeout_s: float = 10.0
    commit_interval_s: float = 0.1
    max_uncommitted_records: int = 10_000
    max_record_attempts: int = 3
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
        if self.inflight_target_s < 0:
            found.append("inflight_target_s must be >= 0")
        if self.inflight_min_pairs < 1:
            found.append("inflight_min_pairs must be >= 1")
        if self.max_poll_records < 1:
            found.append("max_poll_records must be >= 1")
        if self.max_uncommitted_records < 1:
            found.append("max_uncommitted_records must be >= 1")
        if self.max_record_attempts < 1:
            found.append("max_record_attempts must be >= 1")
        if self.delivery not in DELIVERY_MODES:
            found.append(f"delivery must be one of {', '.join(DELIVERY_MODES)}")
        if self.connect_timeout_s < 0:
            found.append("connect_timeout_s must be >= 0 (0: no limit)")
        if self.group_instance_id is not None and not self.group_instance_id.strip():
            found.append("group_instance_id must not be blank")
        found.extend(self._rebalance_problems())
        for name in (
            "reply_topic_wait_s",
            "reply_timeout_s",
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

    def _rebalance_problems(self) -> list[str]:
        needed = rebalance_time_needed_ms(self.revoke_timeout_s)
        if self.rebalance_timeout_ms >= needed:
            return []
        return [
            f"rebalance_timeout_ms ({self.rebalance_timeout_ms}) must be at least {needed}: "
            f"revoke_timeout_s ({self.revoke_timeout_s:g} s) + the {COMMIT_TIMEOUT_S:g} s "
            f"commit timeout + a {REBALANCE_MARGIN_S:g} s margin"
        ]

    @property
    def exactly_once(self) -> bool:
        """True in exactly-once mode (transactions)."""
        return self.delivery == "exactly_once"

    @property
    def allowed_reply_pattern(self) -> re.Pattern[str]:
        """The compiled reply-topic allow pattern (see ``allowed_reply_topics``)."""
        if self.allowed_reply_topics is not None:
            return re.compile(self.allowed_reply_topics)
        return re.compile(re.escape(self.reply_topic) + r"(\..+)?")


def rebalance_time_needed_ms(revoke_timeout_s: float) -> int:
    """The least rebalance timeout that lets the revoke handler wait ``revoke_timeout_s``
    and then commit: a member still in its handler after the rebalance timeout is
    dropped from the group mid-revoke."""
    return int((revoke_timeout_s + COMMIT_TIMEOUT_S + REBALANCE_MARGIN_S) * 1000)
