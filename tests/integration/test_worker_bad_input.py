"""Bad input gets an error reply or a dead-letter record, and never stops the partition.

All cases share one partition, in one run of the worker, followed by a good request:
if any bad record stopped or stalled the partition, the last request would not be
answered, and the committed offset would not reach the end of the partition.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition
from worker_harness import (
    QUERY_CRASH,
    QUERY_ENGINE_ERROR,
    QUERY_NAN,
    QUERY_VALUE_ERROR,
    FakeEngine,
    Request,
    TopicFactory,
    by_correlation_id,
    committed_offset,
    dlq_reader,
    documents,
    fresh_metrics,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    wait_until,
    worker_config,
)

from consumer.service.codec import RequestLimits

pytestmark = pytest.mark.timeout(120)

MAX_DOCUMENTS = 5
MAX_REQUEST_BYTES = 4000
GOOD = {"query": "q", "documents": ["a", "b"]}

# correlation id -> (request value, expected error code, retriable)
ERROR_REPLIES: dict[str, tuple[bytes | None, str, bool]] = {
    "invalid-json": (b'{"query": "q", "documents": [', "invalid_request", False),
    "not-an-object": (b'["q", "a"]', "invalid_request", False),
    "wrong-types": (orjson.dumps({"query": 5, "documents": "a"}), "invalid_request", False),
    "empty-query": (orjson.dumps({"query": "  ", "documents": ["a"]}), "invalid_request", False),
    "no-documents": (orjson.dumps({"query": "q", "documents": []}), "invalid_request", False),
    "too-many-documents": (
        orjson.dumps({"query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)}),
        "payload_too_large",
        False,
    ),
    "oversized": (
        orjson.dumps({"query": "q", "documents": ["x" * MAX_REQUEST_BYTES]}),
        "payload_too_large",
        False,
    ),
    "bad-utf8": (b'{"query": "\xff\xfe", "documents": ["a"]}', "invalid_request", False),
    "unknown-field": (orjson.dumps({**GOOD, "topn": 3}), "invalid_request", False),
    "empty-value": (b"", "invalid_request", False),
    "tombstone": (None, "invalid_request", False),
    "engine-error": (
        orjson.dumps({"query": QUERY_ENGINE_ERROR, "documents": ["a"]}),
        "internal",
        True,
    ),
    "engine-value-error": (
        orjson.dumps({"query": QUERY_VALUE_ERROR, "documents": ["a"]}),
        "invalid_request",
        False,
    ),
    "engine-crash": (orjson.dumps({"query": QUERY_CRASH, "documents": ["a"]}), "internal", True),
    "engine-nan": (orjson.dumps({"query": QUERY_NAN, "documents": ["a", "b"]}), "internal", True),
}


async def test_bad_input_is_answered_or_dead_lettered_and_the_partition_goes_on(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="consumer")
    topics = await make_topics(new_topic)
    not_allowed = f"other-{uuid.uuid4().hex}"
    missing = f"test-{uuid.uuid4().hex}"  # allowed by the test pattern, never created
    past_ms = int(time.time() * 1000) - 60_000

    no_id = request(None, orjson.dumps(GOOD))  # no correlation id anywhere -> DLQ
    no_id.key = b"the-original-key"
    no_id.headers = [("x-custom", b"kept")]
    # No value, no correlation id, and a header whose value is null.
    null_everything = Request(value=None, headers=[("x-null", None)])
    # The request's index -> the expected dead-letter message (a part of it).
    dead_lettered = {
        len(ERROR_REPLIES) + i: message
        for i, message in enumerate(
            [
                "no correlation id",
                "tombstone",
                "does not exist",
                "does not exist",
                "is not allowed",
                "partition 7 does not exist",
            ],
            start=1,
        )
    }
    requests = [request(cid, value) for cid, (value, _, _) in ERROR_REPLIES.items()]
    requests += [
        request("expired", {"query": "expired query", "documents": ["a"]}, deadline_ms=past_ms),
        no_id,
        null_everything,
        request("to-missing-topic", GOOD, reply_topic=missing),
        request("to-missing-topic-2", GOOD, reply_topic=missing),
        request("to-forbidden-topic", GOOD, reply_topic=not_allowed),
        # The reply topic has REPLY_PARTITIONS (2) partitions.
        request("to-missing-partition", GOOD, reply_partition=7),
        request("last-good", {"query": "still here", "documents": documents(3)}),
    ]
    replied = len(requests) - len(dead_lettered)

    engine = FakeEngine()
    metrics = fresh_metrics()
    config = worker_config(kafka_bootstrap, topics, new_group())
    config = replace(
        config,
        limits=RequestLimits(max_documents=MAX_DOCUMENTS, max_request_bytes=MAX_REQUEST_BYTES),
    )
    async with (
        running_worker(config, engine, metrics) as worker,
        reply_reader(kafka_bootstrap, topics) as replies,
        dlq_reader(kafka_bootstrap, topics) as dlq,
    ):
        await produce(kafka_bootstrap, topics.requests, requests)
        received = by_correlation_id(await replies.read(replied))
        dlq_records = await dlq.read(len(dead_lettered))
        tp = TopicPartition(topics.requests, 0)
        await wait_until(lambda: worker.in_flight_pairs == 0, 10, "every request to finish")
        committed = await committed_offset(kafka_bootstrap, config.group_id, tp, len(requests))
        extra_replies = await replies.quiet(0.5)

    assert committed == len(requests), "every offset, bad ones included, is committed"
    assert extra_replies == []

    # Error replies: right code, retriable flag, keyed and headed by the correlation id.
    for cid, (_, code, retriable) in ERROR_REPLIES.items():
        (reply,) = received[cid]
        assert reply.key == cid.encode()
        body = reply.json()
        assert body["id"] == cid
        assert body["error"]["code"] == code, (cid, body)
        assert body["error"]["retriable"] is retriable, (cid, body)
        assert body["error"]["message"]
    (expired,) = received["expired"]
    assert expired.json()["error"]["code"] == "deadline_exceeded"
    assert "expired query" not in engine.seen, "an expired request never reaches the engine"
    (last,) = received["last-good"]
    assert len(last.json()["results"]) == 3

    # Dead-letter records: the original record, unchanged, plus the DLQ headers.
    assert len(dlq_records) == len(dead_lettered)
    by_offset = {int(r.headers["source-offset"]): r for r in dlq_records}
    assert set(by_offset) == set(dead_lettered)
    for offset, message_part in dead_lettered.items():
        record = by_offset[offset]
        original = requests[offset]
        # A record without key and value is dead-lettered with an empty value.
        assert record.value == (
            b"" if original.value is None and original.key is None else original.value
        )
        assert record.key == original.key
        assert record.headers["error-code"] == b"invalid_request"
        assert message_part in record.headers["error-message"].decode()
        assert record.headers["source-topic"] == topics.requests.encode()
        assert record.headers["source-partition"] == b"0"
        for name, value in original.headers:
            assert record.headers[name] == value
    assert requests.index(no_id) in by_offset
    assert by_offset[requests.index(no_id)].headers["x-custom"] == b"kept"

    # Metrics: outcomes, DLQ records and errors by code.
    registry = metrics.registry
    assert registry.get_sample_value("rerank_requests_total", {"outcome": "ok"}) == 1
    assert registry.get_sample_value("rerank_requests_total", {"outcome": "deadline_exceeded"}) == 1
    assert registry.get_sample_value(
        "rerank_dlq_records_total", {"code": "invalid_request"}
    ) == len(dead_lettered)
    replied_codes = [code for _, code, _ in ERROR_REPLIES.values()] + ["deadline_exceeded"]
    for code in set(replied_codes):
        dead = len(dead_lettered) if code == "invalid_request" else 0
        assert registry.get_sample_value("rerank_errors_total", {"code": code}) == (
            replied_codes.count(code) + dead
        ), code
        assert registry.get_sample_value("rerank_requests_total", {"outcome": code}) == (
            replied_codes.count(code)
        ), code

    # Logs: one warning per dead-letter record and one debug line per error reply, each
    # with the record's coordinates; no per-request line at info level.
    ours = [r for r in caplog.records if r.name.startswith("consumer.")]
    dlq_lines = [r for r in ours if r.getMessage() == "request sent to the dead-letter topic"]
    assert sorted(_extra(r, "offset") for r in dlq_lines) == sorted(dead_lettered)
    for line in dlq_lines:
        assert line.levelno == logging.WARNING
        assert (_extra(line, "topic"), _extra(line, "partition")) == (topics.requests, 0)
        expected_id = dict(requests[_extra(line, "offset")].headers).get("correlation-id")
        assert _extra(line, "correlation_id") == (expected_id.decode() if expected_id else None)
    error_lines = [r for r in ours if r.getMessage() == "error reply sent"]
    assert {_extra(r, "correlation_id") for r in error_lines} == set(ERROR_REPLIES) | {"expired"}
    assert all(r.levelno == logging.DEBUG for r in error_lines)
    per_request_info = [r for r in ours if r.levelno == logging.INFO and hasattr(r, "offset")]
    assert per_request_info == []


def _extra(record: logging.LogRecord, name: str) -> Any:
    """A field a log line got through ``extra=``."""
    return record.__dict__[name]
