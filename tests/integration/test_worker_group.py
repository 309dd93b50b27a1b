"""Workers of one group share the partitions; when one leaves, the others take over."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from worker_harness import (
    FakeEngine,
    Request,
    TopicFactory,
    by_correlation_id,
    committed_offset,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    wait_until,
    worker_config,
)

from consumer.engine.api import ScoreRequest, ScoreResult
from consumer.service.worker import Worker

pytestmark = pytest.mark.timeout(120)

PARTITIONS = 4


def _batch(prefix: str, count: int) -> list[Request]:
    return [
        request(
            f"{prefix}-{i}",
            {"query": f"{prefix} {i}", "documents": ["a", "b"]},
            partition=i % PARTITIONS,
        )
        for i in range(count)
    ]


async def test_two_workers_split_the_partitions_and_one_takes_over_when_the_other_stops(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=PARTITIONS)
    config = worker_config(kafka_bootstrap, topics, new_group())
    engine_a, engine_b = FakeEngine(delay_s=0.01), FakeEngine(delay_s=0.01)
    first, second = _batch("first", 40), _batch("second", 40)

    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, engine_a) as a,
    ):
        async with running_worker(config, engine_b) as b:
            await wait_until(
                lambda: (
                    len(a.assignment) + len(b.assignment) == PARTITIONS
                    and bool(a.assignment)
                    and bool(b.assignment)
                    and a.in_group
                    and b.in_group
                ),
                30,
                "the partitions to be split between both workers",
            )
            assert not a.assignment & b.assignment
            await produce(kafka_bootstrap, topics.requests, first)
            await replies.read(len(first))
        # b has left the group: a gets every partition and answers the rest.
        await wait_until(lambda: len(a.assignment) == PARTITIONS and a.in_group, 30, "takeover")
        await produce(kafka_bootstrap, topics.requests, second)
        await replies.read(len(first) + len(second))
        await replies.quiet(0.5)

    received = by_correlation_id(replies.records)
    assert set(received) == {r.key.decode() for r in first + second if r.key}
    assert all(len(v) == 1 for v in received.values()), "a clean handover repeats nothing"
    first_queries = {f"first {i}" for i in range(len(first))}
    assert first_queries & set(engine_a.seen) and first_queries & set(engine_b.seen)
    assert {f"second {i}" for i in range(len(second))} <= set(engine_a.seen)


async def test_a_rebalance_mid_work_loses_no_request(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=PARTITIONS)
    config = worker_config(
        kafka_bootstrap,
        topics,
        new_group(),
        inflight_high_pairs=8,
        inflight_low_pairs=4,
    )
    requests = _batch("req", 80)
    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, FakeEngine(delay_s=0.05, blocking=True)),
    ):
        await produce(kafka_bootstrap, topics.requests, requests)
        await replies.read(10)
        # A second member joins while the first is busy: the first's partitions are
        # revoked with requests in flight.
        async with running_worker(config, FakeEngine(delay_s=0.05, blocking=True)):
            deadline = asyncio.get_running_loop().time() + 60
            while len(by_correlation_id(replies.records)) < len(requests):
                assert asyncio.get_running_loop().time() < deadline, "requests went missing"
                await replies.poll()

    assert set(by_correlation_id(replies.records)) == {r.key.decode() for r in requests if r.key}


class LoopBlockingEngine(FakeEngine):
    """Blocks the event loop (a bug no real engine should have) once, for ``block_s``,
    so that the worker misses its heartbeats and the group drops it."""

    def __init__(self, block_s: float) -> None:
        super().__init__()
        self.block_s = block_s
        self.blocked = False

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if request.query == "block" and not self.blocked:
            self.blocked = True
            time.sleep(self.block_s)
        return await super().score(request)


async def test_lost_membership_commits_nothing_and_every_request_is_still_answered(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_ms = 6000
    topics = await make_topics(new_topic)
    config = worker_config(kafka_bootstrap, topics, new_group(), session_timeout_ms=session_ms)
    requests = [request("block", {"query": "block", "documents": ["a"]})] + [
        request(f"req-{i}", {"query": f"q{i}", "documents": ["a"]}) for i in range(5)
    ]
    engine = LoopBlockingEngine(block_s=session_ms / 1000 + 3)
    caplog.set_level(logging.INFO, logger="consumer.service.rebalance")

    def lost() -> bool:
        return any(r.getMessage() == "partitions lost" for r in caplog.records)

    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, engine) as worker,
    ):
        commits = spy_on_commits(worker)
        await produce(kafka_bootstrap, topics.requests, requests)
        await wait_until(lambda: engine.blocked, 20, "the engine to block")
        await wait_until(lambda: lost() and worker.in_group, 30, "membership lost and rejoined")
        deadline = asyncio.get_running_loop().time() + 60
        while len(by_correlation_id(replies.records)) < len(requests):
            assert asyncio.get_running_loop().time() < deadline, "requests went missing"
            await replies.poll()
        # Nothing was committed before the membership was lost, so the rejoined worker
        # answers every record again and commits them all.
        tp = TopicPartition(topics.requests, 0)
        committed = await committed_offset(kafka_bootstrap, config.group_id, tp, len(requests), 30)
        assert committed == len(requests)

    assert set(by_correlation_id(replies.records)) == {r.key.decode() for r in requests if r.key}
    # Between losing the membership and being assigned partitions again, the worker sent
    # no commit to the broker (the partitions may be another member's by then) ...
    lost_at = min(r.created for r in caplog.records if r.getMessage() == "partitions lost")
    back_at = min(
        r.created
        for r in caplog.records
        if r.getMessage() == "partitions assigned" and r.created > lost_at
    )
    assert not [t for t in commits if lost_at <= t <= back_at], (lost_at, back_at, commits)
    # ... while it did commit once it was back (the spy sees commits).
    assert [t for t in commits if t > back_at]


def spy_on_commits(worker: Worker) -> list[float]:
    """Times (``time.time()``) of every commit the worker's Kafka consumer sends."""
    assert worker._running is not None
    consumer = worker._running.consumer
    times: list[float] = []
    commit = consumer.commit

    async def recorded(*args: Any, **kwargs: Any) -> None:
        times.append(time.time())
        await commit(*args, **kwargs)

    consumer.commit = recorded  # type: ignore[method-assign]
    return times
