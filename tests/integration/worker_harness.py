"""Helpers for the worker's integration tests: a fake engine of our own interface,
an in-process worker, and a request producer / reply reader on the real broker.

Requests are produced with confluent-kafka (librdkafka), a client independent of the
worker's aiokafka, so the tests check the wire contract rather than one library
agreeing with itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import CollectorRegistry

from consumer.engine.api import EngineError, ScoreRequest, ScoreResult
from consumer.service.metrics import Metrics
from consumer.service.worker import Worker
from consumer.service.worker_config import WorkerConfig

TopicFactory = Callable[..., Awaitable[str]]
Headers = list[tuple[str, bytes | None]]

JOIN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
READ_TIMEOUT_S = 30.0
MODEL_NAME = "fake-reranker"
# The queries that make the fake engine misbehave, to test the service's handling.
QUERY_ENGINE_ERROR = "__engine_error__"
QUERY_VALUE_ERROR = "__value_error__"
QUERY_NAN = "__nan__"
QUERY_CRASH = "__crash__"
# Kills the whole process (os._exit), as a crash in native code would: worker_proc only.
QUERY_KILL_PROCESS = "__kill_process__"


def fake_logit(query: str, instruction: str | None, document: str) -> float:
    """The fake engine's deterministic relevance logit of one pair, in [-5, 5]."""
    text = f"{instruction or ''}\x00{query}\x00{document}".encode()
    return (zlib.crc32(text) % 10_001) / 1000.0 - 5.0


def fake_score(query: str, instruction: str | None, document: str) -> float:
    """sigmoid(fake_logit): the calibrated score the fake engine reports."""
    return 1.0 / (1.0 + math.exp(-fake_logit(query, instruction, document)))


class FakeEngine:
    """A :class:`consumer.engine.api.RerankEngine` with deterministic scores.

    ``delay_s`` makes every request take that long; with ``blocking`` the wait is a
    blocking sleep in a thread, as the real engine's GPU thread is. Every request it is
    asked to score is recorded in ``seen`` (queries only).
    """

    def __init__(self, delay_s: float = 0.0, blocking: bool = False) -> None:
        self.delay_s = delay_s
        self.blocking = blocking
        self.seen: list[str] = []
        self.failed: str | None = None
        self._in_flight = 0
        self.max_in_flight_pairs = 0

    @property
    def model_name(self) -> str:
        return MODEL_NAME

    @property
    def ready(self) -> bool:
        return True

    @property
    def in_flight_pairs(self) -> int:
        return self._in_flight

    @property
    def failure(self) -> str | None:
        return self.failed

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def score(self, request: ScoreRequest) -> ScoreResult:
        self.seen.append(request.query)
        n = len(request.documents)
        self._in_flight += n
        self.max_in_flight_pairs = max(self.max_in_flight_pairs, self._in_flight)
        try:
            if self.blocking:
                await asyncio.to_thread(time.sleep, self.delay_s)
            elif self.delay_s:
                await asyncio.sleep(self.delay_s)
            return self._result(request)
        finally:
            self._in_flight -= n

    def _result(self, request: ScoreRequest) -> ScoreResult:
        if request.query == QUERY_KILL_PROCESS:
            os._exit(70)
        if request.query == QUERY_ENGINE_ERROR:
            raise EngineError("the fake engine failed on purpose")
        if request.query == QUERY_VALUE_ERROR:
            raise ValueError("prompt too long for the fake model")
        if request.query == QUERY_CRASH:
            raise RuntimeError("unexpected crash inside the fake engine")
        logits = [fake_logit(request.query, request.instruction, d) for d in request.documents]
        if request.query == QUERY_NAN:
            logits[0] = math.nan
        scores = [1.0 / (1.0 + math.exp(-x)) if not math.isnan(x) else x for x in logits]
        return ScoreResult(
            logits=tuple(logits),
            scores=tuple(scores),
            prompt_tokens=sum(len(d) for d in request.documents),
            truncated=tuple(False for _ in request.documents),
            queue_ms=0.1,
            inference_ms=0.2,
        )


REPLY_PARTITIONS = 2


@dataclass
class Topics:
    """The topics of one test."""

    requests: str
    replies: str
    dlq: str


