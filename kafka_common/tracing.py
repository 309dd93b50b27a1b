"""Shared OpenTelemetry conventions of the rerank services' Kafka records.

The SDK, the worker and the gateway trace their Kafka records the same way: W3C trace
context in record headers, OpenTelemetry's messaging attribute names, one way to mark a
span failed. Tracing is off unless an OpenTelemetry SDK tracer provider is installed
(:func:`enabled_tracer`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, Status, StatusCode, Tracer, TracerProvider

INSTRUMENTATION_SCOPE: Final = "kafka_rerank"

# OpenTelemetry messaging semantic conventions (the API package does not ship them).
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_DESTINATION_PARTITION_ID: Final = "messaging.destination.partition.id"
MESSAGING_KAFKA_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_KAFKA_MESSAGE_KEY: Final = "messaging.kafka.message.key"
MESSAGING_CONVERSATION_ID: Final = "messaging.message.conversation_id"
MESSAGING_BODY_SIZE: Final = "messaging.message.body.size"
MESSAGING_CLIENT_ID: Final = "messaging.client.id"
MESSAGING_CONSUMER_GROUP_NAME: Final = "messaging.consumer.group.name"
ERROR_TYPE: Final = "error.type"
KAFKA: Final = "kafka"

Headers = Sequence[tuple[str, bytes | None]]


class HeaderGetter(Getter[Headers]):
    """Reads propagation fields from Kafka record headers (the first of each name)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        for name, value in carrier:
            if name == key and value is not None:
                return [value.decode("utf-8", "replace")]
        return None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


class HeaderSetter(Setter[list[tuple[str, bytes]]]):
    """Writes propagation fields into Kafka record headers, replacing any of that name."""

    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        if any(name == key for name, _ in carrier):
            carrier[:] = [(name, v) for name, v in carrier if name != key]
        carrier.append((key, value.encode("utf-8")))


HEADER_GETTER: Final = HeaderGetter()
HEADER_SETTER: Final = HeaderSetter()


def enabled_tracer(provider: TracerProvider | None = None) -> Tracer | None:
    """A tracer of ``provider`` (default: the global one), or None when tracing is off.

    Off means the OpenTelemetry API's own provider (the proxy used before anything is
    installed, or the no-op one): an application that configured no SDK gets no spans
    and no per-call work, and a header only to pass on a trace it is already in
    (:func:`pass_on_current`).
    """
    if provider is None:
        provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer(INSTRUMENTATION_SCOPE)


def inject(headers: list[tuple[str, bytes]], span: Span) -> None:
    """Add ``span``'s context (``traceparent``, ``tracestate``, baggage) to ``headers``."""
    propagate.inject(headers, trace.set_span_in_context(span), HEADER_SETTER)


def pass_on_current(headers: list[tuple[str, bytes]]) -> None:
    """With tracing off here, add the caller's trace context to ``headers`` when the
    caller is inside a trace (e.g. one extracted from an incoming request); else nothing."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers, setter=HEADER_SETTER)


def extract(headers: Headers) -> otel_context.Context:
    """The context a record's headers carry (empty when they carry none)."""
    return propagate.extract(headers, getter=HEADER_GETTER)


def set_error(span: Span, error: BaseException | None) -> None:
    """Mark ``span`` failed by ``error``: status ERROR, ``error.type``, the exception event,
    and the error reply's code and retriable flag when it has them."""
    if error is None:
        return
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.set_attribute(ERROR_TYPE, type(error).__name__)
    code = getattr(error, "code", None)
    if isinstance(code, str):
        span.set_attribute("rerank.error.code", code)
    retriable = getattr(error, "retriable", None)
    if isinstance(retriable, bool):
        span.set_attribute("rerank.error.retriable", retriable)
    if isinstance(error, Exception):
        span.record_exception(error)


def now_ns() -> int:
    """Wall-clock time as OpenTelemetry timestamps it (Unix epoch nanoseconds)."""
    return time.time_ns()
