"""OpenTelemetry spans of one request in the worker; off unless configured.

Whether tracing is on is decided once, when the worker is built: with no OpenTelemetry
SDK tracer provider (``RERANK_TRACING=off``, the default) the worker holds no
:class:`WorkerTracing`, wraps nothing, and its per-record path is the one it has without
tracing. On, each request record gets these spans, in the trace its ``traceparent``
header names (a new trace when it has none)::

    process <request topic>   CONSUMER, child of the producer's span
    ├── rerank decode         decoding and validating the record
    ├── rerank score          engine.score(): tokenizing, waiting and scoring
    │   ├── rerank tokenize
    │   ├── rerank queue      from tokenized to the first model call with its pairs
    │   └── rerank batch      one per model call that scored some of its pairs
    └── send <reply topic>    PRODUCER: the reply until acknowledged; its context goes
                              into the reply's ``traceparent`` header

The engine's tokenizer and inference threads know nothing of traces: the spans under
``rerank score`` are made once its result is back, with the timestamps the engine
measured (``ScoreResult.extra["tokenize_ms"]``, ``ScoreResult.batches``). An engine that
reports no batches gets one ``rerank inference`` span from ``inference_ms`` instead.

A model call holds pairs of many requests. Each request's trace gets its own
``rerank batch`` span with that call's true start and end and its size
(``rerank.batch.id``, ``.pairs``, ``.tokens``, ``.cost_tokens``), so every trace is
complete on its own and the batch id ties together the traces that shared a call. (One
span per call, linked from each request, would have to live in a trace of its own, and
each request's trace would point elsewhere for the largest part of its time.)

A dead-letter record is a ``send <dead-letter topic>`` span (the record keeps the
request's own headers, ``traceparent`` included) and marks ``process`` as failed, as
does a rejected request (at ``rerank decode``) and an engine error (at ``rerank score``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from aiokafka.structs import ConsumerRecord
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from consumer.engine.api import RerankEngine, ScoreRequest, ScoreResult
from consumer.service.codec import Rejection
from consumer.service.outputs import OutputRecord, Sender
from consumer.service.processing import Job, Processor
from kafka_common.tracing import (
    KAFKA,
    MESSAGING_BODY_SIZE,
    MESSAGING_CLIENT_ID,
    MESSAGING_CONSUMER_GROUP_NAME,
    MESSAGING_CONVERSATION_ID,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_DESTINATION_PARTITION_ID,
    MESSAGING_KAFKA_MESSAGE_KEY,
    MESSAGING_KAFKA_OFFSET,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    enabled_tracer,
    extract,
    inject,
    set_error,
)

_MS = 1_000_000  # nanoseconds


class Tracing(Protocol):
    """Wraps the worker's parts so that each request is traced (or leaves them be)."""

    def engine(self, engine: RerankEngine) -> RerankEngine:
        """``engine`` with its ``score`` calls traced."""
        ...

    def sender(self, sender: Sender) -> Sender:
        """``sender`` with each output traced, and the reply's trace context in its headers."""
        ...

    def processor(self, processor: Processor) -> Processor:
        """``processor`` with each request's decoding and answering in its spans."""
        ...


class NoTracing:
    """Tracing off: every part as given, so the per-record path is the one it has
    without tracing."""

    def engine(self, engine: RerankEngine) -> RerankEngine:
        return engine

    def sender(self, sender: Sender) -> Sender:
        return sender

    def processor(self, processor: Processor) -> Processor:
        return processor


def worker_tracing(provider: TracerProvider | None, group_id: str, client_id: str) -> Tracing:
    """The worker's tracing over ``provider`` (default: the global one); decided once."""
    tracer = enabled_tracer(provider)
    if tracer is None:
        return NoTracing()
    return WorkerTracing(tracer, group_id, client_id)


class WorkerTracing:
    """The worker's spans (see the module docstring); only while tracing is on."""

    def __init__(self, tracer: Tracer, group_id: str, client_id: str) -> None:
        self._tracer = tracer
        self._group_id = group_id
        self._client_id = client_id

    def engine(self, engine: RerankEngine) -> RerankEngine:
        return TracedEngine(engine, self._tracer)

    def sender(self, sender: Sender) -> Sender:
        return TracedSender(sender, self._tracer, self._client_id)

    def processor(self, processor: Processor) -> Processor:
        return TracedProcessor(processor, self._tracer, self._group_id, self._client_id)


