"""One Kafka hop, produce to fetch, through a real broker: aiokafka against librdkafka.

    python -m benchmarks.kafka_hop [--bootstrap HOST:PORT] [--hops 300]

A lone request crosses the broker twice (request, reply), so each hop's latency is part of
its end-to-end time. Four ways, each on its own single-partition topic, one message of
``--bytes`` at a time with 2 ms between them, p50 of all but the first 50 (warm-up):

* ``aiokafka -> aiokafka``: what the worker and the SDK use; with the moments the produce
  request was written and the fetch response read (hooks on aiokafka's connection);
* ``librdkafka -> librdkafka``: confluent-kafka on both sides;
* ``aiokafka -> librdkafka`` and ``librdkafka -> aiokafka``: one side each (the
  librdkafka consumer is polled from a thread, one more hand-over).

Both producers are idempotent with ``acks=all`` and no linger, as the service's are.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.host import cpu_model

WARM_UP = 50


class ConnectionMarks:
    """When aiokafka last wrote a produce request and read a fetch response with data."""

    def __init__(self, fetch_bytes: int) -> None:
        import aiokafka.conn as conn

        self.marks: dict[str, float] = {}
        self._conn = conn.AIOKafkaConnection
        self._send, self._handle = self._conn.send, self._conn._handle_frame
        marks, send, handle = self.marks, self._send, self._handle

        def marked_send(connection: Any, request: Any, expect_response: bool = True) -> Any:
            if type(request).__name__.startswith("Produce"):
                marks["produce written"] = time.perf_counter()
            return send(connection, request, expect_response)

        def marked_handle(connection: Any, resp: bytes) -> Any:
            name = type(connection._requests[0][1]).__name__
            if name.startswith("Fetch") and len(resp) >= fetch_bytes:
                marks["fetch response read"] = time.perf_counter()
            return handle(connection, resp)

        self._conn.send, self._conn._handle_frame = marked_send, marked_handle

    def remove(self) -> None:
        self._conn.send, self._conn._handle_frame = self._send, self._handle


async def new_topic(bootstrap: str) -> str:
    topic = f"kafka-hop-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    await asyncio.sleep(1)  # the leader is elected
    return topic


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


async def aio_producer(bootstrap: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0
    )
    await producer.start()
    return producer


async def aio_consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    return consumer


def rd_producer(bootstrap: str) -> Any:
    from confluent_kafka import Producer

    return Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all", "enable.idempotence": True}
    )


def rd_consumer(bootstrap: str, topic: str) -> Any:
    from confluent_kafka import OFFSET_END, Consumer
    from confluent_kafka import TopicPartition as RdPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"hop-{topic}", "enable.auto.commit": False}
    )
    consumer.assign([RdPartition(topic, 0, OFFSET_END)])
    consumer.poll(1.0)  # joins the partition at its end
    return consumer


def make_hop(
    topic: str,
    aio_out: AIOKafkaProducer | None,
    rd_out: Any,
    aio_in: AIOKafkaConsumer | None,
    rd_in: Any,
) -> Callable[[bytes], Awaitable[None]]:
    """Send one message with the producer given and read it with the consumer given."""

    async def hop(value: bytes) -> None:
        if aio_out is not None:
            await aio_out.send(topic, value)
        else:
            rd_out.produce(topic, value)
            rd_out.poll(0)
        if aio_in is not None:
            await aio_in.getone()
            return
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, rd_in.poll, 1.0) is None:
            pass

    return hop


async def time_hops(
    hop: Callable[[bytes], Awaitable[None]], hops: int, size: int, marks: dict[str, float]
) -> dict[str, float]:
    """p50 ms of each hop and of each marked moment within it."""
    rows: list[dict[str, float]] = []
    for _ in range(hops + WARM_UP):
        marks.clear()
        started = time.perf_counter()
        await hop(b"x" * size)
        row = {name: (at - started) * 1000 for name, at in marks.items()}
        row["message read"] = (time.perf_counter() - started) * 1000
        rows.append(row)
        await asyncio.sleep(0.002)
    kept = rows[WARM_UP:]
    names = [name for name in kept[0] if all(name in row for row in kept)]
    return {name: round(statistics.median(row[name] for row in kept), 3) for name in names}


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    marks = ConnectionMarks(args.bytes)
    topics: list[str] = []
    results = {}
    try:
        for name in (
            "aiokafka -> aiokafka",
            "librdkafka -> librdkafka",
            "aiokafka -> librdkafka",
            "librdkafka -> aiokafka",
        ):
            topic = await new_topic(args.bootstrap)
            topics.append(topic)
            sender, reader = name.split(" -> ")
            aio_out = await aio_producer(args.bootstrap) if sender == "aiokafka" else None
            rd_out = rd_producer(args.bootstrap) if sender == "librdkafka" else None
            aio_in = await aio_consumer(args.bootstrap, topic) if reader == "aiokafka" else None
            rd_in = rd_consumer(args.bootstrap, topic) if reader == "librdkafka" else None

            hop = make_hop(topic, aio_out, rd_out, aio_in, rd_in)
            results[name] = await time_hops(hop, args.hops, args.bytes, marks.marks)
            if aio_out is not None:
                await aio_out.stop()
            if aio_in is not None:
                await aio_in.stop()
            if rd_out is not None:
                rd_out.flush(5)
            if rd_in is not None:
                rd_in.close()
    finally:
        marks.remove()
        if topics:
            await delete_topics(args.bootstrap, topics)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--hops", type=int, default=300)
    p.add_argument("--bytes", type=int, default=8000, help="message size (an 8-document request)")
    args = p.parse_args(argv)
    results = asyncio.run(measure(args))
    print(
        f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, broker "
        f"{args.bootstrap}; {args.hops} hops of {args.bytes} bytes; p50 ms from the send call:"
    )
    for name, parts in results.items():
        print(f"  {name:26s} " + ", ".join(f"{part} {ms:.2f}" for part, ms in parts.items()))


if __name__ == "__main__":
    main()
