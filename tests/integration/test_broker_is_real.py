"""The broker is a real Kafka (4.1.1) and aiokafka (0.14) can use every feature we rely on.

Keys and headers survive a round trip, a consumer group resumes from its committed offset,
an idempotent producer keeps order, and transactions commit and abort for real.
"""

import asyncio
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

TopicFactory = Callable[..., Awaitable[str]]
READ_TIMEOUT_S = 20.0


async def read_records(consumer: AIOKafkaConsumer, count: int) -> list[ConsumerRecord]:
    """Reads exactly ``count`` records (fails the test if they do not come in time)."""
    records: list[ConsumerRecord] = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        while len(records) < count:
            batches = await consumer.getmany(timeout_ms=200, max_records=count - len(records))
            for batch in batches.values():
                records.extend(batch)
    return records


async def read_values_through(consumer: AIOKafkaConsumer, last_value: bytes) -> list[bytes]:
    """Reads values up to and including ``last_value``."""
    values: list[bytes] = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        while last_value not in values:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                values.extend(record.value for record in batch if record.value is not None)
    return values


def earliest_consumer(bootstrap: str, topic: str, **config: object) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", **config
    )


async def test_keys_headers_and_order_survive_a_round_trip(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    sent = [
        (f"key-{i}".encode(), f"value-{i}".encode(), [("trace", f"t{i}".encode()), ("n", b"1")])
        for i in range(5)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for key, value, headers in sent:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    consumer = earliest_consumer(kafka_bootstrap, topic)
    await consumer.start()
    try:
        records = await read_records(consumer, len(sent))
    finally:
        await consumer.stop()

    assert [(r.key, r.value, list(r.headers)) for r in records] == sent
    assert [r.offset for r in records] == list(range(len(sent)))


async def test_group_resumes_from_committed_offset(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topic, group = await new_topic(), new_group()
    tp = TopicPartition(topic, 0)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode())
    finally:
        await producer.stop()

    first = earliest_consumer(kafka_bootstrap, topic, group_id=group, enable_auto_commit=False)
    await first.start()
    try:
        # Read everything but commit only the first four: the rest must come again.
        assert len(await read_records(first, 10)) == 10
        await first.commit({tp: 4})
    finally:
        await first.stop()

    second = earliest_consumer(kafka_bootstrap, topic, group_id=group, enable_auto_commit=False)
    await second.start()
    try:
        assert await second.committed(tp) == 4
        resumed = await read_records(second, 6)
    finally:
        await second.stop()
    assert [r.offset for r in resumed] == list(range(4, 10))
    assert [r.value for r in resumed] == [f"m{i}".encode() for i in range(4, 10)]

    # A group without a commit starts at "earliest", so the resume above came from the commit.
    fresh = earliest_consumer(kafka_bootstrap, topic, group_id=new_group())
    await fresh.start()
    try:
        assert (await read_records(fresh, 1))[0].offset == 0
    finally:
        await fresh.stop()


async def test_idempotent_producer_delivers_each_record_once_in_order(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    count = 500
    # Small batches and a linger so many batches are in flight, not one big request.
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        enable_idempotence=True,
        max_batch_size=1024,
        linger_ms=2,
    )
    await producer.start()
    try:
        pending = [await producer.send(topic, f"{i:05d}".encode()) for i in range(count)]
        written = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    assert [meta.offset for meta in written] == list(range(count))

    consumer = earliest_consumer(kafka_bootstrap, topic)
    await consumer.start()
    try:
        records = await read_records(consumer, count)
        # Nothing beyond the expected records: no duplicates were written.
        assert (await consumer.end_offsets([TopicPartition(topic, 0)])) == {
            TopicPartition(topic, 0): count
        }
    finally:
        await consumer.stop()
    assert [r.value for r in records] == [f"{i:05d}".encode() for i in range(count)]


async def test_read_committed_sees_only_committed_transactions(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    committed = [b"committed-1", b"committed-2"]
    aborted = [b"aborted-1", b"aborted-2"]
    # Written after the abort: reading through it proves the abort marker was passed.
    sentinel = b"sentinel"

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"txn-{topic}")
    await producer.start()
    try:
        async with producer.transaction():
            for value in committed:
                await producer.send_and_wait(topic, value)
        await producer.begin_transaction()
        for value in aborted:
            await producer.send_and_wait(topic, value)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, sentinel)
    finally:
        await producer.stop()

    seen: dict[str, list[bytes]] = {}
    for isolation in ("read_committed", "read_uncommitted"):
        consumer = earliest_consumer(kafka_bootstrap, topic, isolation_level=isolation)
        await consumer.start()
        try:
            seen[isolation] = await read_values_through(consumer, sentinel)
        finally:
            await consumer.stop()

    assert seen["read_committed"] == [*committed, sentinel]
    assert seen["read_uncommitted"] == [*committed, *aborted, sentinel]
