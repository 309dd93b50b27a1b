"""A second, independent client (confluent-kafka / librdkafka) works against the broker,
and records written by one client library read back identically through the other."""

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, KafkaError, Message, Producer

TopicFactory = Callable[..., Awaitable[str]]
READ_TIMEOUT_S = 20.0
Headers = list[tuple[str, str | bytes | None]]
Record = tuple[str | bytes | None, str | bytes | None, Headers]


def confluent_produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            errors.append(error)

    for key, value, headers in records:
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
    remaining = producer.flush(READ_TIMEOUT_S)
    assert remaining == 0, f"{remaining} records not delivered"
    assert errors == []


def confluent_consume(bootstrap: str, topic: str, group: str, count: int) -> list[Record]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[Record] = []
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            records.append((message.key(), message.value(), headers_of(message)))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return records


def headers_of(message: Message) -> Headers:
    # librdkafka gives a list of (name, value) pairs, or None when there are none.
    headers = message.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def sample_records(tag: str) -> list[Record]:
    return [
        (f"{tag}-key-{i}".encode(), f"{tag}-value-{i}".encode(), [("origin", tag.encode())])
        for i in range(5)
    ]


async def test_confluent_kafka_round_trip(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topic = await new_topic()
    records = sample_records("confluent")
    # librdkafka calls block; keep them off the shared event loop.
    await asyncio.to_thread(confluent_produce, kafka_bootstrap, topic, records)
    received = await asyncio.to_thread(
        confluent_consume, kafka_bootstrap, topic, new_group(), len(records)
    )
    assert received == records


async def test_aiokafka_and_confluent_kafka_read_each_others_records(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topic = await new_topic()
    from_aiokafka = sample_records("aiokafka")
    from_confluent = sample_records("confluent")

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for key, value, headers in from_aiokafka:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()
    await asyncio.to_thread(confluent_produce, kafka_bootstrap, topic, from_confluent)

    expected = from_aiokafka + from_confluent
    read_by_confluent = await asyncio.to_thread(
        confluent_consume, kafka_bootstrap, topic, new_group(), len(expected)
    )

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    read_by_aiokafka: list[Record] = []
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            while len(read_by_aiokafka) < len(expected):
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    read_by_aiokafka.extend((r.key, r.value, list(r.headers)) for r in batch)
    finally:
        await consumer.stop()

    assert read_by_confluent == expected
    assert read_by_aiokafka == expected
