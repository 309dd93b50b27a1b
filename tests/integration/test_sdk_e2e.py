"""The SDK end to end: real broker, the real Kafka worker (``consumer.service.worker.Worker``).

Every test runs the real worker in this process on uuid topics. Where the scores do not
matter and speed does, its engine is the :class:`FakeEngine` of ``worker_harness``
(scores are a deterministic function of (query, document), so results are checked
exactly); one test runs the real :class:`consumer.engine.engine.Engine` on a tiny random
Qwen3 reranker (real tokenizer). Each test's docstring says which engine it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from tiny_models import build_tiny_qwen3_reranker
from worker_harness import (
    MODEL_NAME,
    FakeEngine,
    Topics,
    committed_offset,
    fake_score,
    fresh_metrics,
    make_topics,
    reply_reader,
    running_worker,
    wait_until,
    worker_config,
)

from consumer.engine.api import ScoreRequest, ScoreResult
from consumer.engine.engine import Engine
from consumer.engine.settings import EngineSettings
from consumer.service.codec import RequestLimits
from consumer.service.metrics import Metrics
from consumer.service.worker import Worker
from producer_sdk import (
    ClientClosed,
    RerankClient,
    RerankErrorReply,
    RerankResult,
    RerankTimeout,
    cli,
)

REQUEST_PARTITIONS = 3
CONCURRENT_CALLS = 500
CALLS_PER_CLIENT = 100
CALL_TIMEOUT_S = 30.0
COUNTER_WAIT_S = 15.0
SCORE_TOLERANCE = 1e-5

ClientFactory = Callable[..., Awaitable[RerankClient]]
Serve = Callable[..., contextlib.AbstractAsyncContextManager[Worker]]


class GatedEngine(FakeEngine):
    """The fake engine, except that requests for ``gated_query`` wait for :meth:`release`.

    ``held`` counts the gated requests that have reached the engine.
    """

    def __init__(self, gated_query: str) -> None:
        super().__init__()
        self.gated_query = gated_query
        self.held = 0
        self._gate = asyncio.Event()

    def release(self) -> None:
        self._gate.set()

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if request.query == self.gated_query:
            self.held += 1
            await self._gate.wait()
        return await super().score(request)


@pytest.fixture
async def topics(new_topic: Any) -> Topics:
    return await make_topics(new_topic, request_partitions=REQUEST_PARTITIONS)


@pytest.fixture
def serve(kafka_bootstrap: str, topics: Topics, new_group: Callable[[], str]) -> Serve:
    """``async with serve(engine, metrics=None) as worker``: the real worker on ``topics``."""

    def start(
        engine: Any, metrics: Metrics | None = None
    ) -> contextlib.AbstractAsyncContextManager[Worker]:
        config = worker_config(kafka_bootstrap, topics, new_group())
        return running_worker(config, engine, metrics)

    return start


@pytest.fixture
async def make_client(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[ClientFactory]:
    """Factory of started clients on the test's topics; all closed at teardown."""
    clients: list[RerankClient] = []

    async def make(**options: Any) -> RerankClient:
        client = RerankClient(
            bootstrap_servers=kafka_bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            **{"default_timeout": CALL_TIMEOUT_S, **options},
        )
        clients.append(client)
        await client.start()
        return client

    yield make
    for client in clients:
        await client.close()


def call_documents(call: int | str, count: int = 4) -> list[str]:
    """Distinct documents that name the call they belong to."""
    return [f"call {call} document {n} about kafka and reranking" for n in range(count)]


def assert_fake_engine_ranking(
    result: RerankResult, query: str, documents: Sequence[str], instruction: str | None = None
) -> None:
    """``result`` is exactly what the fake engine gives for this request alone, best first."""
    expected = {i: fake_score(query, instruction, doc) for i, doc in enumerate(documents)}
    assert {item.index: item.score for item in result} == expected
    assert result.scores == sorted(result.scores, reverse=True)
    assert result.model == MODEL_NAME


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    await wait_until(condition, COUNTER_WAIT_S, what)


# -- routing ---------------------------------------------------------------------------


