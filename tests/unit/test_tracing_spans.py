"""OpenTelemetry traces: the SDK's and the worker's spans, with an in-memory exporter.

No broker here: the worker's part runs the real RequestProcessor and Delivery over a
recording sender; tests/integration/test_tracing.py follows one call through a real
broker, worker and client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from consumer.engine.api import BatchTiming, EngineError, ScoreRequest, ScoreResult
from consumer.engine.engine import Engine
from consumer.engine.settings import EngineSettings
from consumer.runtime.prompt import EncodedPair
from consumer.runtime.scorer import OneCallScorer, ScorerTraits
from consumer.service.codec import ReplyRoute, RequestLimits
from consumer.service.metrics import Metrics
from consumer.service.outputs import OutputRecord
from consumer.service.processing import RequestProcessor
from consumer.service.reply_router import Destination
from consumer.service.responder import Responder
from consumer.service.tracing import NoTracing, TracedEngine, WorkerTracing, worker_tracing
from kafka_common.tracing import (
    HEADER_GETTER,
    HeaderSetter,
    enabled_tracer,
    extract,
    inject,
    pass_on_current,
)
from producer_sdk.errors import RerankErrorReply
from producer_sdk.result import RankedDocument, RerankResult, Timing, Usage
from producer_sdk.tracing import ClientTracing, in_callers_context

REQUESTS = "rerank.requests"
REPLIES = "rerank.replies"
DLQ = "rerank.requests.dlq"
MS = 1_000_000


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


# ------------------------------------------------------------------ switching it on


def test_tracing_is_off_with_the_apis_own_providers(provider: TracerProvider) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert enabled_tracer() is None  # nothing installed: the global proxy
    assert enabled_tracer(NoOpTracerProvider()) is None
    assert enabled_tracer(provider) is not None
    assert isinstance(worker_tracing(None, "group", "client"), NoTracing)
    assert ClientTracing.create(None, REQUESTS, REPLIES, "client") is None


def test_trace_context_goes_through_kafka_headers(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    headers: list[tuple[str, bytes]] = [("correlation-id", b"c-1"), ("traceparent", b"stale")]
    with tracer.start_as_current_span("producer") as span:
        inject(headers, span)
    names = [name for name, _ in headers]
    assert names == ["correlation-id", "traceparent"]  # replaced, not repeated
    context = trace.get_current_span(extract(headers)).get_span_context()
    assert context.trace_id == span.get_span_context().trace_id
    assert context.span_id == span.get_span_context().span_id
    assert context.is_remote
    assert HEADER_GETTER.get([("a", None), ("a", b"x")], "a") == ["x"]
    garbled = extract([("traceparent", b"\xff")])
    assert not trace.get_current_span(garbled).get_span_context().is_valid
    HeaderSetter().set(headers, "tracestate", "k=v")
    assert headers[-1] == ("tracestate", b"k=v")


async def test_a_call_from_another_thread_keeps_the_callers_context(
    provider: TracerProvider,
) -> None:
    async def current_trace() -> int:
        return trace.get_current_span().get_span_context().trace_id

    call = current_trace()
    assert in_callers_context(call) is call  # nothing to carry
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        carried = in_callers_context(current_trace())
    # run without the caller's context, as the sync client's loop thread does
    assert await asyncio.get_running_loop().create_task(carried) == (
        caller.get_span_context().trace_id
    )
    await call


# ------------------------------------------------------------------ the SDK's spans


def reply_record(value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=REPLIES,
        partition=1,
        offset=42,
        timestamp=0,
        timestamp_type=0,
        key=b"c-1",
        value=value,
        checksum=None,
        serialized_key_size=3,
        serialized_value_size=len(value),
        headers=headers,
    )


async def test_the_sdks_call_send_and_receive_spans(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracing = ClientTracing.create(provider, REQUESTS, REPLIES, "client-1")
    assert tracing is not None
    loop = asyncio.get_running_loop()
    headers: list[tuple[str, bytes]] = [("correlation-id", b"c-1")]
    worker_span = provider.get_tracer("worker").start_span("send rerank.replies")
    reply_headers: list[tuple[str, bytes]] = []
    inject(reply_headers, worker_span)
    worker_span.end()

    async def deliver() -> None:
        pass

    with (
        provider.get_tracer("app").start_as_current_span("caller"),
        tracing.call(documents=3, top_n=2) as call,
    ):
        future: asyncio.Future[Any] = loop.create_future()
        send = tracing.send(call, headers, "c-1", 100)
        await tracing.sending(send, deliver(), future)
        future.set_result(_result(model="m", results=2, prompt_tokens=30, timing=(1.0, 2.0, 4.0)))
        tracing.received(call, reply_record(b"{}", reply_headers), 123 * MS, future)

    spans = by_name(exporter.get_finished_spans())
    caller, rerank = spans["caller"], spans["rerank"]
    sent, received = spans["send rerank.requests"], spans["receive rerank.replies"]
    assert {s.context.trace_id for s in (rerank, sent, received) if s.context} == {
        caller.context.trace_id  # type: ignore[union-attr]
    }
    assert parent_of(rerank) == span_id(caller)
    assert parent_of(sent) == parent_of(received) == span_id(rerank)
    assert (rerank.kind, sent.kind, received.kind) == (
        SpanKind.CLIENT,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
    )
    # the request carries the send span's context: the worker's spans become its children
    carried = trace.get_current_span(extract(headers)).get_span_context()
    assert carried.span_id == span_id(sent)
    assert sent.attributes is not None and received.attributes is not None
    assert sent.attributes["messaging.system"] == "kafka"
    assert sent.attributes["messaging.destination.name"] == REQUESTS
    assert sent.attributes["messaging.operation.type"] == "send"
    assert sent.attributes["messaging.message.conversation_id"] == "c-1"
    assert received.attributes["messaging.kafka.offset"] == 42
    assert received.attributes["messaging.destination.partition.id"] == "1"
    assert received.attributes["rerank.model"] == "m"
    assert received.attributes["rerank.worker.total_ms"] == 4.0
    assert received.start_time == 123 * MS
    assert [link.context.span_id for link in received.links] == [span_id(spans[worker_span.name])]
    assert rerank.status.status_code == StatusCode.UNSET


async def test_an_error_reply_fails_the_call_and_its_receive_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracing = ClientTracing.create(provider, REQUESTS, REPLIES, "client-1")
    assert tracing is not None
    error = RerankErrorReply("invalid_request", "no documents", False, "c-1")
    with pytest.raises(RerankErrorReply), tracing.call(documents=1, top_n=None) as call:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        tracing.received(call, reply_record(b"{}", []), 0, future)
        raise future.exception()  # type: ignore[misc]
    spans = by_name(exporter.get_finished_spans())
    for name in ("rerank", "receive rerank.replies"):
        span = spans[name]
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["error.type"] == "RerankErrorReply"
        assert span.attributes["rerank.error.code"] == "invalid_request"
        assert span.attributes["rerank.error.retriable"] is False
    assert not spans["receive rerank.replies"].links  # the reply carried no context


def _result(
    model: str, results: int, prompt_tokens: int, timing: tuple[float, float, float]
) -> RerankResult:
    return RerankResult(
        id="c-1",
        model=model,
        results=[RankedDocument(i, 0.5) for i in range(results)],
        usage=Usage(prompt_tokens),
        timing=Timing(*timing),
    )


async def test_an_unsampled_call_makes_no_span_but_passes_the_decision_on(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    sampling_nothing = TracerProvider(sampler=ALWAYS_OFF)
    sampling_nothing.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = ClientTracing.create(sampling_nothing, REQUESTS, REPLIES, "client-1")
    assert tracing is not None
    headers: list[tuple[str, bytes]] = []
    with tracing.call(documents=1, top_n=None) as call:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        send = tracing.send(call, headers, "c-1", 10)

        async def deliver() -> None:
            pass

        await tracing.sending(send, deliver(), future)
        future.set_result(_result(model="m", results=1, prompt_tokens=1, timing=(0, 0, 0)))
        tracing.received(call, reply_record(b"{}", []), 0, future)
    assert exporter.get_finished_spans() == ()
    carried = trace.get_current_span(extract(headers)).get_span_context()
    assert carried.is_valid and not carried.trace_flags.sampled
    # ... and a worker that samples what its parent sampled (the default) honours it
    sender = await process_traced(
        provider, TimedEngine(), request_record(BODY, headers + ANSWERABLE)
    )
    assert exporter.get_finished_spans() == ()
    ((_, reply_headers),) = sender.sent
    assert [name for name, _ in reply_headers] == ["correlation-id"]


# ------------------------------------------------------------------ the worker's spans


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[tuple[str, bytes]]]] = []

    async def send(self, source: Any, output: OutputRecord) -> None:
        self.sent.append((output.topic, output.headers))


class FixedRouter:
    async def resolve(self, route: ReplyRoute) -> Destination:
        return Destination(route.topic or REPLIES, route.partition)


class TimedEngine:
    """Reports timings the way the real engine does: tokenize_ms and its batches."""

    model_name = "timed"
    ready = True
    in_flight_pairs = 0
    failure = None

    def __init__(self, batches: int = 2, error: Exception | None = None) -> None:
        self.batches = batches
        self.error = error

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if self.error is not None:
            raise self.error
        start = trace_now()
        await asyncio.sleep(0.03)
        n = len(request.documents)
        timings = tuple(
            BatchTiming(
                batch_id=7 + i,
                start_ns=start + (10 + 8 * i) * MS,
                end_ns=start + (15 + 8 * i) * MS,
                seconds=0.005,
                pairs=16,
                tokens=1000 + i,
                cost_tokens=1200 + i,
            )
            for i in range(self.batches)
        )
        return ScoreResult(
            logits=(0.0,) * n,
            scores=(0.5,) * n,
            prompt_tokens=10 * n,
            truncated=(False,) * n,
            queue_ms=10.0,
            inference_ms=5.0 * self.batches,
            extra={"tokenize_ms": 2.0, "batches": float(self.batches)},
            batches=timings,
        )


def trace_now() -> int:
    return time.time_ns()


def request_record(
    value: bytes, headers: list[tuple[str, bytes]], offset: int = 5
) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=REQUESTS,
        partition=2,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"c-1",
        value=value,
        checksum=None,
        serialized_key_size=3,
        serialized_value_size=len(value),
        headers=headers,
    )


async def process_traced(
    provider: TracerProvider, engine: Any, record: ConsumerRecord[Any, Any]
) -> RecordingSender:
    """One record through the worker's traced path, as the worker's intake runs it."""
    tracing = worker_tracing(provider, "rerank-workers", "worker-1")
    assert isinstance(tracing, WorkerTracing)
    sender = RecordingSender()
    traced_engine = tracing.engine(engine)
    delivery = Responder(
        tracing.sender(sender),
        FixedRouter(),  # type: ignore[arg-type]
        traced_engine.model_name,
        DLQ,
        Metrics(CollectorRegistry()),
    )
    processor = tracing.processor(RequestProcessor(traced_engine, delivery, RequestLimits()))
    job = processor.start(record, received=0.0)
    assert await asyncio.create_task(job.run) is True
    return sender


def producer_headers(provider: TracerProvider) -> tuple[list[tuple[str, bytes]], Any]:
    headers: list[tuple[str, bytes]] = [("correlation-id", b"c-1")]
    span = provider.get_tracer("sdk").start_span("send rerank.requests", kind=SpanKind.PRODUCER)
    inject(headers, span)
    span.end()
    return headers, span


BODY = orjson.dumps({"query": "q", "documents": ["a", "b", "c"]})
ANSWERABLE = [("correlation-id", b"c-1")]  # no trace context


async def test_a_request_is_one_trace_below_the_producers_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    headers, producer = producer_headers(provider)
    sender = await process_traced(provider, TimedEngine(batches=2), request_record(BODY, headers))

    spans = exporter.get_finished_spans()
    assert {span.context.trace_id for span in spans if span.context} == {
        producer.get_span_context().trace_id
    }
    named = {span.name: span for span in spans if span.name != "rerank batch"}
    batches = [span for span in spans if span.name == "rerank batch"]
    process, score = named["process rerank.requests"], named["rerank score"]
    assert process.kind == SpanKind.CONSUMER
    assert parent_of(process) == producer.get_span_context().span_id
    for name in ("rerank decode", "rerank score", "send rerank.replies"):
        assert parent_of(named[name]) == span_id(process), name
    for span in [named["rerank tokenize"], named["rerank queue"], *batches]:
        assert parent_of(span) == span_id(score), span.name
    assert named["send rerank.replies"].kind == SpanKind.PRODUCER

    # laid out in time as the engine measured: tokenize, queue, then its batches
    tokenize, queue = named["rerank tokenize"], named["rerank queue"]
    assert tokenize.start_time == score.start_time
    assert tokenize.end_time == queue.start_time == score.start_time + 2 * MS  # type: ignore[operator]
    assert queue.end_time == min(b.start_time for b in batches)  # type: ignore[type-var]
    assert [b.attributes["rerank.batch.id"] for b in batches] == [7, 8]  # type: ignore[index]
    assert batches[0].attributes == {
        "rerank.batch.id": 7,
        "rerank.batch.pairs": 16,
        "rerank.batch.tokens": 1000,
        "rerank.batch.cost_tokens": 1200,
    }
    assert batches[0].end_time - batches[0].start_time == 5 * MS  # type: ignore[operator]
    assert score.end_time <= process.end_time  # type: ignore[operator]
    assert process.attributes is not None
    assert process.attributes["messaging.message.conversation_id"] == "c-1"
    assert process.attributes["messaging.kafka.offset"] == 5
    assert process.attributes["messaging.consumer.group.name"] == "rerank-workers"
    assert process.attributes["rerank.documents"] == 3
    assert process.status.status_code == StatusCode.UNSET

    # the reply carries the reply span's context
    ((topic, reply_headers),) = sender.sent
    assert topic == REPLIES
    carried = trace.get_current_span(extract(reply_headers)).get_span_context()
    assert carried.span_id == span_id(named["send rerank.replies"])


async def test_an_engine_without_batch_timings_gets_one_inference_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    class TotalsEngine(TimedEngine):
        async def score(self, request: ScoreRequest) -> ScoreResult:
            await asyncio.sleep(0.02)
            n = len(request.documents)
            return ScoreResult((0.0,) * n, (0.5,) * n, n, (False,) * n, 4.0, 6.0)

    await process_traced(provider, TotalsEngine(), request_record(BODY, ANSWERABLE))
    named = by_name(exporter.get_finished_spans())
    score, queue, inference = (
        named["rerank score"],
        named["rerank queue"],
        named["rerank inference"],
    )
    assert "rerank tokenize" not in named and "rerank batch" not in named
    assert inference.end_time == score.end_time
    assert inference.end_time - inference.start_time == 6 * MS  # type: ignore[operator]
    assert queue.end_time == inference.start_time
    assert queue.end_time - queue.start_time == 4 * MS  # type: ignore[operator]
    process = named["process rerank.requests"]
    assert process.parent is None  # no traceparent: a trace of its own


async def test_an_engine_error_and_a_rejection_fail_the_request_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    await process_traced(
        provider, TimedEngine(error=EngineError("no luck")), request_record(BODY, ANSWERABLE)
    )
    named = by_name(exporter.get_finished_spans())
    for name in ("rerank score", "process rerank.requests"):
        assert named[name].status.status_code == StatusCode.ERROR, name
    assert named["rerank score"].attributes["error.type"] == "EngineError"  # type: ignore[index]
    exporter.clear()

    await process_traced(provider, TimedEngine(), request_record(b"not json", ANSWERABLE))
    named = by_name(exporter.get_finished_spans())
    assert "rerank score" not in named
    for name in ("rerank decode", "process rerank.requests"):
        span = named[name]
        assert span.status.status_code == StatusCode.ERROR, name
        assert span.attributes["rerank.error.code"] == "invalid_request"  # type: ignore[index]


async def test_a_dead_letter_record_keeps_the_requests_headers(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    headers, producer = producer_headers(provider)
    headers = [pair for pair in headers if pair[0] != "correlation-id"]  # nobody to answer
    sender = await process_traced(provider, TimedEngine(), request_record(BODY, headers))
    ((topic, sent_headers),) = sender.sent
    assert topic == DLQ
    carried = trace.get_current_span(extract(sent_headers)).get_span_context()
    assert carried.span_id == producer.get_span_context().span_id  # unchanged
    named = by_name(exporter.get_finished_spans())
    send, process = named[f"send {DLQ}"], named["process rerank.requests"]
    assert parent_of(send) == span_id(process)
    assert process.status.status_code == StatusCode.ERROR
    assert process.attributes["rerank.dead_letter"] is True  # type: ignore[index]
    assert process.attributes["rerank.error.code"] == "invalid_request"  # type: ignore[index]


async def test_tracing_off_wraps_nothing_and_adds_no_header() -> None:
    """The worker without a provider: no tracing object, the engine and sender as given."""
    tracing = worker_tracing(None, "rerank-workers", "worker-1")
    assert isinstance(tracing, NoTracing)
    engine, sender = TimedEngine(), RecordingSender()
    assert tracing.engine(engine) is engine  # type: ignore[arg-type]
    assert tracing.sender(sender) is sender
    # what the untraced path sends: the reply headers of the contract, nothing more
    delivery = Responder(sender, FixedRouter(), "timed", DLQ, Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    plain = RequestProcessor(TimedEngine(), delivery, RequestLimits())  # type: ignore[arg-type]
    processor = tracing.processor(plain)
    assert processor is plain
    record = request_record(BODY, [("correlation-id", b"c-1")])
    assert await processor.start(record, 0.0).run
    ((_, sent_headers),) = sender.sent
    assert [name for name, _ in sent_headers] == ["correlation-id"]
    assert TracedEngine is not type(plain.engine)


# ------------------------------------------------------------------ the real engine


class WordEncoder:
    """One token per character of the document; nothing is cut."""

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        return [EncodedPair(f"{query}|{d}", len(d) + 1, False) for d in documents]


class SlowScorer(OneCallScorer):
    """Each batch takes 20 ms, so batches and waits are long enough to see."""

    traits = ScorerTraits("slow", "cpu", "float32")

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        return max(p.tokens for p in pairs) * len(pairs)

    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        time.sleep(0.02)
        return [float(len(str(p.payload))) for p in pairs]

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        return [0.5 for _ in logits]

    def warmup(self, encoder: object) -> None:
        pass


async def test_the_real_engine_reports_the_batches_its_spans_are_made_of(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Batches hold pairs of several requests; each request's result names the batches
    that scored its pairs, with their wall-clock times, and its trace shows them."""
    engine = Engine(
        encoder=WordEncoder(),
        scorer=SlowScorer(),
        name="slow",
        settings=EngineSettings(max_batch_tokens=10_000, max_batch_pairs=4, warmup=False),
    )
    await engine.start()
    traced = TracedEngine(engine, provider.get_tracer("test"))
    requests = [ScoreRequest(f"q{n}", tuple(f"doc {n}-{i}" for i in range(3))) for n in range(3)]
    before = time.time_ns()
    with provider.get_tracer("test").start_as_current_span("process"):  # as in the worker
        results = await asyncio.gather(*(traced.score(r) for r in requests))
    after = time.time_ns()
    await engine.close()

    shared: dict[int, BatchTiming] = {}
    for result in results:
        assert result.batches and len(result.batches) == result.extra["batches"]
        assert result.inference_ms == pytest.approx(sum(b.seconds for b in result.batches) * 1000.0)
        for batch in result.batches:
            assert before <= batch.start_ns < batch.end_ns <= after
            assert batch.end_ns - batch.start_ns == pytest.approx(batch.seconds * 1e9, abs=1)
            assert 1 <= batch.pairs <= 4 and batch.tokens > 0 and batch.cost_tokens >= batch.tokens
            assert shared.setdefault(batch.batch_id, batch) is batch  # one object per call
    assert sum(b.pairs for b in shared.values()) == 9  # every pair scored once

    spans = exporter.get_finished_spans()
    scores = [s for s in spans if s.name == "rerank score"]
    assert len(scores) == 3
    for score in scores:
        children = [s for s in spans if parent_of(s) == span_id(score)]
        names = [s.name for s in children]
        assert names[:2] == ["rerank tokenize", "rerank queue"]
        assert set(names[2:]) == {"rerank batch"}
        for child in children:
            assert score.start_time <= child.start_time <= child.end_time <= score.end_time  # type: ignore[operator]


