"""What the worker reports for its health checks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from worker_harness import (
    FakeEngine,
    TopicFactory,
    Topics,
    fresh_metrics,
    make_topics,
    running_worker,
    wait_until,
    worker_config,
)

from consumer.service.worker import Worker

pytestmark = pytest.mark.timeout(60)


async def test_ready_once_in_the_group_and_not_while_stopping(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    worker = Worker(worker_config(kafka_bootstrap, topics, new_group()), FakeEngine())
    assert "not connected to Kafka yet" in worker.not_ready_reasons
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.ready, 30, "readiness")
        assert worker.in_group
        assert worker.not_ready_reasons == []
        assert worker.seconds_since_poll < 5
    finally:
        worker.request_stop()
        assert worker.not_ready_reasons == ["stopping"]
        await asyncio.wait_for(task, 30)
    assert not worker.in_group


async def test_a_missing_topic_keeps_the_worker_not_ready_until_it_exists(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    kafka_admin: AIOKafkaAdminClient,
) -> None:
    made = await make_topics(new_topic)
    dlq = f"test-{uuid.uuid4().hex}"
    topics = Topics(requests=made.requests, replies=made.replies, dlq=dlq)
    config = worker_config(kafka_bootstrap, topics, new_group(), lag_interval_s=0.1)
    async with running_worker(config, FakeEngine(), fresh_metrics()) as worker:
        assert f"topic {dlq!r} does not exist" in worker.not_ready_reasons
        await kafka_admin.create_topics([NewTopic(dlq, 1, 1)])
        try:
            await wait_until(lambda: worker.ready, 20, "the topic to be found")
        finally:
            await kafka_admin.delete_topics([dlq])
