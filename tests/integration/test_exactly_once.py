"""Exactly-once mode (``delivery=exactly_once``) against a real broker: a
``read_committed`` reader sees every reply once, through a worker killed mid-stream."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import TopicPartition
from worker_harness import (
    FakeEngine,
    TopicFactory,
    Topics,
    by_correlation_id,
    fresh_metrics,
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

from consumer.service.exactly_once import ExactlyOnce
from consumer.service.kafka_clients import (
    make_consumer,
    make_transactional_producer,
    transactional_id,
)
from consumer.service.membership import confirm_membership
from consumer.service.outputs import OutputRecord
from consumer.service.transactions import PartitionTransactions
from consumer.service.worker import Worker
from producer_sdk import RerankClient

pytestmark = pytest.mark.timeout(240)


async def test_replies_are_committed_in_transactions_and_read_once(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=2)
    config = worker_config(kafka_bootstrap, topics, new_group(), delivery="exactly_once")
    metrics = fresh_metrics()
    requests = [
        request(f"c-{i}", {"query": f"q{i}", "documents": ["a", "b"]}, partition=i % 2)
        for i in range(30)
    ]
    async with (
        reply_reader(kafka_bootstrap, topics, "read_committed") as replies,
        running_worker(config, FakeEngine(), metrics),
    ):
        await produce(kafka_bootstrap, topics.requests, requests)
        await replies.read(len(requests))
        await replies.quiet(1.0)
    answers = by_correlation_id(replies.records)
    assert set(answers) == {f"c-{i}" for i in range(30)}
    assert all(len(records) == 1 for records in answers.values())
    committed = metrics.registry.get_sample_value(
        "rerank_transactions_total", {"outcome": "committed"}
    )
    assert committed is not None and committed >= 1


async def test_the_sdk_reads_committed_replies(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    config = worker_config(kafka_bootstrap, topics, new_group(), delivery="exactly_once")
    async with (
        running_worker(config, FakeEngine()),
        RerankClient(
            kafka_bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            read_committed=True,
        ) as client,
    ):
        results = await asyncio.gather(*(client.rerank(f"q{i}", ["a", "b"]) for i in range(5)))
    assert all(len(result) == 2 for result in results)


async def test_a_worker_killed_mid_stream_leaves_no_duplicate_for_read_committed(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """kill -9 while answering: its open transactions are aborted; the next owner answers
    those requests again; a read_committed reader sees every reply exactly once."""
    topics = await make_topics(new_topic, request_partitions=2)
    group = new_group()
    count = 80
    requests = [
        request(f"req-{i}", {"query": f"q{i}", "documents": ["a", "b"]}) for i in range(count)
    ]
    slow = {"delay_s": 0.05, "high": 8, "low": 4, "delivery": "exactly_once"}
    proc = start_worker_process(kafka_bootstrap, topics, group, **slow)
    try:
        await wait_ready(proc)
        async with (
            reply_reader(kafka_bootstrap, topics, "read_committed") as committed,
            reply_reader(kafka_bootstrap, topics) as everything,
        ):
            await produce(kafka_bootstrap, topics.requests, requests)
            await committed.read(count // 4)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 30)
            restarted = start_worker_process(
                kafka_bootstrap, topics, group, delivery="exactly_once"
            )
            try:
                await wait_ready(restarted)
                await committed.read(count, timeout_s=90)
                await committed.quiet(2.0)
                await everything.quiet(0.5)
            finally:
                restarted.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(restarted.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    answers = by_correlation_id(committed.records)
    assert set(answers) == {f"req-{i}" for i in range(count)}
    duplicates = {cid: len(rs) for cid, rs in answers.items() if len(rs) > 1}
    assert duplicates == {}, duplicates


async def test_a_commit_whose_answer_was_lost_is_not_sent_again(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
) -> None:
    """The broker commits a transaction but its answer never arrives (a timeout): the
    fresh producer must not send that transaction's replies a second time."""
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group, delivery="exactly_once")
    tp = TopicPartition(topics.requests, 0)
    producers: list[AIOKafkaProducer] = []

    def make_producer() -> AIOKafkaProducer:
        producer = make_transactional_producer(config, transactional_id(config, tp.topic, 0))
        if not producers:  # the first one's commit answer is lost
            commit = producer.commit_transaction

            async def commit_then_time_out() -> None:
                await commit()
                raise KafkaTimeoutError

            producer.commit_transaction = commit_then_time_out  # type: ignore[method-assign]
        producers.append(producer)
        return producer

    read_committed = committed_offset_reader(kafka_admin, group, tp)

    txns = PartitionTransactions(tp, make_producer, group, read_committed, still_owner)
    await txns.start()
    try:
        for offset in range(5):
            txns.put(offset, _reply(topics, offset))
        assert not await txns.commit(5)  # committed, but the worker cannot know
        for offset in range(5, 10):
            txns.put(offset, _reply(topics, offset))
        assert await txns.commit(10)
    finally:
        for producer in producers:
            await producer.stop()
    await assert_each_reply_once(kafka_bootstrap, topics, 10)