@contextlib.asynccontextmanager
async def topics_on(bootstrap: str, ready_s: float = 10.0) -> AsyncIterator[Topics]:
    """Request, reply and dead-letter topics (one partition each) on a broker of a test's
    own, created over ``bootstrap`` (a PLAINTEXT listener) once every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [f"test-{uuid.uuid4().hex}" for _ in range(3)]
        await admin.create_topics([NewTopic(name, 1, 1) for name in names])
        async with asyncio.timeout(ready_s):
            while True:
                described = await admin.describe_topics(names)
                if all(t["error_code"] == 0 and t["partitions"] for t in described):
                    break
                await asyncio.sleep(0.05)
        yield Topics(requests=names[0], replies=names[1], dlq=names[2])
    finally:
        await admin.close()


async def make_topics(new_topic: TopicFactory, request_partitions: int = 1) -> Topics:
    return Topics(
        requests=await new_topic(partitions=request_partitions),
        replies=await new_topic(partitions=REPLY_PARTITIONS),
        dlq=await new_topic(partitions=1),
    )


def reply_reader(
    bootstrap: str, topics: Topics, isolation_level: str = "read_uncommitted"
) -> TopicReader:
    return TopicReader(bootstrap, topics.replies, REPLY_PARTITIONS, isolation_level)


def dlq_reader(bootstrap: str, topics: Topics) -> TopicReader:
    return TopicReader(bootstrap, topics.dlq, 1)


# Any test topic may be a reply topic (the fixture names them test-<uuid hex>).
TEST_TOPIC_PATTERN = r"test-[0-9a-f]{32}"


def worker_config(bootstrap: str, topics: Topics, group_id: str, **overrides: Any) -> WorkerConfig:
    """A worker configuration for tests: the group timings (session, heartbeat,
    rebalance, revoke, commit) are the defaults users run with; only lookups, the
    drain and the lag refresh are shorter, to keep the tests quick."""
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "request_topic": topics.requests,
        "reply_topic": topics.replies,
        "dlq_topic": topics.dlq,
        "group_id": group_id,
        "client_id": f"test-worker-{uuid.uuid4().hex[:8]}",
        "allowed_reply_topics": TEST_TOPIC_PATTERN,
        "reply_topic_wait_s": 2.0,
        "missing_topic_ttl_s": 2.0,
        "drain_timeout_s": 10.0,
        "lag_interval_s": 0.5,
    }
    return WorkerConfig(**(settings | overrides))


def fresh_metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_worker(
    config: WorkerConfig,
    engine: FakeEngine | Any,
    metrics: Metrics | None = None,
    tracer_provider: Any = None,
) -> AsyncIterator[Worker]:
    """A worker running in this event loop, in its group; stopped cleanly on exit.
    ``tracer_provider``: an OpenTelemetry SDK provider to trace requests with."""
    metrics = metrics if metrics is not None else fresh_metrics()
    worker = Worker(config, engine, metrics, tracer_provider=tracer_provider)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.in_group or task.done(), JOIN_TIMEOUT_S, "group join")
        if task.done():
            task.result()  # raises what run() raised
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, STOP_TIMEOUT_S)


# ------------------------------------------------------------------ producing


@dataclass
class Request:
    """One request record to produce."""

    value: bytes | None
    headers: Headers = field(default_factory=list)
    key: bytes | None = None
    partition: int | None = None
    timestamp_ms: int | None = None  # None: the producer's clock


def request(
    correlation_id: str | None,
    body: dict[str, Any] | bytes | None,
    *,
    reply_topic: str | None = None,
    reply_partition: int | None = None,
    deadline_ms: int | None = None,
    partition: int | None = None,
    timestamp_ms: int | None = None,
) -> Request:
    """A request record with the contract's headers."""
    headers: Headers = []
    if correlation_id is not None:
        headers.append(("correlation-id", correlation_id.encode()))
    if reply_topic is not None:
        headers.append(("reply-topic", reply_topic.encode()))
    if reply_partition is not None:
        headers.append(("reply-partition", str(reply_partition).encode()))
    if deadline_ms is not None:
        headers.append(("deadline-ms", str(deadline_ms).encode()))
    value = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    key = correlation_id.encode() if correlation_id is not None else None
    return Request(
        value=value, headers=headers, key=key, partition=partition, timestamp_ms=timestamp_ms
    )