# ------------------------------------------------------------------ the worker process


def test_the_otlp_provider_is_configured_from_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    from consumer.tracing_setup import TracingUnavailable, otlp_exporter, tracer_provider

    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    assert tracer_provider("off") is None
    provider = tracer_provider("otlp")
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "rerank-worker"
    provider.shutdown()
    assert isinstance(otlp_exporter(), Grpc)  # as OpenTelemetry's Python auto-configuration
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert isinstance(otlp_exporter(), Http)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")  # the traces' own wins
    assert isinstance(otlp_exporter(), Grpc)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(TracingUnavailable, match="grpc or http/protobuf"):
        otlp_exporter()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "reranker-eu-1")
    provider = tracer_provider("otlp")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "reranker-eu-1"
    provider.shutdown()


def test_the_tracing_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumer.settings import Settings, SettingsError, env_name, load_settings

    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    assert load_settings([]).tracing == "off"
    assert load_settings(["--tracing", "OTLP"]).tracing == "otlp"
    monkeypatch.setenv("RERANK_TRACING", "otlp")
    assert load_settings([]).tracing == "otlp"
    with pytest.raises(SettingsError, match="RERANK_TRACING"):
        load_settings(["--tracing", "jaeger"])


WORKER_MAIN = """
import sys
from opentelemetry import trace
import consumer.app, consumer.service.worker, producer_sdk
assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), "set at import"
from consumer.app import Parts, ServiceError, main

def no_model(settings):
    raise ServiceError("no model in this test")

code = main(["--http-port", "0", *sys.argv[1:]], Parts(no_model, None, None))
print(code, type(trace.get_tracer_provider()).__name__)
"""