class TracedProcessor:
    """A :class:`Processor` whose requests each run in their ``process`` span, with
    decoding in its ``rerank decode`` child."""

    def __init__(self, processor: Processor, tracer: Tracer, group_id: str, client_id: str) -> None:
        self._processor = processor
        self._tracer = tracer
        self._group_id = group_id
        self._client_id = client_id

    def start(self, record: ConsumerRecord[Any, Any], received: float) -> Job:
        parent = extract(record.headers or ())
        span = self._tracer.start_span(
            f"process {record.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                MESSAGING_SYSTEM: KAFKA,
                MESSAGING_OPERATION_TYPE: "process",
                MESSAGING_OPERATION_NAME: "process",
                MESSAGING_DESTINATION_NAME: record.topic,
                MESSAGING_DESTINATION_PARTITION_ID: str(record.partition),
                MESSAGING_KAFKA_OFFSET: record.offset,
                MESSAGING_CONSUMER_GROUP_NAME: self._group_id,
                MESSAGING_CLIENT_ID: self._client_id,
            },
        )
        context = trace.set_span_in_context(span, parent)
        if not span.is_recording():  # not sampled: the context goes on, no span is made
            job = self._processor.start(record, received)
            return Job(job.context, _in_span(span, context, job.run))
        decoding = self._tracer.start_span("rerank decode", context=context)
        job = self._processor.start(record, received)
        decoded = job.context.decoded
        if isinstance(decoded, Rejection):
            for failed in (decoding, span):
                failed.set_status(Status(StatusCode.ERROR, decoded.message))
                failed.set_attribute("rerank.error.code", decoded.code.value)
            if decoded.correlation_id is not None:
                span.set_attribute(MESSAGING_CONVERSATION_ID, decoded.correlation_id)
        elif decoded is not None:
            span.set_attribute(MESSAGING_CONVERSATION_ID, decoded.correlation_id)
            span.set_attribute("rerank.documents", len(decoded.request.documents))
        decoding.end()
        return Job(job.context, _in_span(span, context, job.run))

    def give_up(self, record: ConsumerRecord[Any, Any], attempts: int, received: float) -> Job:
        return self._processor.give_up(record, attempts, received)


async def _in_span(span: Span, context: otel_context.Context, work: Awaitable[bool]) -> bool:
    token = otel_context.attach(context)
    try:
        answered = await work
        if not answered:  # the engine failed: left uncommitted for another worker
            span.set_attribute("rerank.abandoned", True)
        return answered
    except BaseException as exc:  # cancelled: given up (rebalance, drain), redelivered
        span.set_attribute("rerank.abandoned", True)
        set_error(span, exc)
        raise
    finally:
        otel_context.detach(token)
        span.end()


