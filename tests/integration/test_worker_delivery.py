"""At-least-once: committed offsets survive a clean stop, and a killed worker's unanswered
requests are answered after a restart (duplicates allowed, none missing)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest
from worker_harness import (
    FakeEngine,
    TopicFactory,
    by_correlation_id,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    start_worker_process,
    wait_ready,
    wait_until,
    worker_config,
)

pytestmark = pytest.mark.timeout(180)


async def test_a_restarted_worker_gets_nothing_redelivered_after_a_clean_stop(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=2)
    group = new_group()
    first = [request(f"first-{i}", {"query": "q", "documents": ["a", "b"]}) for i in range(30)]
    config = worker_config(kafka_bootstrap, topics, group)
    async with reply_reader(kafka_bootstrap, topics) as replies:
        async with running_worker(config, FakeEngine()):
            await produce(kafka_bootstrap, topics.requests, first)
            await replies.read(len(first))

        engine = FakeEngine()
        async with running_worker(config, engine):
            await produce(
                kafka_bootstrap,
                topics.requests,
                [request("second", {"query": "q2", "documents": ["a"]})],
            )
            await replies.read(len(first) + 1)
            await replies.quiet(1.0)

    received = by_correlation_id(replies.records)
    assert len(replies.records) == len(first) + 1, "nothing answered twice"
    assert set(received) == {r.key.decode() for r in first if r.key} | {"second"}
    assert engine.seen == ["q2"], "the restarted worker saw only the new request"


async def test_after_kill_9_mid_batch_every_request_is_answered(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=2)
    group = new_group()
    count = 80
    requests = [
        request(f"req-{i}", {"query": f"q{i}", "documents": ["a", "b"]}) for i in range(count)
    ]
    # A slow engine and a low high-water mark keep the worker mid-batch for a while.
    slow = {"delay_s": 0.1, "high": 8, "low": 4}
    proc = start_worker_process(kafka_bootstrap, topics, group, **slow)
    try:
        await wait_ready(proc)
        async with reply_reader(kafka_bootstrap, topics) as replies:
            await produce(kafka_bootstrap, topics.requests, requests)
            await replies.read(count // 4)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 30)
            answered_before_kill = {r.correlation_id for r in replies.records}
            assert len(answered_before_kill) < count, "killed mid-batch, not after the end"

            # The group still holds the dead member until its session times out; the new
            # worker takes over then, from the last committed offsets.
            restarted = start_worker_process(kafka_bootstrap, topics, group)
            try:
                await wait_ready(restarted)
                deadline = asyncio.get_running_loop().time() + 60
                while len(by_correlation_id(replies.records)) < count:
                    assert asyncio.get_running_loop().time() < deadline, "requests went missing"
                    await replies.poll()
            finally:
                restarted.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(restarted.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    received = by_correlation_id(replies.records)
    assert set(received) == {f"req-{i}" for i in range(count)}
    for cid, records in received.items():
        assert all(r.json()["id"] == cid for r in records)


async def test_stop_finishes_in_flight_requests_and_commits_them(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    config = worker_config(kafka_bootstrap, topics, new_group(), commit_interval_s=60.0)
    requests = [request(f"req-{i}", {"query": f"q{i}", "documents": ["a"]}) for i in range(5)]
    engine = FakeEngine(delay_s=1.0, blocking=True)
    async with reply_reader(kafka_bootstrap, topics) as replies:
        async with running_worker(config, engine):
            await produce(kafka_bootstrap, topics.requests, requests)
            await wait_until(lambda: len(engine.seen) == len(requests), 20, "work in flight")
            assert replies.records == [] or len(replies.records) < len(requests)
        # running_worker has asked the worker to stop and waited for run() to return:
        # the in-flight requests were answered and committed (the periodic commit is
        # far away, so only the final commit can have done it).
        await replies.read(len(requests))
        restarted = FakeEngine()
        async with running_worker(config, restarted):
            await replies.quiet(1.0)
    assert restarted.seen == []
    assert len(replies.records) == len(requests)


async def test_requests_still_running_at_the_drain_timeout_are_redelivered(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group, drain_timeout_s=0.5)
    requests = [request(f"req-{i}", {"query": f"q{i}", "documents": ["a"]}) for i in range(3)]
    stuck = FakeEngine(delay_s=30.0)
    async with reply_reader(kafka_bootstrap, topics) as replies:
        async with running_worker(config, stuck):
            await produce(kafka_bootstrap, topics.requests, requests)
            await wait_until(lambda: len(stuck.seen) == len(requests), 20, "work in flight")
        assert await replies.quiet(0.5) == [], "nothing answered by the stopped worker"
        async with running_worker(config, FakeEngine()):
            await replies.read(len(requests))
    assert {r.correlation_id for r in replies.records} == {f"req-{i}" for i in range(3)}
