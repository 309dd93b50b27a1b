"""A stand-in for our own rerank worker, for testing the SDK over a real broker.

It answers requests by the wire contract (v1) with a deterministic fake score, and
can be told to misbehave the ways the real service may: stay silent for a query,
answer with an error, answer twice (at-least-once redelivery), miss the first request
of a call or answer it late, fail it with a retriable error. It is a fake of our own
service, never of Kafka: every record goes through the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from schemas.models import (
    HEADER_CORRELATION_ID,
    HEADER_REPLY_PARTITION,
    HEADER_REPLY_TOPIC,
)

ERROR_QUERY_PREFIX = "error:"
MODEL_NAME = "fake-reranker"


def fake_score(query: str, document: str) -> float:
    """A deterministic score in [0, 1) for a (query, document) pair."""
    return zlib.crc32(f"{query}\x00{document}".encode()) / 2**32


@dataclass
class Behaviour:
    """How the fake service treats requests; tests change it while it runs."""

    ignored_queries: set[str] = field(default_factory=set)
    duplicate_replies: bool = False
    # The first request of a correlation id with one of these queries is never answered
    # (lost, or stuck behind a dead worker); later ones are.
    drop_first: set[str] = field(default_factory=set)
    # The first request of such a call is held until the next one with its correlation
    # id comes, then both are answered, the first one first (a slow worker catching up).
    hold_first: set[str] = field(default_factory=set)
    # The first request of such a call gets a retriable `internal` error reply.
    fail_first: set[str] = field(default_factory=set)


@dataclass
class SeenRequest:
    """One request record as the service received it."""

    headers: dict[str, str]
    key: bytes | None
    body: dict[str, Any]
    timestamp_ms: int


class FakeRerankService:
    """Reads every partition of the request topic and answers each request.

    A query ``"error:<code>"`` gets an error reply with that code; a query in
    ``behaviour.ignored_queries`` gets no reply at all.
    """

    def __init__(self, bootstrap_servers: str, request_topic: str, reply_topic: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.request_topic = request_topic
        self.reply_topic = reply_topic
        self.behaviour = Behaviour()
        self.seen: list[SeenRequest] = []
        self._held: dict[str, dict[str, Any]] = {}  # correlation id -> held request body
        self._times_seen: Counter[str] = Counter()  # requests per correlation id
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", max_batch_size=512 * 1024
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self.request_topic)
        assigned = [TopicPartition(self.request_topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        await self._consumer.seek_to_beginning(*assigned)
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
        await self._producer.stop()

    async def _serve(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    await self._answer(record)

    async def _answer(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = {name: value.decode() for name, value in record.headers}
        body = orjson.loads(record.value or b"")
        self.seen.append(SeenRequest(headers, record.key, body, record.timestamp))
        if body["query"] in self.behaviour.ignored_queries:
            return
        correlation_id = headers.get(HEADER_CORRELATION_ID) or body["id"]
        self._times_seen[correlation_id] += 1
        first = self._times_seen[correlation_id] == 1
        if first and body["query"] in self.behaviour.drop_first:
            return
        if first and body["query"] in self.behaviour.hold_first:
            self._held[correlation_id] = body
            return
        held = self._held.pop(correlation_id, None)
        if held is not None:
            await self._reply(correlation_id, headers, _reply_body(correlation_id, held))
        if first and body["query"] in self.behaviour.fail_first:
            failed = _error_body(correlation_id, "internal", "the engine is shutting down", True)
            await self._reply(correlation_id, headers, failed)
            return
        await self._reply(correlation_id, headers, _reply_body(correlation_id, body))

    async def _reply(
        self, correlation_id: str, headers: dict[str, str], body: dict[str, Any]
    ) -> None:
        reply = orjson.dumps(body)
        partition = headers.get(HEADER_REPLY_PARTITION)
        copies = 2 if self.behaviour.duplicate_replies else 1
        for _ in range(copies):
            await self._producer.send(
                headers.get(HEADER_REPLY_TOPIC, self.reply_topic),
                reply,
                key=correlation_id.encode(),
                partition=int(partition) if partition is not None else None,
                headers=[(HEADER_CORRELATION_ID, correlation_id.encode())],
            )


def _reply_body(correlation_id: str, request: dict[str, Any]) -> dict[str, Any]:
    query: str = request["query"]
    if query.startswith(ERROR_QUERY_PREFIX):
        code = query.removeprefix(ERROR_QUERY_PREFIX)
        return _error_body(correlation_id, code, f"told to fail with {code}", False)
    documents: list[str] = request["documents"]
    scored = sorted(
        ((fake_score(query, doc), index) for index, doc in enumerate(documents)), reverse=True
    )
    results: list[dict[str, Any]] = []
    for score, index in scored[: request.get("top_n") or len(scored)]:
        item: dict[str, Any] = {"index": index, "relevance_score": score}
        if request.get("return_documents"):
            item["document"] = documents[index]
        results.append(item)
    return {
        "id": correlation_id,
        "model": MODEL_NAME,
        "results": results,
        "usage": {"prompt_tokens": sum(len(doc.split()) for doc in documents)},
        "timing_ms": {"queue": 0.0, "inference": 0.0, "total": 0.0},
    }


def _error_body(correlation_id: str, code: str, message: str, retriable: bool) -> dict[str, Any]:
    return {
        "id": correlation_id,
        "error": {"code": code, "message": message, "retriable": retriable},
    }
