"""Flow control: the worker pauses above its high mark and resumes below its low mark, and
stays in its group while the engine is busy for longer than the poll interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
from aiokafka import AIOKafkaConsumer
from worker_harness import (
    FakeEngine,
    TopicFactory,
    by_correlation_id,
    fresh_metrics,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    wait_until,
    worker_config,
)

from benchmarks.window_fairness import SteadyEngine
from consumer.service import worker as worker_module
from consumer.service.kafka_clients import make_consumer
from consumer.service.worker import Worker
from consumer.service.worker_config import WorkerConfig

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


@contextlib.asynccontextmanager
async def sampling(probe: Callable[[], T], every_s: float = 0.005) -> AsyncIterator[list[T]]:
    """Collects ``probe()`` every few ms while the block runs."""
    samples: list[T] = []

    async def sample() -> None:
        while True:
            samples.append(probe())
            await asyncio.sleep(every_s)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_consumer_pauses_above_the_high_mark_and_resumes(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=2)
    high, low, docs_per_request = 4, 2, 2
    config = worker_config(
        kafka_bootstrap,
        topics,
        new_group(),
        inflight_high_pairs=high,
        inflight_low_pairs=low,
        lag_interval_s=0.1,
    )
    requests = [
        request(
            f"req-{i}", {"query": f"q{i}", "documents": ["a"] * docs_per_request}, partition=i % 2
        )
        for i in range(40)
    ]
    metrics = fresh_metrics()
    # The backlog must outlast a lag round trip or two. (At 20 ms a batch the 40 requests
    # were once answered before any lag update came back, when the lag's ListOffsets
    # shared the consumer's connection and waited behind its fetch long-poll.)
    engine = FakeEngine(delay_s=0.06, blocking=True)

    def state(worker: Worker) -> tuple[bool, int, float | None]:
        paused_gauge = metrics.registry.get_sample_value("rerank_consumer_paused")
        return worker.paused, worker.in_flight_pairs, paused_gauge

    def lag() -> float:
        return sum(
            metrics.registry.get_sample_value(
                "rerank_consumer_lag", {"topic": topics.requests, "partition": str(p)}
            )
            or 0.0
            for p in range(2)
        )

    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, engine, metrics) as worker,
    ):
        async with sampling(lambda: state(worker)) as samples, sampling(lag) as lags:
            await produce(kafka_bootstrap, topics.requests, requests)
            await replies.read(len(requests))
            await wait_until(lambda: lag() == 0, 10, "the lag to reach 0")
        # A reply can be read before the worker has taken its ack (its loop is blocked by
        # this engine 60 ms a request): the last ones settle a moment later.
        settled = (False, 0, 0)
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: state(worker) == settled, 5, "the last acks")
        final = state(worker)

    assert set(by_correlation_id(replies.records)) == {f"req-{i}" for i in range(len(requests))}
    paused_flags = [s[0] for s in samples]
    assert any(paused_flags), "the consumer paused"
    first_pause = paused_flags.index(True)
    assert not all(paused_flags[first_pause:]), "and resumed"
    assert any(s[2] == 1 for s in samples), "the paused metric showed it"
    assert final == (False, 0, 0)
    # A poll takes about what fits below the high mark, so the overshoot is bounded
    # (by one poll's worth), far below taking every request at once.
    peak = max(s[1] for s in samples)
    assert peak <= 2 * high + docs_per_request
    assert engine.max_in_flight_pairs <= peak
    assert max(lags) > 0, "the backlog behind the paused partitions showed as lag"


async def test_the_lag_follows_the_backlog_while_the_consumer_long_polls(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every record is fetched into the worker's lookahead at once; each resume then sends
    a fetch that long-polls for more, with nothing new to come. A lag update on the
    consumer's own connection waited behind that poll (the broker answers a connection's
    requests one at a time), so the lag stayed stale for up to fetch_max_wait_ms. Here the
    poll lasts 10 s; the lag must still follow the backlog down to 0 within 3 s of the
    last reply (without the fix it stayed at 2)."""
    long_poll_ms = 10_000

    def long_polling_consumer(config: WorkerConfig) -> AIOKafkaConsumer:
        consumer = make_consumer(config)
        consumer._fetch_max_wait_ms = long_poll_ms  # read when the consumer starts
        return consumer

    monkeypatch.setattr(worker_module, "make_consumer", long_polling_consumer)
    topics = await make_topics(new_topic)
    config = worker_config(
        kafka_bootstrap,
        topics,
        new_group(),
        inflight_high_pairs=2,
        inflight_low_pairs=1,
        lag_interval_s=0.1,
    )
    requests = [request(f"req-{i}", {"query": "q", "documents": ["a"]}) for i in range(24)]
    metrics = fresh_metrics()

    def lag() -> float:
        sample = metrics.registry.get_sample_value(
            "rerank_consumer_lag", {"topic": topics.requests, "partition": "0"}
        )
        return sample or 0.0

    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, FakeEngine(delay_s=0.25, blocking=True), metrics),
    ):
        await asyncio.sleep(1.0)  # the consumer is long-polling an empty partition
        async with sampling(lag, every_s=0.02) as lags:
            await produce(kafka_bootstrap, topics.requests, requests)
            await replies.read(len(requests), timeout_s=30)
        assert max(lags) > 0, "the backlog in the worker showed as lag"
        await wait_until(lambda: lag() == 0, 3, "the lag to follow the answered backlog to 0")