def _produce_sync(
    bootstrap: str, topic: str, requests: Sequence[Request], max_bytes: int | None = None
) -> None:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "linger.ms": 5,
    }
    if max_bytes is not None:  # records over the client's 1 MB default
        config["message.max.bytes"] = max_bytes
    producer = Producer(config)
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            errors.append(error)

    for r in requests:
        kwargs: dict[str, Any] = {"value": r.value, "key": r.key, "headers": r.headers}
        if r.partition is not None:
            kwargs["partition"] = r.partition
        if r.timestamp_ms is not None:
            kwargs["timestamp"] = r.timestamp_ms
        producer.produce(topic, on_delivery=on_delivery, **kwargs)
        producer.poll(0)
    remaining = producer.flush(READ_TIMEOUT_S)
    assert remaining == 0, f"{remaining} requests not delivered"
    assert errors == [], errors


async def produce(
    bootstrap: str, topic: str, requests: Sequence[Request], max_bytes: int | None = None
) -> None:
    """Produce ``requests`` with confluent-kafka (in a thread: the worker shares this loop);
    ``max_bytes``: the producer's largest record, when over the client's default."""
    await asyncio.to_thread(_produce_sync, bootstrap, topic, list(requests), max_bytes)


# ------------------------------------------------------------------ reading


@dataclass
class Received:
    """A record read back from a reply or dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]  # None: a null header value

    def json(self) -> dict[str, Any]:
        assert self.value is not None
        parsed: dict[str, Any] = orjson.loads(self.value)
        return parsed

    @property
    def correlation_id(self) -> str:
        value = self.headers["correlation-id"]
        assert value is not None
        return value.decode()


class TopicReader:
    """Reads every record of a topic from the beginning, across all its partitions."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int, isolation_level: str = "read_uncommitted"
    ) -> None:
        self._topic = topic
        self._partitions = partitions
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level
        )
        self.records: list[Received] = []

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in range(self._partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_s: float = 0.2) -> list[Received]:
        batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000))
        fresh = [
            Received(
                partition=m.partition,
                offset=m.offset,
                key=m.key,
                value=m.value,
                headers={k: (bytes(v) if v is not None else None) for k, v in m.headers or ()},
            )
            for messages in batches.values()
            for m in messages
        ]
        self.records.extend(fresh)
        return fresh

    async def read(self, count: int, timeout_s: float = READ_TIMEOUT_S) -> list[Received]:
        """Wait until at least ``count`` records were read in all; returns all of them."""
        deadline = time.monotonic() + timeout_s
        while len(self.records) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self._topic}: {len(self.records)} records after {timeout_s} s, "
                    f"expected {count}"
                )
            await self.poll()
        return self.records

    async def quiet(self, seconds: float) -> list[Received]:
        """Read for ``seconds`` more; returns what arrived meanwhile."""
        before = len(self.records)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.poll(min(0.2, max(0.01, deadline - time.monotonic())))
        return self.records[before:]


def by_correlation_id(records: Sequence[Received]) -> dict[str, list[Received]]:
    found: dict[str, list[Received]] = {}
    for r in records:
        found.setdefault(r.correlation_id, []).append(r)
    return found


def documents(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(n)]


def expected_order(query: str, instruction: str | None, docs: Sequence[str]) -> list[int]:
    """Indices of ``docs`` by fake score, best first (ties: lower index first)."""
    logits = [fake_logit(query, instruction, d) for d in docs]
    return sorted(range(len(docs)), key=lambda i: -logits[i])


async def committed_offset(
    bootstrap: str, group: str, tp: TopicPartition, expected: int, timeout_s: float = 10.0
) -> int | None:
    """The group's committed offset of ``tp`` once it reaches ``expected`` (or the last seen)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await consumer.committed(tp)
            if committed == expected or time.monotonic() > deadline:
                return committed
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()


# ------------------------------------------------------------- worker processes

WORKER_PROC = Path(__file__).with_name("worker_proc.py")


def start_worker_process(
    bootstrap: str, topics: Topics, group: str, stderr: Any = subprocess.DEVNULL, **options: object
) -> subprocess.Popen[str]:
    """A worker in a process of its own (worker_proc.py): one a test can kill."""
    args = [
        sys.executable,
        str(WORKER_PROC),
        "--bootstrap",
        bootstrap,
        "--requests",
        topics.requests,
        "--replies",
        topics.replies,
        "--dlq",
        topics.dlq,
        "--group",
        group,
    ]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    # This checkout's code first, whatever the venv's editable install points at.
    paths = [str(WORKER_PROC.parents[2]), str(WORKER_PROC.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


async def wait_ready(proc: subprocess.Popen[str]) -> None:
    """Until the worker process says it is in its group."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    assert line.strip() == "ready", f"worker process did not start (exit code {proc.poll()})"