async def test_500_concurrent_calls_from_one_client_each_get_their_own_result(
    serve: Serve, make_client: ClientFactory
) -> None:
    """Fake engine: every one of 500 concurrent calls gets the scores of its own request."""
    async with serve(FakeEngine()):
        client = await make_client()
        calls = [(f"query {n}", call_documents(n)) for n in range(CONCURRENT_CALLS)]

        results = await asyncio.gather(*(client.rerank(q, docs) for q, docs in calls))

    for (query, documents), result in zip(calls, results, strict=True):
        assert_fake_engine_ranking(result, query, documents)
    assert len({result.id for result in results}) == CONCURRENT_CALLS
    assert client.stats.replies_matched == CONCURRENT_CALLS
    assert client.pending_count == 0


async def test_two_clients_on_one_reply_partition_never_see_each_others_results(
    serve: Serve, make_client: ClientFactory
) -> None:
    """Fake engine: two clients read the same reply partition; each gets only its own."""
    async with serve(FakeEngine()):
        first, second = await make_client(reply_partition=0), await make_client(reply_partition=0)

        async def run(client: RerankClient, name: str) -> None:
            calls = [
                (f"{name} {n}", call_documents(f"{name}-{n}", 3)) for n in range(CALLS_PER_CLIENT)
            ]
            results = await asyncio.gather(*(client.rerank(q, docs) for q, docs in calls))
            for (query, documents), result in zip(calls, results, strict=True):
                assert_fake_engine_ranking(result, query, documents)

        await asyncio.gather(run(first, "first"), run(second, "second"))

        # Each read the other's replies on the shared partition, and ignored them.
        await wait_for(lambda: first.stats.foreign_replies_ignored == CALLS_PER_CLIENT, "first")
        await wait_for(lambda: second.stats.foreign_replies_ignored == CALLS_PER_CLIENT, "second")
    assert first.stats.replies_matched == second.stats.replies_matched == CALLS_PER_CLIENT
    assert first.stats.duplicates_dropped == second.stats.duplicates_dropped == 0


# -- failures --------------------------------------------------------------------------


async def test_timeout_raises_and_later_calls_still_work(
    serve: Serve, make_client: ClientFactory
) -> None:
    """Gated fake engine: one query is held by the worker until the test releases it."""
    engine = GatedEngine("held by the worker")
    async with serve(engine):
        client = await make_client()

        with pytest.raises(RerankTimeout) as raised:
            await client.rerank("held by the worker", ["a document"], timeout=1.0)
        assert raised.value.retriable

        # The held request still sits in the worker; other calls go past it.
        documents = call_documents("after")
        result = await client.rerank("after the timeout", documents)
        assert_fake_engine_ranking(result, "after the timeout", documents)

        engine.release()
        # Its reply comes after all and is dropped as late, never taken for another call.
        await wait_for(lambda: client.stats.late_replies_dropped == 1, "the late reply")
    assert engine.held == 1
    assert client.pending_count == 0


async def test_error_reply_raises_with_its_code(serve: Serve, make_client: ClientFactory) -> None:
    """Fake engine (never reached): the real worker's query limit answers payload_too_large."""
    limit = RequestLimits().max_query_chars
    assert limit is not None
    engine = FakeEngine()
    async with serve(engine):
        client = await make_client()

        with pytest.raises(RerankErrorReply) as raised:
            await client.rerank("q" * (limit + 1), ["a document"])

        documents = call_documents("fine")
        assert_fake_engine_ranking(await client.rerank("fine", documents), "fine", documents)
    assert raised.value.code == "payload_too_large"
    assert raised.value.retriable is False
    assert engine.seen == ["fine"]


async def test_close_fails_every_pending_call_at_once(
    serve: Serve, make_client: ClientFactory
) -> None:
    """Gated fake engine: calls wait in the worker while the client is closed."""
    engine = GatedEngine("wait in the worker")
    async with serve(engine):
        client = await make_client()
        calls = [
            asyncio.create_task(client.rerank("wait in the worker", ["doc"], timeout=60.0))
            for _ in range(20)
        ]
        try:
            await wait_for(lambda: engine.held == len(calls), "every call to reach the engine")

            await client.close()

            # Far sooner than the calls' own 60 s timeout: close ended them, not a timer.
            outcomes = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), timeout=10.0
            )
        finally:
            engine.release()  # let the worker answer, so it stops without waiting to drain
    assert all(isinstance(outcome, ClientClosed) for outcome in outcomes), outcomes
    with pytest.raises(ClientClosed):
        await client.rerank("after close", ["doc"])


