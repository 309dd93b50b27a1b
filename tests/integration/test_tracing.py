"""One rerank call is one trace: SDK -> Kafka -> worker -> Kafka -> SDK.

A real broker, the real worker in this process with the :class:`FakeEngine` of
``worker_harness`` (here reporting a tokenize time and one model call, as the real engine
does), and the real SDK client. Both sides get the same OpenTelemetry SDK provider with
an in-memory exporter (passed in, never installed globally, so other tests stay off).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from worker_harness import (
    QUERY_ENGINE_ERROR,
    FakeEngine,
    TopicFactory,
    TopicReader,
    Topics,
    make_topics,
    reply_reader,
    running_worker,
    wait_until,
    worker_config,
)

from consumer.engine.api import BatchTiming, ScoreRequest, ScoreResult
from consumer.service.tracing import NoTracing
from producer_sdk import RerankClient, RerankErrorReply

DOCUMENTS = ["a distributed event log", "a novelist", "a streaming platform"]
MS = 1_000_000


class TimedFakeEngine(FakeEngine):
    """The fake engine, with the timings the real engine reports: how long tokenizing
    took and the model call that scored the pairs."""

    async def score(self, request: ScoreRequest) -> ScoreResult:
        started = time.time_ns()
        result = await super().score(request)
        ended = time.time_ns()
        batch = BatchTiming(
            batch_id=1,
            start_ns=ended - 2 * MS,
            end_ns=ended,
            seconds=0.002,
            pairs=len(request.documents),
            tokens=result.prompt_tokens,
            cost_tokens=result.prompt_tokens,
        )
        tokenize_ms = min(1.0, (ended - started) / MS / 4)
        return ScoreResult(
            logits=result.logits,
            scores=result.scores,
            prompt_tokens=result.prompt_tokens,
            truncated=result.truncated,
            queue_ms=result.queue_ms,
            inference_ms=2.0,
            extra={"tokenize_ms": tokenize_ms, "batches": 1.0},
            batches=(batch,),
        )


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
async def topics(new_topic: TopicFactory) -> Topics:
    return await make_topics(new_topic)


@pytest.fixture
async def traced(
    kafka_bootstrap: str,
    topics: Topics,
    new_group: Callable[[], str],
    provider: TracerProvider,
) -> AsyncIterator[RerankClient]:
    """A traced worker and a traced client on the test's topics."""
    config = worker_config(kafka_bootstrap, topics, new_group())
    async with (
        running_worker(config, TimedFakeEngine(delay_s=0.01), tracer_provider=provider),
        RerankClient(
            kafka_bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            default_timeout=30.0,
            tracer_provider=provider,
        ) as client,
    ):
        yield client


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def finished(
    exporter: InMemorySpanExporter, names: set[str], timeout_s: float = 10.0
) -> dict[str, ReadableSpan]:
    """The exported spans by name, once all of ``names`` are there (the worker may still
    be ending its ``process`` span when the client has the reply)."""

    def spans() -> dict[str, ReadableSpan]:
        return {span.name: span for span in exporter.get_finished_spans()}

    await wait_until(lambda: names <= set(spans()), timeout_s, f"spans {sorted(names)}")
    return spans()


