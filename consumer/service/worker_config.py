"""Everything the Kafka worker needs to know, as one frozen value.

The entry point maps the service's settings onto a :class:`WorkerConfig`; the worker
never reads the environment itself, so tests build one directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as checked_dataclass

from consumer.service.codec import RequestLimits
from consumer.service.commit_policy import COMMIT_TIMEOUT_S
from kafka_common.security import KafkaSecurity

DELIVERY_MODES = ("at_least_once", "exactly_once")
# The producer's own default largest request, and what a record adds to a request's value
# at most: its key, its headers, the dead-letter headers (a message of up to 1,000
# characters), batch overhead.
KAFKA_DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
RECORD_HEADROOM = 64 * 1024
# Time the revoke handler needs beyond its wait and its commit (the last poll, callbacks).
REBALANCE_MARGIN_S = 5.0


@checked_dataclass(frozen=True, config=ConfigDict(arbitrary_types_allowed=True))
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
        max_outbox_bytes: exactly-once mode: the most bytes of answers waiting in the
            partitions' outboxes for their transactions; above it every partition stops
            fetching until commits drain them (they also count toward
            ``max_uncommitted_records``, each answer a record).
        transactions_unready_after_s: exactly-once mode: a partition whose transactions
            have failed this long makes the worker not ready.
        transactions_give_up_after_s: exactly-once mode: ... and this long makes it stop
            (exit 1, one line): its answers wait in memory meanwhile and only an operator
            can make them committable.
        max_record_attempts: a record started this many times without being finished
            (each time its worker died or left mid-record) is a poison record: it is
            dead-lettered instead of processed again (:mod:`consumer.service.attempts`).
        lag_interval_s: how often the consumer-lag metric is refreshed.
    """

    bootstrap_servers: str = Field(default="127.0.0.1:9092", min_length=1)
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    request_topic: str = Field(default="rerank.requests", min_length=1)
    reply_topic: str = Field(default="rerank.replies", min_length=1)
    dlq_topic: str = Field(default="rerank.requests.dlq", min_length=1)
    group_id: str = Field(default="rerank-workers", min_length=1)
    client_id: str = "rerank-worker"
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    rebalance_timeout_ms: int = Field(default=60_000, gt=0)
    group_instance_id: str | None = None
    connect_timeout_s: float = Field(default=300.0, ge=0)
    producer_linger_ms: int = Field(default=0, ge=0)
    max_poll_records: int = Field(default=500, gt=0)
    allowed_reply_topics: str | None = None
    delivery: str = "at_least_once"
    transactional_id_prefix: str = Field(default="rerank", min_length=1)
    reply_topic_wait_s: float = Field(default=5.0, gt=0)
    reply_timeout_s: float = Field(default=30.0, gt=0)
    missing_topic_ttl_s: float = Field(default=10.0, gt=0)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    default_max_age_s: float = Field(default=0.0, ge=0)
    inflight_high_pairs: int = Field(default=4096, gt=0)
    inflight_low_pairs: int = Field(default=2048, ge=0)
    inflight_target_s: float = Field(default=0.0, ge=0)
    inflight_min_pairs: int = Field(default=1024, gt=0)
    drain_timeout_s: float = Field(default=30.0, gt=0)
    revoke_timeout_s: float = Field(default=10.0, gt=0)
    commit_interval_s: float = Field(default=0.1, gt=0)
    max_uncommitted_records: int = Field(default=10_000, gt=0)
    max_record_attempts: int = Field(default=3, gt=0)
    lag_interval_s: float = Field(default=5.0, gt=0)
    max_outbox_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    transactions_unready_after_s: float = Field(default=30.0, gt=0)
    transactions_give_up_after_s: float = Field(default=300.0, gt=0)

    def __post_init__(self) -> None:
        problems = cross_field_problems(self.__dict__)
        if problems:
            raise ValueError("; ".join(problem.text() for problem in problems))

    @property
    def max_record_bytes(self) -> int:
        """The producers' largest record: what the worker accepts as a request, plus room
        for a dead-letter copy's headers or a reply's (never below Kafka's 1 MiB)."""
        return max(KAFKA_DEFAULT_MAX_REQUEST_BYTES, self.limits.max_request_bytes + RECORD_HEADROOM)

    @property
    def exactly_once(self) -> bool:
        """True in exactly-once mode (transactions)."""
        return self.delivery == "exactly_once"

    @property
    def allowed_reply_pattern(self) -> re.Pattern[str]:
        """The compiled reply-topic allow pattern (see ``allowed_reply_topics``)."""
        return allowed_reply_pattern(self.allowed_reply_topics, self.reply_topic)


@dataclass(frozen=True)
class Problem:
    """A reason the settings cannot work, about the settings it names.

    ``template`` has one ``{}`` per name in ``fields``: :meth:`text` fills them with the
    field names, or with what ``name`` makes of them (the worker's settings show their
    environment variables and flags).
    """

    fields: tuple[str, ...]
    template: str

    def text(self, name: Callable[[str], str] = str) -> str:
        return self.template.format(*(name(field) for field in self.fields))