async def test_duplicate_replies_are_dropped(
    kafka_bootstrap: str, topics: Topics, serve: Serve, make_client: ClientFactory
) -> None:
    """Fake engine: copies of real reply records are dropped; results stay right."""
    async with serve(FakeEngine()), reply_reader(kafka_bootstrap, topics) as replies:
        client = await make_client()
        first = [(f"before {n}", call_documents(f"before-{n}")) for n in range(10)]
        results = await asyncio.gather(*(client.rerank(q, docs) for q, docs in first))
        ids = {result.id for result in results}

        # Redeliver each of those replies, as a worker restarted before its commit would.
        records = [r for r in await replies.read(len(first)) if r.correlation_id in ids]
        assert len(records) == len(first)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for record in records:
                await producer.send_and_wait(
                    topics.replies,
                    record.value,
                    key=record.key,
                    partition=record.partition,
                    headers=list(record.headers.items()),
                )
        finally:
            await producer.stop()
        await wait_for(lambda: client.stats.duplicates_dropped == len(first), "duplicates")

        later = [(f"after {n}", call_documents(f"after-{n}")) for n in range(10)]
        later_results = await asyncio.gather(*(client.rerank(q, docs) for q, docs in later))

    for (query, documents), result in zip(first + later, results + later_results, strict=True):
        assert_fake_engine_ranking(result, query, documents)
    assert client.stats.replies_matched == len(first) + len(later)
    assert client.stats.late_replies_dropped == client.stats.foreign_replies_ignored == 0


# -- the real engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("e2e-tiny-qwen3"))


async def tiny_engine(tiny_qwen3: Path, **options: Any) -> Engine:
    """A real Engine (not started) on the tiny Qwen3 reranker, on the CPU; ``options``
    for its ModelOptions (``max_pair_tokens=128``: a small window)."""
    from consumer.runtime.loader import load_model
    from consumer.runtime.options import ModelOptions

    model_options = ModelOptions(
        model=str(tiny_qwen3), device="cpu", compile="off", packed="off", **options
    )
    model = await asyncio.to_thread(load_model, model_options)
    return Engine.for_model(model, EngineSettings(max_batch_tokens=4096, max_batch_pairs=16))


@pytest.fixture
async def real_engine(tiny_qwen3: Path) -> AsyncIterator[Engine]:
    engine = await tiny_engine(tiny_qwen3)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_reply_scores_equal_the_real_engines_scores_for_the_request(
    serve: Serve, make_client: ClientFactory, real_engine: Engine
) -> None:
    """Real Engine, tiny random Qwen3 reranker: the reply carries what the engine computes."""
    query = "How does Kafka keep messages in order?"
    documents = [
        "Kafka keeps order within a partition: records with one key go to one partition.",
        "Franz Kafka wrote The Trial.",
        "RabbitMQ routes messages through exchanges.",
        "北京是中华人民共和国的首都。",
    ]
    instruction = "Given a question about distributed systems, find the answer"
    async with serve(real_engine, metrics=fresh_metrics()):
        client = await make_client()
        # Other requests in flight at the same time share the engine's batches.
        others = [client.rerank(f"other {n}", call_documents(n, 3)) for n in range(8)]
        result, raw, *_ = await asyncio.gather(
            client.rerank(query, documents),
            client.rerank(query, documents, instruction=instruction, raw_scores=True),
            *others,
        )

    direct = await real_engine.score(ScoreRequest(query, tuple(documents)))
    direct_raw = await real_engine.score(ScoreRequest(query, tuple(documents), instruction))
    assert result.model == real_engine.model_name
    assert sorted(result.indices) == list(range(len(documents)))
    for item in result:
        assert item.score == pytest.approx(direct.scores[item.index], abs=SCORE_TOLERANCE)
    for item in raw:
        assert item.score == pytest.approx(direct_raw.logits[item.index], abs=SCORE_TOLERANCE)
    assert result.usage.prompt_tokens == direct.prompt_tokens