async def test_one_call_is_one_trace_from_the_sdk_through_the_worker_and_back(
    traced: RerankClient, provider: TracerProvider, exporter: InMemorySpanExporter, topics: Topics
) -> None:
    with provider.get_tracer("the-app").start_as_current_span("handle search") as app:
        result = await traced.rerank("what is kafka?", DOCUMENTS, top_n=2)
    assert len(result) == 2

    requests, replies = f"send {topics.requests}", f"send {topics.replies}"
    process, receive = f"process {topics.requests}", f"receive {topics.replies}"
    worker = {process, "rerank decode", "rerank score", "rerank tokenize", "rerank queue"}
    worker |= {"rerank batch", replies}
    spans = await finished(exporter, {"handle search", "rerank", requests, receive} | worker)
    assert len(exporter.get_finished_spans()) == len(spans)  # each one once

    trace_id = app.get_span_context().trace_id
    assert {span.name for span in spans.values() if span.context.trace_id == trace_id} == set(  # type: ignore[union-attr]
        spans
    )
    expected_parent = {
        "rerank": "handle search",
        requests: "rerank",
        process: requests,  # across Kafka: the request's traceparent header
        "rerank decode": process,
        "rerank score": process,
        "rerank tokenize": "rerank score",
        "rerank queue": "rerank score",
        "rerank batch": "rerank score",
        replies: process,
        receive: "rerank",
    }
    for name, parent in expected_parent.items():
        assert parent_of(spans[name]) == span_id(spans[parent]), f"{name} under {parent}"
    assert spans[process].parent.is_remote  # type: ignore[union-attr]
    # the receive span links to the worker's reply span (the reply's traceparent header)
    assert [link.context.span_id for link in spans[receive].links] == [span_id(spans[replies])]

    kinds = {name: spans[name].kind for name in ("rerank", requests, process, replies, receive)}
    assert kinds == {
        "rerank": SpanKind.CLIENT,
        requests: SpanKind.PRODUCER,
        process: SpanKind.CONSUMER,
        replies: SpanKind.PRODUCER,
        receive: SpanKind.CONSUMER,
    }
    # in order in time: sent, processed, replied, received
    assert spans[requests].start_time <= spans[process].start_time  # type: ignore[operator]
    # The reply's send span ends when the broker acks it, which may come after the client
    # has already read the reply (it failed once in CI that way), so only its start is
    # ordered before the receive.
    assert spans[replies].start_time <= spans[receive].end_time  # type: ignore[operator]
    assert spans[receive].end_time <= spans["rerank"].end_time  # type: ignore[operator]
    attributes = spans[process].attributes
    assert attributes is not None
    assert attributes["messaging.system"] == "kafka"
    assert attributes["messaging.message.conversation_id"] == result.id
    assert attributes["rerank.documents"] == len(DOCUMENTS)
    assert spans["rerank batch"].attributes["rerank.batch.pairs"] == len(DOCUMENTS)  # type: ignore[index]
    assert all(span.status.status_code != StatusCode.ERROR for span in spans.values())


async def test_an_error_reply_is_an_error_in_the_trace(
    traced: RerankClient, exporter: InMemorySpanExporter, topics: Topics
) -> None:
    with pytest.raises(RerankErrorReply):
        await traced.rerank(QUERY_ENGINE_ERROR, DOCUMENTS)
    process, receive = f"process {topics.requests}", f"receive {topics.replies}"
    spans = await finished(exporter, {"rerank", receive, process, "rerank score"})
    for name in ("rerank", receive, process, "rerank score"):
        assert spans[name].status.status_code == StatusCode.ERROR, name
    assert spans["rerank"].attributes["rerank.error.code"] == "internal"  # type: ignore[index]
    assert len({span.context.trace_id for span in spans.values()}) == 1  # type: ignore[union-attr]


async def test_with_tracing_off_no_trace_header_is_added(
    kafka_bootstrap: str, topics: Topics, new_group: Callable[[], str]
) -> None:
    """No tracer provider anywhere (the API's default): requests and replies carry the
    contract's headers only, and the call works as ever."""
    config = worker_config(kafka_bootstrap, topics, new_group())
    async with (
        running_worker(config, FakeEngine()) as worker,
        RerankClient(
            kafka_bootstrap, request_topic=topics.requests, reply_topic=topics.replies
        ) as client,
    ):
        assert isinstance(worker._tracing, NoTracing) and client._tracing is None
        result = await client.rerank("what is kafka?", DOCUMENTS)
    assert len(result) == len(DOCUMENTS)

    async with TopicReader(kafka_bootstrap, topics.requests, 1) as request_reader:
        (request,) = await request_reader.read(1)
    async with reply_reader(kafka_bootstrap, topics) as replies:
        (reply,) = await replies.read(1)
    assert set(request.headers) == {
        "correlation-id",
        "reply-topic",
        "reply-partition",
        "deadline-ms",
    }
    assert set(reply.headers) == {"correlation-id"}


async def test_a_traced_client_talks_to_an_untraced_worker(
    kafka_bootstrap: str,
    topics: Topics,
    new_group: Callable[[], str],
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """The worker ignores the trace headers it does not trace; the client's trace ends at
    its receive span, which has no link to follow."""
    config = worker_config(kafka_bootstrap, topics, new_group())
    async with (
        running_worker(config, FakeEngine()),
        RerankClient(
            kafka_bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            tracer_provider=provider,
        ) as client,
    ):
        results = await asyncio.gather(*(client.rerank(f"q{n}", DOCUMENTS) for n in range(3)))
    assert all(len(result) == len(DOCUMENTS) for result in results)
    names = [span.name for span in exporter.get_finished_spans()]
    receive = f"receive {topics.replies}"
    assert sorted(names) == sorted(["rerank", f"send {topics.requests}", receive] * 3)
    assert all(not span.links for span in exporter.get_finished_spans() if span.name == receive)