def cross_field_problems(values: Mapping[str, Any]) -> list[Problem]:
    """Every problem between settings of a worker, one each: ``values`` are its fields
    (those missing are not checked)."""
    checks = (
        _transaction_timing_problems,
        _inflight_problems,
        _heartbeat_problems,
        _rebalance_problems,
        _reply_pattern_problems,
        _shared_topic_problems,
        _other_problems,
    )
    found: list[Problem] = []
    for check in checks:
        try:
            found.extend(check(values))
        except (KeyError, TypeError):  # a field left out, or not of its type: not checked
            continue
    return found


def _inflight_problems(values: Mapping[str, Any]) -> list[Problem]:
    low, high = values["inflight_low_pairs"], values["inflight_high_pairs"]
    if low < high:
        return []
    return [
        Problem(
            ("inflight_low_pairs", "inflight_high_pairs"),
            f"{{}} ({low}) must be below {{}} ({high})",
        )
    ]


def _transaction_timing_problems(values: Mapping[str, Any]) -> list[Problem]:
    unready, give_up = (
        values["transactions_unready_after_s"],
        values["transactions_give_up_after_s"],
    )
    if unready < give_up:
        return []
    return [
        Problem(
            ("transactions_unready_after_s", "transactions_give_up_after_s"),
            f"{{}} ({unready:g}) must be below {{}} ({give_up:g})",
        )
    ]


def _heartbeat_problems(values: Mapping[str, Any]) -> list[Problem]:
    heartbeat, session = values["heartbeat_interval_ms"], values["session_timeout_ms"]
    if heartbeat < session:
        return []
    return [
        Problem(
            ("heartbeat_interval_ms", "session_timeout_ms"),
            f"{{}} ({heartbeat}) must be below {{}} ({session})",
        )
    ]


def _rebalance_problems(values: Mapping[str, Any]) -> list[Problem]:
    revoke_s, rebalance_ms = values["revoke_timeout_s"], values["rebalance_timeout_ms"]
    needed = rebalance_time_needed_ms(revoke_s)
    if rebalance_ms >= needed:
        return []
    return [
        Problem(
            ("rebalance_timeout_ms", "revoke_timeout_s"),
            f"{{}} ({rebalance_ms}) must be at least {needed}: {{}} ({revoke_s:g} s) + the "
            f"{COMMIT_TIMEOUT_S:g} s commit timeout + a {REBALANCE_MARGIN_S:g} s margin",
        )
    ]


def _reply_pattern_problems(values: Mapping[str, Any]) -> list[Problem]:
    pattern, reply_topic = values["allowed_reply_topics"], values["reply_topic"]
    names = ("allowed_reply_topics", "reply_topic")
    try:
        compiled = allowed_reply_pattern(pattern, reply_topic)
    except re.error as exc:
        return [Problem(names[:1], f"{{}} is not a valid regular expression ({exc}): {pattern!r}")]
    if compiled.fullmatch(reply_topic):
        return []
    return [
        Problem(
            names, f"{{}} {pattern!r} does not allow the default reply topic {{}} {reply_topic!r}"
        )
    ]


def _shared_topic_problems(values: Mapping[str, Any]) -> list[Problem]:
    # A worker that replies into (or dead-letters into) its own request topic would
    # consume its own output forever.
    roles = {"request": "request_topic", "reply": "reply_topic", "dead-letter": "dlq_topic"}
    found = []
    named = list(roles.items())
    for i, (role_a, field_a) in enumerate(named):
        for role_b, field_b in named[i + 1 :]:
            if values[field_a] == values[field_b]:
                found.append(
                    Problem(
                        (field_a, field_b),
                        f"the {role_a} topic and the {role_b} topic are both "
                        f"{values[field_a]!r} ({{}}, {{}})",
                    )
                )
    return found


def _other_problems(values: Mapping[str, Any]) -> list[Problem]:
    found = []
    if not values["bootstrap_servers"].strip():
        found.append(Problem(("bootstrap_servers",), "{} is empty"))
    if values["delivery"] not in DELIVERY_MODES:
        found.append(Problem(("delivery",), f"{{}} must be one of {', '.join(DELIVERY_MODES)}"))
    instance = values["group_instance_id"]
    if instance is not None and not instance.strip():
        found.append(Problem(("group_instance_id",), "{} must not be blank"))
    return found


def allowed_reply_pattern(allowed_reply_topics: str | None, reply_topic: str) -> re.Pattern[str]:
    """The compiled reply-topic allow pattern (see ``WorkerConfig.allowed_reply_topics``)."""
    if allowed_reply_topics is not None:
        return re.compile(allowed_reply_topics)
    return re.compile(re.escape(reply_topic) + r"(\..+)?")


def rebalance_time_needed_ms(revoke_timeout_s: float) -> int:
    """The least rebalance timeout that lets the revoke handler wait ``revoke_timeout_s``
    and then commit: a member still in its handler after the rebalance timeout is
    dropped from the group mid-revoke."""
    return int((revoke_timeout_s + COMMIT_TIMEOUT_S + REBALANCE_MARGIN_S) * 1000)