async def test_long_documents_are_split_into_windows_when_asked(
    kafka_bootstrap: str,
    new_topic: Any,
    new_group: Callable[[], str],
    tiny_qwen3: Path,
) -> None:
    """Real Engine, tiny Qwen3 reranker with a 128-token window, real broker and worker:
    with split_long_documents the long document is scored in windows and its result says
    which window scored it (the same as the engine's own answer), nothing is truncated,
    and truncate=False is no error; without it the document is cut as before."""
    engine = await tiny_engine(tiny_qwen3, max_pair_tokens=128)
    topics = await make_topics(new_topic, request_partitions=1)
    config = worker_config(kafka_bootstrap, topics, new_group())
    query = "How does Kafka keep messages in order?"
    long_document = " ".join(f"Part {i}: records of key {i % 5} stay in order." for i in range(12))
    documents = ["Records with one key go to one partition.", long_document]
    await engine.start()
    try:
        direct = await engine.score(
            ScoreRequest(query, tuple(documents), split_long_documents=True)
        )
        async with running_worker(config, engine, fresh_metrics()):
            client = RerankClient(
                kafka_bootstrap, request_topic=topics.requests, reply_topic=topics.replies
            )
            async with client:
                split = await client.rerank(
                    query, documents, split_long_documents=True, truncate=False
                )
                cut = await client.rerank(query, documents)
    finally:
        await engine.close()

    window = direct.windows[1]
    assert window is not None and window.count >= 2
    by_index = {item.index: item for item in split}
    assert by_index[0].window is None
    got = by_index[1].window
    assert got is not None
    assert (got.index, got.count, got.start, got.end) == (
        window.index, window.count, window.start, window.end
    )  # fmt: skip
    assert by_index[1].score == pytest.approx(direct.scores[1], abs=SCORE_TOLERANCE)
    assert split.truncated == () and split.usage.prompt_tokens == direct.prompt_tokens
    assert cut.truncated == (1,) and all(item.window is None for item in cut)


async def test_truncation_is_reported_or_refused_and_the_partition_moves_on(
    kafka_bootstrap: str,
    new_topic: Any,
    new_group: Callable[[], str],
    tiny_qwen3: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Real Engine, tiny Qwen3 reranker cut at 128 tokens a prompt: a reply names the
    documents it cut; with truncate=False the call is an invalid_request error naming
    them and the limit; the worker answers the next request and commits every offset."""
    engine = await tiny_engine(tiny_qwen3, max_pair_tokens=128)
    topics = await make_topics(new_topic, request_partitions=1)
    config = worker_config(kafka_bootstrap, topics, new_group())
    query = "How does Kafka keep messages in order?"
    long_document = "Kafka keeps records of one key in one partition, in order. " * 40
    documents = ["Records with one key go to one partition.", long_document, "A novelist."]
    await engine.start()
    try:
        async with running_worker(config, engine, fresh_metrics()) as worker:
            client = RerankClient(
                kafka_bootstrap, request_topic=topics.requests, reply_topic=topics.replies
            )
            async with client:
                cut = await client.rerank(query, documents, top_n=1)
                with pytest.raises(RerankErrorReply) as refused:
                    await client.rerank(query, documents, truncate=False)
                fits = await client.rerank(query, [documents[0], documents[2]], truncate=False)
            cli_argv = [
                "--bootstrap-servers",
                kafka_bootstrap,
                "--request-topic",
                topics.requests,
                "--reply-topic",
                topics.replies,
            ]
            table_status = await asyncio.to_thread(cli.main, [*cli_argv, query, *documents])
            table = capsys.readouterr().out
            refused_status = await asyncio.to_thread(
                cli.main, [*cli_argv, "--no-truncate", query, *documents]
            )
            refused_err = capsys.readouterr().err
            await wait_until(lambda: worker.in_flight_pairs == 0, 10, "every request to finish")
            tp = TopicPartition(topics.requests, 0)
            committed = await committed_offset(kafka_bootstrap, config.group_id, tp, 5)
    finally:
        await engine.close()

    assert cut.truncated == (1,)  # named although top_n=1 left it out of the results
    assert len(cut.results) == 1
    assert refused.value.code == "invalid_request" and refused.value.retriable is False
    assert refused.value.message == (
        "1 of 3 documents do not fit the limit of 128 tokens per prompt (template, "
        "instruction, query and document) and truncate is false: documents [1]"
    )
    assert fits.truncated == () and len(fits.results) == 2
    assert table_status == cli.EXIT_OK
    assert table.splitlines()[-1] == "truncated to fit the model: documents 1"
    assert refused_status == cli.EXIT_FAILED
    assert refused_err.count("\n") == 1 and "documents [1]" in refused_err
    assert committed == 5, "the refused requests are answered and committed like any other"
