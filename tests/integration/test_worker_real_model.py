"""The worker with the real engine and a tiny random Qwen3 reranker (real tokenizer).

Scores in the replies must be the scorer's own scores for each (query, document) pair,
whatever batches the engine formed across concurrent requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from tiny_models import build_tiny_qwen3_reranker
from worker_harness import (
    TopicFactory,
    by_correlation_id,
    make_topics,
    produce,
    reply_reader,
    request,
    running_worker,
    worker_config,
)

from consumer.engine.engine import Engine
from consumer.engine.settings import EngineSettings

pytestmark = pytest.mark.timeout(180)

MAX_PAIR_TOKENS = 256


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from consumer.runtime.loader import load_model
    from consumer.runtime.options import ModelOptions

    folder = build_tiny_qwen3_reranker(tmp_path_factory.mktemp("tiny-qwen3"))
    options = ModelOptions(
        model=str(folder),
        device="cpu",
        compile="off",
        packed="off",
        max_pair_tokens=MAX_PAIR_TOKENS,
    )
    return load_model(options)


@pytest.fixture
async def engine(tiny_model: Any) -> AsyncIterator[Engine]:
    engine = Engine.for_model(tiny_model, EngineSettings(max_batch_tokens=4096, max_batch_pairs=32))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def _expected(
    model: Any, query: str, docs: list[str], instruction: str | None = None
) -> tuple[list[float], list[float]]:
    pairs = model.encoder.encode(query, docs, instruction)
    logits = list(model.scorer.score(pairs))
    return logits, list(model.scorer.calibrate(logits))


async def test_replies_carry_the_models_own_scores(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    tiny_model: Any,
    engine: Engine,
) -> None:
    topics = await make_topics(new_topic, request_partitions=2)
    cases: dict[str, dict[str, Any]] = {
        f"req-{i}": {
            "query": f"question {i} about kafka and gpus",
            "documents": [f"document {j} " + "word " * (3 * j + i) for j in range(1 + i % 5)],
        }
        for i in range(16)
    }
    cases["raw-top2"] = {**cases["req-4"], "raw_scores": True, "top_n": 2}
    cases["instructed"] = {**cases["req-3"], "instruction": "Find passages about distributed logs"}
    cases["too-long"] = {"query": "long " * (2 * MAX_PAIR_TOKENS), "documents": ["d"]}
    requests = [request(cid, body, partition=i % 2) for i, (cid, body) in enumerate(cases.items())]

    config = worker_config(kafka_bootstrap, topics, new_group())
    async with reply_reader(kafka_bootstrap, topics) as replies, running_worker(config, engine):
        await produce(kafka_bootstrap, topics.requests, requests)
        received = by_correlation_id(await replies.read(len(requests), timeout_s=120))

    assert set(received) == set(cases)
    too_long = received.pop("too-long")[0].json()
    assert too_long["error"]["code"] == "invalid_request"
    assert too_long["error"]["retriable"] is False

    for cid, (reply,) in received.items():
        body = reply.json()
        case = cases[cid]
        assert body["model"] == engine.model_name
        logits, scores = _expected(
            tiny_model, case["query"], case["documents"], case.get("instruction")
        )
        values = logits if case.get("raw_scores") else scores
        order = sorted(range(len(values)), key=lambda i: -values[i])[: case.get("top_n")]
        got = body["results"]
        assert [r["relevance_score"] for r in got] == pytest.approx(
            [values[i] for i in order], rel=1e-4, abs=1e-4
        )
        assert {r["index"] for r in got} <= set(range(len(values)))
        assert body["usage"]["prompt_tokens"] > 0
    # The instruction is part of the prompt: same query and documents, other scores.
    plain = [r["relevance_score"] for r in received["req-3"][0].json()["results"]]
    instructed = [r["relevance_score"] for r in received["instructed"][0].json()["results"]]
    assert plain != instructed