@pytest.mark.parametrize(
    ("flags", "provider_type"),
    [([], "ProxyTracerProvider"), (["--tracing", "otlp"], "TracerProvider")],
    ids=["off", "otlp"],
)
def test_the_entry_point_installs_a_provider_only_when_asked(
    flags: list[str], provider_type: str
) -> None:
    """Nothing at import; RERANK_TRACING=otlp installs the SDK provider before the worker
    is built (and shuts it down on exit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-c", WORKER_MAIN, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", provider_type]  # exit 1: the model did not load


async def test_the_tracing_benchmark_runs() -> None:
    """benchmarks/tracing_bench.py, tiny: every path and mode gets a time."""
    import argparse

    from benchmarks import tracing_bench

    results = await tracing_bench.run(iterations=40, rounds=2, documents=2, doc_bytes=16)
    assert set(results) == {
        f"{path}/{mode}" for path in ("sdk", "worker") for mode in tracing_bench.MODES
    } | {f"{path}/{mode}" for path in ("inject", "extract") for mode in ("on", "unsampled")}
    assert all(value > 0 for value in results.values())
    args = argparse.Namespace(iterations=40, rounds=2, documents=2, doc_bytes=16)
    text = tracing_bench.report(results, args)
    assert text.startswith("hardware: ") and "worker" in text and "on - off" in text


class NanEngine(TimedEngine):
    async def score(self, request: ScoreRequest) -> ScoreResult:
        result = await super().score(request)
        return dataclasses.replace(result, scores=(float("nan"),) * len(request.documents))


async def test_error_replies_the_worker_decides_fail_the_request_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A deadline already past, and scores the reply cannot carry: no step failed, but the
    request's span says it ended in an error reply."""
    late = [*ANSWERABLE, ("deadline-ms", b"1000")]  # 1970
    await process_traced(provider, TimedEngine(), request_record(BODY, late))
    process = by_name(exporter.get_finished_spans())["process rerank.requests"]
    assert process.status.status_code == StatusCode.ERROR
    assert process.attributes["rerank.error.code"] == "deadline_exceeded"  # type: ignore[index]
    exporter.clear()

    await process_traced(provider, NanEngine(batches=1), request_record(BODY, ANSWERABLE))
    process = by_name(exporter.get_finished_spans())["process rerank.requests"]
    assert process.status.status_code == StatusCode.ERROR
    assert process.attributes["rerank.error.code"] == "internal"  # type: ignore[index]


def test_with_tracing_off_a_callers_trace_is_passed_on_and_nothing_else() -> None:
    """The SDK without a provider adds no header, unless its caller is inside a trace that
    an upstream hop carried in (the gateway's HTTP caller): then it passes that one on."""
    incoming = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    headers: list[tuple[str, bytes]] = [("correlation-id", b"c-1")]
    pass_on_current(headers)
    assert headers == [("correlation-id", b"c-1")]
    token = otel_context.attach(extract(incoming))
    try:
        pass_on_current(headers)
    finally:
        otel_context.detach(token)
    assert headers == [("correlation-id", b"c-1"), *incoming]