async def test_a_new_owner_sends_nothing_the_last_owner_committed(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
) -> None:
    """The new owner of a partition read a committed offset older than the last owner's
    final commit (aiokafka reads it before the assignment callback, and the broker hides
    offsets of a commit still under way): it answered records the last owner's committed
    transaction answered already. A read_committed reader still sees each reply once."""
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group, delivery="exactly_once")
    tp = TopicPartition(topics.requests, 0)

    def make_producer() -> AIOKafkaProducer:
        return make_transactional_producer(config, transactional_id(config, tp.topic, 0))

    read_committed = committed_offset_reader(kafka_admin, group, tp)

    last_owner = PartitionTransactions(tp, make_producer, group, read_committed, still_owner)
    new_owner = PartitionTransactions(tp, make_producer, group, read_committed, still_owner)
    await last_owner.start()
    try:
        for offset in range(5):
            last_owner.put(offset, _reply(topics, offset))
        assert await last_owner.commit(5)
        await new_owner.start()  # fences the last owner
        # from the stale position 0, committing as records finish, every commit interval
        for start, upto in ((0, 2), (2, 4), (4, 7), (7, 10)):
            for offset in range(start, upto):
                new_owner.put(offset, _reply(topics, offset))
            assert await new_owner.commit(upto)
            # right after a commit a read may still show the offset before it: wait for
            # the one expected (the offset moved back never becomes it)
            expected = max(5, upto)
            await wait_until_async(read_committed, expected, "the group's offset went back")
    finally:
        await last_owner.stop()
        await new_owner.stop()
    await assert_each_reply_once(kafka_bootstrap, topics, 10)


async def test_the_next_producer_id_comes_after_the_last_commit_is_readable(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
) -> None:
    """What the check before a producer's first transaction relies on. Right after
    ``commit_transaction`` returns, a plain offset fetch may still show the offset before
    it (the broker writes the commit's markers afterwards; on the dev box half the reads
    were stale). Once the next producer of the transactional id has its id, it never
    does."""
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group, delivery="exactly_once")
    tp = TopicPartition(topics.requests, 0)
    tid = transactional_id(config, tp.topic, 0)
    read_committed = committed_offset_reader(kafka_admin, group, tp)
    producer = make_transactional_producer(config, tid)
    await producer.start()
    try:
        for upto in range(1, 21):
            await producer.begin_transaction()
            await producer.send_offsets_to_transaction({tp: upto}, group)
            await producer.commit_transaction()
            successor = make_transactional_producer(config, tid)
            await successor.start()
            await producer.stop()
            producer = successor
            await producer._txn_manager.wait_for_pid()
            assert await read_committed() == upto
    finally:
        await producer.stop()


async def still_owner() -> bool:
    """These tests' producers are the partition's owner: no group to ask."""
    return True


async def test_a_zombie_whose_transaction_failed_does_not_fence_the_new_owner(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
) -> None:
    """A worker paused past its session timeout wakes up with a partition whose last
    transaction failed (not as fenced), and commits. A fresh producer would fence the
    partition's new owner, and its transaction could commit the group's offset. Before
    starting one it asks the coordinator, which says it is no longer a member: nothing is
    fenced, and the new owner goes on answering."""
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group, delivery="exactly_once")
    tp = TopicPartition(topics.requests, 0)
    zombie = make_consumer(config)
    await zombie.start()
    try:
        zombie.subscribe([topics.requests])
        async with asyncio.timeout(30):
            while tp not in zombie.assignment():
                await zombie.getmany(timeout_ms=200)
        # paused: the process sends no heartbeat (nor anything else) from here on
        await zombie._coordinator._stop_heartbeat_task()
        engine = FakeEngine()
        async with (
            reply_reader(kafka_bootstrap, topics, "read_committed") as replies,
            running_worker(config, engine) as owner,
        ):
            await wait_until(
                lambda: tp in owner_transactions(owner), 30, "the new owner has the partition"
            )
            # the zombie wakes: its transaction had failed, so its next commit would
            # start a fresh producer for the partition
            zombies_txns = PartitionTransactions(
                tp,
                partial(make_transactional_producer, config, transactional_id(config, tp.topic, 0)),
                group,
                committed_offset_reader(kafka_admin, group, tp),
                partial(confirm_membership, zombie, tp),
            )
            zombies_txns.broken = True
            zombies_txns.put(0, _reply(topics, 99))
            try:
                assert not await zombies_txns.commit(1)
            finally:
                await zombies_txns.stop()
            await zombie.stop()  # it rejoins otherwise, and may take the partition back
            requests = [request(f"c-{i}", {"query": f"q{i}", "documents": ["a"]}) for i in range(3)]
            await produce(kafka_bootstrap, topics.requests, requests)
            await replies.read(3)
            await replies.quiet(1.0)
    finally:
        await zombie.stop()
    answers = by_correlation_id(replies.records)
    assert {cid: len(rs) for cid, rs in answers.items()} == {f"c-{i}": 1 for i in range(3)}


