"""The worker under faults, against a real broker: nothing is lost and nothing is
committed that was not answered.

* a broker that is not there yet at start: the worker waits, says so, and joins later;
* a dead-letter topic that refuses a record for good: the record's partition is held
  and stays uncommitted until the topic takes it;
* records waiting behind an unfinished one: the partition stops fetching at the cap;
* an engine that fails for good: its worker steps aside, its requests are answered by
  the other worker of the group, and no error reply is sent for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition
from test_local_kafka import SMALL_HEAP, START_TIMEOUT_S, free_port_pair, kafka
from worker_harness import (
    QUERY_KILL_PROCESS,
    FakeEngine,
    Request,
    TopicFactory,
    TopicReader,
    Topics,
    by_correlation_id,
    committed_offset,
    dlq_reader,
    fresh_metrics,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    start_worker_process,
    topics_on,
    wait_until,
    worker_config,
)

from consumer.app import EXIT_FAILED, Parts, Service, make_kafka_worker
from consumer.engine.api import EngineFailed, ScoreRequest, ScoreResult
from consumer.service.partitions import Hold
from consumer.service.worker import Worker
from consumer.settings import Settings, settings_from

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


# ---------------------------------------------------------------- broker away at start


@contextlib.contextmanager
def broker_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        "KAFKA_PORT": str(free_port_pair()),
        "KAFKA_STATE_DIR": str(tmp_path / "state"),
        "KAFKA_HEAP_OPTS": SMALL_HEAP,
        "KAFKA_START_TIMEOUT": str(START_TIMEOUT_S),
    }
    try:
        yield env
    finally:
        kafka("stop", **env)


async def test_a_worker_started_before_its_broker_waits_and_then_answers(tmp_path: Path) -> None:
    """The broker is down when the worker starts (its data, topics included, is kept):
    the worker keeps trying, says why it is not ready, and answers once the broker is up."""
    with broker_env(tmp_path) as env:
        bootstrap = f"127.0.0.1:{env['KAFKA_PORT']}"
        assert (await asyncio.to_thread(kafka, "start", **env)).returncode == 0
        async with topics_on(bootstrap) as topics:
            pass
        assert (await asyncio.to_thread(kafka, "stop", **env)).returncode == 0

        config = worker_config(bootstrap, topics, f"test-group-{uuid.uuid4().hex}")
        worker = Worker(config, FakeEngine(), fresh_metrics())
        task = asyncio.create_task(worker.run())
        try:
            await wait_until(
                lambda: any("cannot connect to Kafka (retrying)" in r
                            for r in worker.not_ready_reasons),
                30,
                "the worker to say it waits for Kafka",
            )  # fmt: skip
            await asyncio.sleep(3)
            assert not task.done(), "the worker gave up instead of waiting"
            assert (await asyncio.to_thread(kafka, "start", **env)).returncode == 0
            await wait_until(lambda: worker.in_group or task.done(), 90, "the worker to join")
            async with reply_reader(bootstrap, topics) as replies:
                await produce(bootstrap, topics.requests, [_one("c-1")])
                (reply,) = await replies.read(1)
            assert reply.correlation_id == "c-1" and "results" in reply.json()
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 60)


async def test_a_worker_gives_up_on_an_absent_broker_after_the_connect_timeout() -> None:
    port = free_port_pair()  # nothing listens there
    names = Topics(*(f"test-{uuid.uuid4().hex}" for _ in range(3)))
    config = worker_config(f"127.0.0.1:{port}", names, "g", connect_timeout_s=3.0)
    worker = Worker(config, FakeEngine(), fresh_metrics())
    started = time.monotonic()
    with pytest.raises(KafkaConnectionError, match=r"cannot connect to Kafka after \d+ s"):
        await asyncio.wait_for(worker.run(), 30)
    assert time.monotonic() - started < 20


def _one(correlation_id: str, **body: Any) -> Request:
    return request(correlation_id, {"query": "q", "documents": ["a"], **body})


# ------------------------------------------------------- a dead-letter topic that refuses


@contextlib.asynccontextmanager
async def sized_topic(kafka_admin: AIOKafkaAdminClient, max_bytes: int) -> AsyncIterator[str]:
    """A topic whose records may not exceed ``max_bytes``."""
    name = f"test-{uuid.uuid4().hex}"
    configs = {"max.message.bytes": str(max_bytes)}
    await kafka_admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs)])
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            await kafka_admin.delete_topics([name])


async def test_a_record_too_large_for_the_dead_letter_topic_is_dead_lettered_as_a_pointer(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
) -> None:
    """No correlation id anywhere: the record must go to the dead-letter topic, which is
    too small for a copy. It was retried for ever, its partition held and its offset
    never committed, so the good request behind it was never answered. Now a pointer
    goes instead: the source coordinates and size, the request's headers, no value."""
    async with sized_topic(kafka_admin, max_bytes=1024) as dlq:
        topics = Topics(await new_topic(), await new_topic(partitions=2), dlq)
        config = worker_config(kafka_bootstrap, topics, new_group())
        metrics = fresh_metrics()
        big_unanswerable = Request(value=b"x" * 4000, headers=[("trace", b"t-1")])
        tp = TopicPartition(topics.requests, 0)
        async with (
            reply_reader(kafka_bootstrap, topics) as replies,
            dlq_reader(kafka_bootstrap, topics) as dead,
            running_worker(config, FakeEngine(), metrics) as worker,
        ):
            await produce(kafka_bootstrap, topics.requests, [_one("c-0"), big_unanswerable])
            await produce(kafka_bootstrap, topics.requests, [_one("c-2")])
            (record,) = await dead.read(1, timeout_s=30)
            await replies.read(2)  # c-0, and c-2 behind the record
            assert await committed_offset(kafka_bootstrap, config.group_id, tp, 3, 20) == 3
            assert not worker.holds(tp)
    headers = dict(record.headers)
    assert record.value == b""
    assert headers["error-code"] == b"invalid_request"
    assert (headers["source-topic"], headers["source-offset"]) == (topics.requests.encode(), b"1")
    assert int(headers["source-size"]) >= 4000
    assert headers["trace"] == b"t-1"  # the request's own headers come along
    assert b"too large to copy" in headers["error-message"]
    assert metrics.registry.get_sample_value("rerank_dead_letter_blocked") == 0


