"""The worker process's OpenTelemetry tracer provider, for ``RERANK_TRACING=otlp``.

Called by the entry point only (never at import): with tracing off nothing is set up and
the worker's spans stay the API's no-op ones, which the worker checks once and skips.

The exporter is configured the standard way, by OpenTelemetry's own environment
variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``),
``..._HEADERS``, ``..._TIMEOUT``, ``..._CERTIFICATE``; ``OTEL_EXPORTER_OTLP_PROTOCOL``
(or ``..._TRACES_PROTOCOL``) picks ``grpc`` (the default, as in OpenTelemetry's Python
auto-configuration) or ``http/protobuf``; ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` name the service (default ``rerank-worker``);
``OTEL_TRACES_SAMPLER``/``..._ARG`` sample; ``OTEL_BSP_*`` tune the batch processor.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

DEFAULT_SERVICE_NAME = "rerank-worker"
PROTOCOLS = ("grpc", "http/protobuf")


class TracingUnavailable(Exception):
    """Tracing is asked for but cannot be set up; the message says why in one line."""


def tracer_provider(mode: str) -> TracerProvider | None:
    """The provider ``mode`` asks for (``off``: None); the caller installs it."""
    if mode == "off":
        return None
    if mode != "otlp":
        raise TracingUnavailable(f"unknown tracing mode {mode!r}: off or otlp")
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            "RERANK_TRACING=otlp needs the OpenTelemetry SDK and exporter: "
            f"pip install 'kafka-rerank[worker,tracing]' ({exc.name} is missing)"
        ) from exc
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(otlp_exporter()))
    return provider


def otlp_protocol() -> str:
    """The OTLP protocol the standard variables ask for (default ``grpc``)."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol not in PROTOCOLS:
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: grpc or http/protobuf"
        )
    return protocol


def otlp_exporter() -> SpanExporter:
    """The OTLP span exporter of :func:`otlp_protocol`; it reads its own variables."""
    protocol = otlp_protocol()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment, unused-ignore]
                OTLPSpanExporter,
            )
    except ImportError as exc:
        raise TracingUnavailable(
            f"RERANK_TRACING=otlp over {protocol} needs the OTLP exporter: "
            f"pip install 'kafka-rerank[worker,tracing]' ({exc.name} is missing)"
        ) from exc
    return OTLPSpanExporter()