def committed_offset_reader(
    admin: AIOKafkaAdminClient, group: str, tp: TopicPartition
) -> Callable[[], Awaitable[int | None]]:
    """Reads ``group``'s committed offset of ``tp`` (None: none committed)."""

    async def read() -> int | None:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
        return offsets[tp].offset if tp in offsets and offsets[tp].offset >= 0 else None

    return read


async def assert_each_reply_once(bootstrap: str, topics: Topics, count: int) -> None:
    """A read_committed reader sees the replies c-0 .. c-<count-1>, each once."""
    async with reply_reader(bootstrap, topics, "read_committed") as replies:
        await replies.read(count)
        await replies.quiet(1.0)
    expected = sorted(f"c-{i}" for i in range(count))
    assert sorted(r.correlation_id for r in replies.records) == expected


async def wait_until_async(
    read: Callable[[], Awaitable[int | None]], expected: int, what: str, timeout_s: float = 10.0
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (seen := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {seen} != {expected}"
        await asyncio.sleep(0.05)


def owner_transactions(worker: Worker) -> dict[TopicPartition, PartitionTransactions]:
    """The exactly-once worker's partitions with a transactional producer."""
    running = worker._running
    return running.mode.transactions if running and isinstance(running.mode, ExactlyOnce) else {}


def _reply(topics: Topics, offset: int) -> OutputRecord:
    correlation_id = f"c-{offset}".encode()
    headers = [("correlation-id", correlation_id)]
    return OutputRecord(topics.replies, 0, correlation_id, b"{}", headers)


async def test_a_new_owner_fetches_from_the_last_owners_final_commit(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The new owner's consumer read its start before the last owner's final transaction
    (offset 6) was finished. Once its own producer has its id, it fetches from 6: the
    records before it are neither scored again nor answered twice."""
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group, delivery="exactly_once")
    tp = TopicPartition(topics.requests, 0)
    requests = [request(f"c-{i}", {"query": f"q{i}", "documents": ["a", "b"]}) for i in range(10)]
    starts: list[int] = []
    set_up_producers = ExactlyOnce._start

    async def last_owner_commits_meanwhile(
        mode: ExactlyOnce, assigned: set[TopicPartition]
    ) -> None:
        if not starts:
            async with asyncio.timeout(10):
                starts.append(await mode._consumer.position(tp))  # read before the commit
            last_owner = make_transactional_producer(config, transactional_id(config, tp.topic, 0))
            await last_owner.start()
            try:
                await last_owner.begin_transaction()
                await last_owner.send_offsets_to_transaction({tp: 6}, group)
                await last_owner.commit_transaction()
            finally:
                await last_owner.stop()
        await set_up_producers(mode, assigned)

    monkeypatch.setattr(ExactlyOnce, "_start", last_owner_commits_meanwhile)
    engine = FakeEngine()
    await produce(kafka_bootstrap, topics.requests, requests)
    async with (
        reply_reader(kafka_bootstrap, topics, "read_committed") as replies,
        running_worker(config, engine),
    ):
        await replies.read(4)
        await replies.quiet(1.0)
    assert starts == [0]  # the consumer's own start was the older one
    assert sorted(engine.seen) == [f"q{i}" for i in range(6, 10)]
    answers = by_correlation_id(replies.records)
    assert {cid: len(rs) for cid, rs in answers.items()} == {f"c-{i}": 1 for i in range(6, 10)}