# ------------------------------------------------------------- the uncommitted backlog


class HoldingEngine(FakeEngine):
    """Holds the request whose query is ``"first"`` until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = False

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if request.query == "first":
            self.holding = True
            await self.release.wait()
        return await super().score(request)


async def test_records_waiting_behind_an_unfinished_one_stop_fetching_at_the_cap(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    config = worker_config(kafka_bootstrap, topics, new_group(), max_uncommitted_records=5)
    engine = HoldingEngine()
    tp = TopicPartition(topics.requests, 0)
    first = request("c-first", {"query": "first", "documents": ["a"]})
    wave = [_one(f"c-{i}") for i in range(10)]
    later = [_one(f"c-later-{i}") for i in range(20)]
    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, engine) as worker,
    ):
        await produce(kafka_bootstrap, topics.requests, [first, *wave])
        await wait_until(
            lambda: Hold.UNCOMMITTED_BACKLOG in worker.holds(tp), 20, "the backlog cap"
        )
        await produce(kafka_bootstrap, topics.requests, later)
        await asyncio.sleep(1.5)
        assert engine.seen == ["q"] * len(wave)  # (the held one is not in it yet): none later
        assert tp in worker._running.consumer.paused()  # type: ignore[union-attr]
        engine.release.set()
        await replies.read(1 + len(wave) + len(later))
        total = 1 + len(wave) + len(later)
        assert await committed_offset(kafka_bootstrap, config.group_id, tp, total, 20) == total
        assert not worker.holds(tp)


# ---------------------------------------------------------------- an engine that fails


class FailingAfter(FakeEngine):
    """Scores ``good`` requests, then fails for good (a GPU that dies)."""

    def __init__(self, good: int) -> None:
        super().__init__(delay_s=0.02)
        self.good = good

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if self.failed is None and len(self.seen) >= self.good:
            self.failed = "the model failed its check batch (simulated)"
        if self.failed is not None:
            self.seen.append(request.query)
            raise EngineFailed(self.failed)
        return await super().score(request)


def service_settings(bootstrap: str, topics: Topics, group: str) -> Settings:
    return settings_from(
        {
            "bootstrap_servers": bootstrap,
            "request_topic": topics.requests,
            "reply_topic": topics.replies,
            "dlq_topic": topics.dlq,
            "group_id": group,
            "allowed_reply_topics": r"test-[0-9a-f]{32}",
            "http_host": "127.0.0.1",
            "http_port": 0,
        }
    )


class _Model:
    name = "fake-model"
    device = "cpu"


async def test_a_worker_whose_engine_fails_steps_aside_and_the_group_answers_for_it(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """The failing worker sends no error replies and exits 1; every request it could not
    score stays uncommitted and is answered by the other (healthy) worker."""
    topics = await make_topics(new_topic, request_partitions=2)
    group = new_group()
    failing = FailingAfter(good=3)
    parts = Parts(
        load_model=lambda _settings: _Model(),  # type: ignore[arg-type,return-value]
        make_engine=lambda *_args: failing,
        make_worker=make_kafka_worker,
    )
    service = Service(service_settings(kafka_bootstrap, topics, group), parts, fresh_metrics())
    requests = [
        request(f"c-{i}", {"query": f"q{i}", "documents": ["a", "b"]}, partition=i % 2)
        for i in range(40)
    ]
    async with reply_reader(kafka_bootstrap, topics) as replies:
        running = asyncio.create_task(service.run())
        await wait_until(lambda: not service.readiness(), 60, "the failing worker to join")
        await produce(kafka_bootstrap, topics.requests, requests)
        assert await asyncio.wait_for(running, 90) == EXIT_FAILED
        assert failing.failure is not None
        config = worker_config(kafka_bootstrap, topics, group)
        async with running_worker(config, FakeEngine()):
            deadline = asyncio.get_running_loop().time() + 60
            while len(by_correlation_id(replies.records)) < len(requests):
                assert asyncio.get_running_loop().time() < deadline, "requests went missing"
                await replies.poll()
    answers = by_correlation_id(replies.records)
    assert set(answers) == {f"c-{i}" for i in range(40)}
    assert all("error" not in r.json() for rs in answers.values() for r in rs)


# ------------------------------------------------------------ a record that kills the process


async def test_a_record_that_kills_the_process_is_dead_lettered_after_max_attempts(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """The poison record kills every worker process that scores it. Restarted workers
    (static membership: each restart takes the partition over at once) count the
    attempts in the commit metadata, dead-letter it at the limit with a clear code, tell
    its client, and answer everything else."""
    topics = await make_topics(new_topic)
    group = new_group()
    poison = request("c-poison", {"query": QUERY_KILL_PROCESS, "documents": ["a"]})
    good = [_one(f"c-{i}") for i in range(6)]
    requests = [*good[:3], poison, *good[3:]]
    crashes = 0
    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        dlq_reader(kafka_bootstrap, topics) as dead,
    ):
        await produce(kafka_bootstrap, topics.requests, requests)
        for _ in range(MAX_ATTEMPTS + 3):
            proc = start_worker_process(
                kafka_bootstrap,
                topics,
                group,
                instance_id="worker-0",
                max_attempts=MAX_ATTEMPTS,
            )
            try:
                code = await asyncio.to_thread(_exit_or_none, proc, 20)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(proc.wait, 60)
            if code is None:
                break  # it survived: the poison record is behind it
            crashes += 1
        (dead_letter,) = await dead.read(1, timeout_s=30)
        answered = by_correlation_id(await replies.read(len(requests)))

    assert 1 <= crashes <= MAX_ATTEMPTS + 2, crashes
    assert dead_letter.headers["error-code"] == b"poison_record"
    assert dead_letter.value == poison.value
    assert "error" in answered["c-poison"][-1].json()
    assert answered["c-poison"][-1].json()["error"]["code"] == "internal"
    assert {r.key.decode() for r in good if r.key} <= set(answered)


MAX_ATTEMPTS = 3


def _exit_or_none(proc: subprocess.Popen[str], seconds: float) -> int | None:
    """The process's exit code once it ends, or None if it still runs after ``seconds``."""
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_large_record_the_topics_allow_is_dead_lettered_whole(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    new_group: Callable[[], str],
    delivery: str,
) -> None:
    """Request and dead-letter topics raised to 4 MiB, a 2 MB record that can only be
    dead-lettered (no correlation id): the worker accepts requests up to 4,000,000 bytes,
    but its producers kept Kafka's 1 MiB default (exactly-once: a fixed 1 MiB - 1 KiB), so
    the copy was refused and retried for ever, and the request behind it never answered.
    The producers' limit now follows the request limit."""
    four_mib = str(4 * 1024 * 1024)
    async with (
        sized_topic(kafka_admin, max_bytes=int(four_mib)) as requests,
        sized_topic(kafka_admin, max_bytes=int(four_mib)) as dlq,
        sized_topic(kafka_admin, max_bytes=1024 * 1024) as replies,
    ):
        topics = Topics(requests, replies, dlq)
        config = worker_config(kafka_bootstrap, topics, new_group(), delivery=delivery)
        big = Request(value=b"x" * 2_000_000)
        tp = TopicPartition(requests, 0)
        isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
        async with (
            reply_reader(kafka_bootstrap, topics, isolation) as replies_seen,
            TopicReader(kafka_bootstrap, dlq, 1, isolation) as dead,
            running_worker(config, FakeEngine()),
        ):
            await produce(kafka_bootstrap, requests, [big, _one("c-1")], max_bytes=5_000_000)
            (record,) = await dead.read(1, timeout_s=60)
            await replies_seen.read(1)
            assert await committed_offset(kafka_bootstrap, config.group_id, tp, 2, 30) == 2
    assert record.value == big.value
    assert record.headers["source-offset"] == b"0"


async def test_a_slow_request_let_go_on_purpose_is_no_poison_record(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """A valid request still in flight when its worker stops (its drain runs out) or is
    revoked: the worker did not die on it, so the attempt it counted is taken back. It
    counted before, and three rebalances (autoscaling) dead-lettered a good request as a
    poison record."""
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(
        kafka_bootstrap, topics, group, drain_timeout_s=1.0, max_record_attempts=3
    )
    tp = TopicPartition(topics.requests, 0)
    slow = request("c-slow", {"query": "first", "documents": ["a"]})
    await produce(kafka_bootstrap, topics.requests, [slow])
    for _ in range(config.max_record_attempts + 1):
        engine = HoldingEngine()  # never lets "first" through: a slow request
        async with running_worker(config, engine):
            await wait_until(lambda e=engine: e.holding, 30, "the slow request in flight")
        # stopped: the drain ran out with the request unanswered
    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        dlq_reader(kafka_bootstrap, topics) as dead,
        running_worker(config, FakeEngine()),
    ):
        (answer,) = await replies.read(1)
        assert await dead.quiet(1.0) == []
    assert answer.correlation_id == "c-slow" and "results" in answer.json()
    assert await committed_offset(kafka_bootstrap, group, tp, 1, 20) == 1
