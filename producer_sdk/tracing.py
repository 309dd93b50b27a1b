"""OpenTelemetry traces of rerank calls: W3C trace context in Kafka record headers.

Off unless the application installed an OpenTelemetry SDK tracer provider (or passed one
as ``tracer_provider``): with the API's default provider no span is created and the call
path does no tracing work but one look at the caller's context: a call made inside a trace
(one an upstream hop carried in, such as the HTTP request the gateway serves) passes that
trace on in the record's ``traceparent`` header, as OpenTelemetry's API does without an
SDK, so the worker's spans join it. Whether tracing is on is decided once, when the
client starts.

One call, on:

* ``rerank`` (CLIENT): the whole call, a child of the caller's current span; its status
  is ERROR when the call raises (``error.type``: the error's class, and the error reply's
  code when there is one);
* ``send <request topic>`` (PRODUCER), its child: producing the request until the broker
  acknowledged it. Its context is what goes into the record's ``traceparent`` (and
  ``tracestate``) header, through the global propagator, so the worker's spans are its
  children;
* ``receive <reply topic>`` (CONSUMER), a child of ``rerank``: handling the reply
  record, linked to the worker's span that produced it.

Attribute names follow OpenTelemetry's messaging semantic conventions
(``messaging.system``, ``messaging.destination.name``, ``messaging.operation.type``...);
the rerank-specific ones start with ``rerank.``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

from aiokafka import ConsumerRecord
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Tracer, TracerProvider

from kafka_common.tracing import (
    KAFKA,
    MESSAGING_BODY_SIZE,
    MESSAGING_CLIENT_ID,
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
from producer_sdk.result import RerankResult

T = TypeVar("T")


def in_callers_context(call: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """``call``, to run on another thread's loop in the calling thread's trace context
    (the sync client): unchanged when that context is empty."""
    caller = otel_context.get_current()
    if not caller:
        return call
    return _attached(caller, call)


async def _attached(context: otel_context.Context, call: Awaitable[T]) -> T:
    token = otel_context.attach(context)
    try:
        return await call
    finally:
        otel_context.detach(token)


class ClientTracing:
    """The spans of :class:`producer_sdk.client.RerankClient`'s calls."""

    def __init__(
        self, tracer: Tracer, request_topic: str, reply_topic: str, client_id: str
    ) -> None:
        self._tracer = tracer
        self._request_topic = request_topic
        self._reply_topic = reply_topic
        self._client_id = client_id
        self._send_name = f"send {request_topic}"
        self._receive_name = f"receive {reply_topic}"

    @classmethod
    def create(
        cls,
        provider: TracerProvider | None,
        request_topic: str,
        reply_topic: str,
        client_id: str,
    ) -> ClientTracing | None:
        """The client's tracing, or None when tracing is off (see :func:`enabled_tracer`)."""
        tracer = enabled_tracer(provider)
        if tracer is None:
            return None
        return cls(tracer, request_topic, reply_topic, client_id)

    @contextlib.contextmanager
    def call(self, documents: int, top_n: int | None) -> Iterator[Span]:
        """The ``rerank`` span of one call, current inside the block; ERROR if it raises."""
        attributes: dict[str, Any] = {
            MESSAGING_SYSTEM: KAFKA,
            MESSAGING_DESTINATION_NAME: self._request_topic,
            MESSAGING_CLIENT_ID: self._client_id,
            "rerank.documents": documents,
        }
        if top_n is not None:
            attributes["rerank.top_n"] = top_n
        with self._tracer.start_as_current_span(
            "rerank",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as error:
                set_error(span, error)
                raise

    def send(
        self, call: Span, headers: list[tuple[str, bytes]], correlation_id: str, size: int
    ) -> Span:
        """Start the ``send`` span of a call's request and put its context into ``headers``.

        A call that is not sampled gets no span, but its context still goes out (flagged
        not sampled), so that the worker does not sample the request either."""
        if not call.is_recording():
            inject(headers, call)
            return call  # a non-recording span: ending it does nothing
        call.set_attribute(MESSAGING_CONVERSATION_ID, correlation_id)
        span = self._tracer.start_span(
            self._send_name,
            context=trace.set_span_in_context(call),
            kind=SpanKind.PRODUCER,
            attributes={
                MESSAGING_SYSTEM: KAFKA,
                MESSAGING_OPERATION_TYPE: "send",
                MESSAGING_OPERATION_NAME: "send",
                MESSAGING_DESTINATION_NAME: self._request_topic,
                MESSAGING_KAFKA_MESSAGE_KEY: correlation_id,
                MESSAGING_CONVERSATION_ID: correlation_id,
                MESSAGING_BODY_SIZE: size,
                MESSAGING_CLIENT_ID: self._client_id,
            },
        )
        inject(headers, span)
        return span

    async def sending(
        self, span: Span, delivery: Awaitable[None], future: asyncio.Future[Any]
    ) -> None:
        """Await ``delivery`` (which settles ``future`` when sending fails), then end ``span``."""
        try:
            await delivery
        finally:
            if future.done() and not future.cancelled() and future.exception() is not None:
                set_error(span, future.exception())
            span.end()

    def received(
        self,
        call: Span,
        record: ConsumerRecord[Any, Any],
        started_ns: int,
        future: asyncio.Future[Any],
    ) -> None:
        """Record the handling of a call's reply ``record`` as a ``receive`` span."""
        if not call.is_recording():
            return
        worker = trace.get_current_span(extract(record.headers or ())).get_span_context()
        span = self._tracer.start_span(
            self._receive_name,
            context=trace.set_span_in_context(call),
            kind=SpanKind.CONSUMER,
            links=[Link(worker)] if worker.is_valid else None,
            start_time=started_ns,
            attributes={
                MESSAGING_SYSTEM: KAFKA,
                MESSAGING_OPERATION_TYPE: "receive",
                MESSAGING_OPERATION_NAME: "receive",
                MESSAGING_DESTINATION_NAME: self._reply_topic,
                MESSAGING_DESTINATION_PARTITION_ID: str(record.partition),
                MESSAGING_KAFKA_OFFSET: record.offset,
                MESSAGING_CLIENT_ID: self._client_id,
            },
        )
        if future.done() and not future.cancelled():
            error = future.exception()
            if error is not None:
                set_error(span, error)
            else:
                _result_attributes(span, future.result())
        span.end()


def _result_attributes(span: Span, result: RerankResult) -> None:
    span.set_attribute("rerank.model", result.model)
    span.set_attribute("rerank.results", len(result.results))
    span.set_attribute("rerank.prompt_tokens", result.usage.prompt_tokens)
    timing = result.timing
    span.set_attribute("rerank.worker.queue_ms", timing.queue_ms)
    span.set_attribute("rerank.worker.inference_ms", timing.inference_ms)
    span.set_attribute("rerank.worker.total_ms", timing.total_ms)