class TracedEngine:
    """A :class:`RerankEngine` whose ``score`` calls become spans (the rest passes through)."""

    def __init__(self, engine: RerankEngine, tracer: Tracer) -> None:
        self._engine = engine
        self._tracer = tracer

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def ready(self) -> bool:
        return self._engine.ready

    @property
    def in_flight_pairs(self) -> int:
        return self._engine.in_flight_pairs

    @property
    def failure(self) -> str | None:
        return self._engine.failure

    async def start(self) -> None:
        await self._engine.start()

    async def close(self) -> None:
        await self._engine.close()

    async def score(self, request: ScoreRequest) -> ScoreResult:
        request_span = trace.get_current_span()
        if not request_span.is_recording():  # not sampled (or outside a request)
            return await self._engine.score(request)
        start_ns = time.time_ns()
        try:
            result = await self._engine.score(request)
        except BaseException as exc:
            span = self._start("rerank score", start_ns, None, documents=len(request.documents))
            set_error(span, exc)
            if isinstance(exc, Exception):  # the request's span fails too
                request_span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            raise
        self._record(result, len(request.documents), start_ns, time.time_ns())
        return result

    def _start(self, name: str, start_ns: int, parent: Span | None, **attributes: Any) -> Span:
        """A span from ``start_ns``; ``attributes`` named without their ``rerank.`` prefix."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self._tracer.start_span(
            name,
            context=context,
            start_time=start_ns,
            attributes={f"rerank.{key}": value for key, value in attributes.items()} or None,
        )

    def _record(self, result: ScoreResult, documents: int, start_ns: int, end_ns: int) -> None:
        score = self._start(
            "rerank score",
            start_ns,
            None,
            documents=documents,
            prompt_tokens=result.prompt_tokens,
            truncated_documents=sum(result.truncated),
            queue_ms=result.queue_ms,
            inference_ms=result.inference_ms,
            batches=len(result.batches),
        )
        cursor = start_ns
        tokenize_ms = result.extra.get("tokenize_ms")
        if tokenize_ms is not None:
            cursor = min(end_ns, start_ns + round(tokenize_ms * _MS))
            self._start("rerank tokenize", start_ns, score).end(end_time=cursor)
        if result.batches:
            first = min(batch.start_ns for batch in result.batches)
            self._start("rerank queue", cursor, score).end(end_time=max(cursor, first))
            for batch in result.batches:
                self._start(
                    "rerank batch",
                    batch.start_ns,
                    score,
                    **{
                        "batch.id": batch.batch_id,
                        "batch.pairs": batch.pairs,
                        "batch.tokens": batch.tokens,
                        "batch.cost_tokens": batch.cost_tokens,
                    },
                ).end(end_time=batch.end_ns)
        else:  # no per-call timings: the engine's totals, laid out before the end
            inference_ns = max(cursor, end_ns - round(result.inference_ms * _MS))
            queue_ns = max(cursor, inference_ns - round(result.queue_ms * _MS))
            self._start("rerank queue", queue_ns, score).end(end_time=inference_ns)
            self._start("rerank inference", inference_ns, score).end(end_time=end_ns)
        score.end(end_time=end_ns)


class TracedSender:
    """A :class:`Sender` whose outputs become PRODUCER spans; a reply carries its span's
    context in ``traceparent``. A dead-letter record keeps the request's headers as they
    came (the contract says unchanged). An error reply or a dead-letter record marks the
    request's span failed, whether or not a step of the request failed first."""

    def __init__(self, sender: Sender, tracer: Tracer, client_id: str) -> None:
        self._sender = sender
        self._tracer = tracer
        self._client_id = client_id

    async def send(self, source: ConsumerRecord[Any, Any], output: OutputRecord) -> None:
        request = trace.get_current_span()
        if not request.is_recording():  # not sampled (or outside a request)
            await self._sender.send(source, output)
            return
        span = self._tracer.start_span(
            f"send {output.topic}", kind=SpanKind.PRODUCER, attributes=self._attributes(output)
        )
        code = output.error_code
        if output.dead_letter:
            for failed in (span, request):
                failed.set_attribute("rerank.dead_letter", True)
                failed.set_attribute("rerank.error.code", code or "")
            request.set_status(Status(StatusCode.ERROR, f"dead-lettered: {code}"))
        else:
            if code is not None:
                request.set_attribute("rerank.error.code", code)
                request.set_status(
                    Status(StatusCode.ERROR, f"answered with an error reply: {code}")
                )
            # a reply's headers are the contract's (never null), and its trace context
            headers = [(name, value or b"") for name, value in output.headers]
            inject(headers, span)
            output = dataclasses.replace(output, headers=headers)
        try:
            await self._sender.send(source, output)
        except BaseException as exc:
            set_error(span, exc)
            raise
        finally:
            span.end()

    def _attributes(self, output: OutputRecord) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            MESSAGING_SYSTEM: KAFKA,
            MESSAGING_OPERATION_TYPE: "send",
            MESSAGING_OPERATION_NAME: "send",
            MESSAGING_DESTINATION_NAME: output.topic,
            MESSAGING_BODY_SIZE: len(output.value or b""),
            MESSAGING_CLIENT_ID: self._client_id,
        }
        if output.partition is not None:
            attributes[MESSAGING_DESTINATION_PARTITION_ID] = str(output.partition)
        if output.key is not None:
            attributes[MESSAGING_KAFKA_MESSAGE_KEY] = output.key.decode("utf-8", "replace")
        return attributes