async def test_a_busy_engine_does_not_cost_the_group_membership(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each request keeps the (blocking, threaded) engine busy for longer than the poll
    # interval, with the partition paused meanwhile: the worker must keep polling anyway.
    poll_interval_ms, session_ms = 1000, 6000
    busy_s = 2 * poll_interval_ms / 1000
    topics = await make_topics(new_topic)
    config = worker_config(
        kafka_bootstrap,
        topics,
        new_group(),
        max_poll_interval_ms=poll_interval_ms,
        session_timeout_ms=session_ms,
        inflight_high_pairs=1,
        inflight_low_pairs=0,
    )
    requests = [request("slow", {"query": "q", "documents": ["a", "b"]})]
    caplog.set_level(logging.INFO, logger="consumer.service.rebalance")
    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, FakeEngine(delay_s=busy_s, blocking=True)) as worker,
        sampling(lambda: worker.in_group, every_s=0.05) as in_group,
    ):
        await produce(kafka_bootstrap, topics.requests, requests)
        await replies.read(len(requests), timeout_s=4 * busy_s)
        await replies.quiet(0.5)

    assert all(in_group), "never left the group"
    messages = [r.getMessage() for r in caplog.records if r.name == "consumer.service.rebalance"]
    assert "partitions lost" not in messages and "partitions revoked" not in messages
    assert len(replies.records) == len(requests), "each request answered once"


async def test_the_in_flight_window_holds_target_seconds_of_work(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """A slow model: the worker keeps about inflight_target_s of work in flight and leaves
    the rest in Kafka, instead of taking the configured 4,096 pairs (here: all of them)."""
    topics = await make_topics(new_topic, request_partitions=2)
    pairs_per_s, target_s, docs = 400.0, 0.5, 4
    config = worker_config(
        kafka_bootstrap,
        topics,
        new_group(),
        inflight_high_pairs=4096,
        inflight_low_pairs=2048,
        inflight_target_s=target_s,
        inflight_min_pairs=8,
    )
    requests = [
        request(f"req-{i}", {"query": f"q{i}", "documents": ["a"] * docs}, partition=i % 2)
        for i in range(500)
    ]  # 2,000 pairs: 5 s of this engine's work
    metrics = fresh_metrics()
    window = int(pairs_per_s * target_s)  # the most: the engine is never faster

    def state(worker: Worker) -> tuple[int, float | None]:
        shown = metrics.registry.get_sample_value("rerank_in_flight_window_pairs")
        return worker.in_flight_pairs, shown

    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, SteadyEngine(pairs_per_s), metrics) as worker,
        sampling(lambda: state(worker), every_s=0.01) as samples,
    ):
        await produce(kafka_bootstrap, topics.requests, requests)
        await replies.read(len(requests), timeout_s=60)

    assert set(by_correlation_id(replies.records)) == {f"req-{i}" for i in range(len(requests))}
    assert len(replies.records) == len(requests), "each request answered once"
    in_flight = [pairs for pairs, _ in samples]
    shown = [mark for _, mark in samples if mark is not None]
    # a poll takes what fits below the mark: one poll's worth of overshoot at most
    assert max(in_flight) <= 2 * window + docs, max(in_flight)
    assert max(in_flight) >= 8, "the window let work in"
    assert min(shown) >= 8 and max(shown) <= window, (min(shown), max(shown))
    assert max(shown) > 8, "a rate was measured and the mark followed it"


async def test_when_the_room_limits_a_poll_the_oldest_requests_go_first(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """60 requests wait on each of two partitions when the worker starts, and only 8
    pairs fit in flight. By their timestamps, partition 1's first 30 are the oldest, then
    all of partition 0's, then partition 1's last 30. The worker lets them in in that
    order. (aiokafka alone hands out one partition's fetched records until they run out;
    shares by backlog, the worker's poll before, alternate between the two partitions.)"""
    topics = await make_topics(new_topic, request_partitions=2)
    config = worker_config(
        kafka_bootstrap, topics, new_group(), inflight_high_pairs=8, inflight_low_pairs=4
    )
    sent_at = int(time.time() * 1000) - 60_000
    partitions = [1] * 30 + [0] * 60 + [1] * 30  # in the order they were sent
    sent = [f"q{i}" for i in range(len(partitions))]
    requests = [
        request(query, {"query": query, "documents": ["x"]}, partition=p, timestamp_ms=sent_at + i)
        for i, (query, p) in enumerate(zip(sent, partitions, strict=True))
    ]
    # all of partition 0 is produced before partition 1
    await produce(kafka_bootstrap, topics.requests, sorted(requests, key=lambda r: r.partition))
    engine = FakeEngine(delay_s=0.005)
    async with (
        reply_reader(kafka_bootstrap, topics) as replies,
        running_worker(config, engine),
    ):
        await replies.read(len(sent), timeout_s=60)

    assert len(replies.records) == len(sent) and sorted(engine.seen) == sorted(sent)
    # Once both partitions' records are at hand, each request is let in in the order
    # sent. Before that, the first poll or two may see one partition's records only.
    place = {query: i for i, query in enumerate(sent)}
    order = [place[query] for query in engine.seen]
    settled = next(k for k in range(len(order)) if order[k:] == sorted(order[k:]))
    assert settled <= 16, " ".join(engine.seen)
    for p in (0, 1):
        of_p = [q for q, qp in zip(sent, partitions, strict=True) if qp == p]
        assert [q for q in engine.seen if q in of_p] == of_p, f"partition {p} out of order"
