"""The worker answers requests on a real broker: content, order and routing of replies."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from worker_harness import (
    MODEL_NAME,
    FakeEngine,
    TopicFactory,
    TopicReader,
    by_correlation_id,
    documents,
    expected_order,
    fake_logit,
    fake_score,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    worker_config,
)

pytestmark = pytest.mark.timeout(120)


async def test_success_replies_follow_the_contract(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    other_replies = await new_topic(partitions=3)
    docs = documents(6)
    instruction = "Given a product question, find the manual section that answers it"
    requests = [
        request("plain", {"query": "what is kafka", "documents": docs}),
        request("top-two", {"query": "q2", "documents": docs, "top_n": 2}),
        request(
            "with-docs",
            {"query": "q3", "documents": docs, "return_documents": True, "top_n": 10},
        ),
        request("raw", {"query": "q4", "documents": docs, "raw_scores": True}),
        request(
            "instructed", {"query": "what is kafka", "documents": docs, "instruction": instruction}
        ),
        request("body-id-only", {"id": "from-body", "query": "q5", "documents": docs[:2]}),
        request(
            "routed",
            {"query": "q6", "documents": docs[:3]},
            reply_topic=other_replies,
            reply_partition=2,
        ),
        request("to-partition", {"query": "q7", "documents": docs[:3]}, reply_partition=1),
    ]
    # The body-only request has no correlation-id header: its id comes from the body.
    requests[5].headers = []
    engine = FakeEngine()
    config = worker_config(kafka_bootstrap, topics, new_group())
    async with running_worker(config, engine), reply_reader(kafka_bootstrap, topics) as replies:
        await produce(kafka_bootstrap, topics.requests, requests)
        received = by_correlation_id(await replies.read(len(requests) - 1))
        async with TopicReader(kafka_bootstrap, other_replies, 3) as other:
            routed = await other.read(1)

    assert set(received) == {
        "plain",
        "top-two",
        "with-docs",
        "raw",
        "instructed",
        "from-body",
        "to-partition",
    }
    assert all(len(v) == 1 for v in received.values())

    plain = received["plain"][0]
    assert plain.key == b"plain"
    body = plain.json()
    assert body["id"] == "plain"
    assert body["model"] == MODEL_NAME
    assert [r["index"] for r in body["results"]] == expected_order("what is kafka", None, docs)
    for result in body["results"]:
        assert "document" not in result
        assert math.isclose(
            result["relevance_score"], fake_score("what is kafka", None, docs[result["index"]])
        )
    assert body["usage"]["prompt_tokens"] == sum(len(d) for d in docs)
    assert set(body["timing_ms"]) == {"queue", "inference", "total"}

    top_two = received["top-two"][0].json()["results"]
    assert [r["index"] for r in top_two] == expected_order("q2", None, docs)[:2]

    with_docs = received["with-docs"][0].json()["results"]
    assert len(with_docs) == len(docs)
    assert all(r["document"] == docs[r["index"]] for r in with_docs)

    raw = received["raw"][0].json()["results"]
    assert all(
        math.isclose(r["relevance_score"], fake_logit("q4", None, docs[r["index"]])) for r in raw
    )

    instructed = received["instructed"][0].json()["results"]
    assert [r["index"] for r in instructed] == expected_order("what is kafka", instruction, docs)
    assert all(
        math.isclose(
            r["relevance_score"], fake_score("what is kafka", instruction, docs[r["index"]])
        )
        for r in instructed
    )

    from_body = received["from-body"][0]
    assert from_body.key == b"from-body"
    assert from_body.json()["id"] == "from-body"

    assert received["to-partition"][0].partition == 1
    assert len(routed) == 1 and routed[0].correlation_id == "routed"
    assert routed[0].partition == 2
    assert routed[0].json()["id"] == "routed"


async def test_many_concurrent_requests_across_partitions_get_their_own_scores(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic, request_partitions=4)
    count = 200
    docs_of = {f"req-{i}": documents(1 + i % 7, prefix=f"r{i}") for i in range(count)}
    query_of = {cid: f"query number {i}" for i, cid in enumerate(docs_of)}
    requests = [
        request(cid, {"query": query_of[cid], "documents": docs}, partition=i % 4)
        for i, (cid, docs) in enumerate(docs_of.items())
    ]
    engine = FakeEngine(delay_s=0.01)
    config = worker_config(kafka_bootstrap, topics, new_group())
    async with running_worker(config, engine), reply_reader(kafka_bootstrap, topics) as replies:
        await produce(kafka_bootstrap, topics.requests, requests)
        received = by_correlation_id(await replies.read(count))

    assert set(received) == set(docs_of)
    for cid, records in received.items():
        assert len(records) == 1
        body = records[0].json()
        assert body["id"] == cid
        docs = docs_of[cid]
        assert [r["index"] for r in body["results"]] == expected_order(query_of[cid], None, docs)
        for r in body["results"]:
            expected = fake_score(query_of[cid], None, docs[r["index"]])
            assert math.isclose(r["relevance_score"], expected)
