"""What tracing costs per request, off and on, in one run: ``python -m benchmarks.tracing_bench``.

Times the per-request code that tracing touches, without Kafka's I/O, on one core:

* sdk: ``RerankClient.rerank()`` of 8 documents of 1 KB, whose producer is a loopback
  that answers every request at once with the reply a worker would send (body, request
  record, headers, delivery task, reply matching and parsing: everything but the network);
* worker: one request record through the worker's path, decode -> engine -> reply
  (the real ``RequestProcessor`` and ``Delivery``, a constant engine, a sender that keeps
  nothing);
* inject / extract: writing a span's context into Kafka headers and reading it back.

Modes, interleaved round by round so that drift on a shared machine hits all alike:

* off: no tracer provider, the OpenTelemetry API's default; what runs unless traces
  are asked for (``RERANK_TRACING=off``, no SDK installed by the application);
* on: an SDK provider that samples every trace, spans handed to a ``BatchSpanProcessor``
  whose exporter drops them (exporting runs on the processor's own thread);
* unsampled: an SDK provider whose sampler keeps nothing (``OTEL_TRACES_SAMPLER=
  always_off``, or a caller's trace that was not sampled): context still propagates.

A probe, not a test: it prints microseconds per request (the median of the rounds) with
the hardware it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import random
import statistics
import string
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from benchmarks.host import cpu_model
from consumer.engine.api import ScoreRequest, ScoreResult
from consumer.service.codec import ReplyRoute, RequestLimits
from consumer.service.metrics import Metrics
from consumer.service.processing import RequestProcessor
from consumer.service.reply_router import Destination
from consumer.service.responder import Responder
from consumer.service.tracing import worker_tracing
from kafka_common.tracing import extract, inject
from producer_sdk.client import RerankClient
from producer_sdk.tracing import ClientTracing

REQUESTS = "rerank.requests"
REPLIES = "rerank.replies"
DLQ = "rerank.requests.dlq"
MODES = ("off", "on", "unsampled")


class DroppingExporter(SpanExporter):
    """Takes every span and keeps none: the cost of making spans, not of shipping them."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def provider_for(mode: str) -> TracerProvider | None:
    if mode == "off":
        return None
    if mode == "on":
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
        return provider
    return TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)


def sample_documents(documents: int, doc_bytes: int) -> list[str]:
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + " "
    return ["".join(rng.choices(alphabet, k=doc_bytes)) for _ in range(documents)]


# ---- the SDK's side ------------------------------------------------------------------------


class LoopbackProducer:
    """Answers every request at once with a worker's reply, as the reply reader would
    hand it to the client (carrying the request's trace context back, as a worker does)."""

    def __init__(self, client: RerankClient, documents: int) -> None:
        self._client = client
        self._offset = 0
        results = [{"index": i, "relevance_score": 1.0 / (i + 2)} for i in range(documents)]
        self._body = orjson.dumps(
            {
                "id": "__ID__",
                "model": "Qwen/Qwen3-Reranker-0.6B",
                "results": results,
                "usage": {"prompt_tokens": 2960},
                "timing_ms": {"queue": 1.5, "inference": 20.25, "total": 23.0},
            }
        )

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        **_: Any,
    ) -> asyncio.Future[None]:
        assert key is not None
        reply = self._body.replace(b"__ID__", key)
        trace_headers = [(n, v) for n, v in headers or () if n in ("traceparent", "tracestate")]
        self._offset += 1
        record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
            topic=REPLIES,
            partition=0,
            offset=self._offset,
            timestamp=0,
            timestamp_type=0,
            key=key,
            value=reply,
            checksum=None,
            serialized_key_size=len(key),
            serialized_value_size=len(reply),
            headers=[("correlation-id", key), *trace_headers],
        )
        loop = asyncio.get_running_loop()
        loop.call_soon(self._client._on_reply, record)
        ack: asyncio.Future[None] = loop.create_future()
        ack.set_result(None)
        return ack


def loopback_client(provider: TracerProvider | None, documents: int) -> RerankClient:
    """A started-looking client whose producer is a :class:`LoopbackProducer`."""
    client = RerankClient("loopback:9092", request_topic=REQUESTS, reply_topic=REPLIES)
    client._tracing = ClientTracing.create(provider, REQUESTS, REPLIES, client.client_id)
    client._producer = LoopbackProducer(client, documents)
    client._reply_headers = [("reply-topic", REPLIES.encode()), ("reply-partition", b"0")]
    client._reader = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    return client


# ---- the worker's side ---------------------------------------------------------------------


class ConstantEngine:
    model_name = "Qwen/Qwen3-Reranker-0.6B"
    ready = True
    in_flight_pairs = 0
    failure = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def score(self, request: ScoreRequest) -> ScoreResult:
        n = len(request.documents)
        return ScoreResult(
            logits=tuple(float(i) for i in range(n)),
            scores=tuple(0.5 for _ in range(n)),
            prompt_tokens=370 * n,
            truncated=(False,) * n,
            queue_ms=1.5,
            inference_ms=20.25,
            extra={"tokenize_ms": 0.5, "batches": 1.0},
        )


class DiscardingSender:
    async def send(self, *args: Any) -> None:
        pass


class FixedRouter:
    async def resolve(self, route: ReplyRoute) -> Destination:
        return Destination(route.topic or REPLIES, route.partition)


def request_record(value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=REQUESTS,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"0f8fad5bd9cb469fa16570867728950e",
        value=value,
        checksum=None,
        serialized_key_size=32,
        serialized_value_size=len(value),
        headers=headers,
    )


def worker_step(
    provider: TracerProvider | None, documents: list[str]
) -> Callable[[], Awaitable[object]]:
    """One request through the worker's per-record path, traced as the worker would."""
    tracing = worker_tracing(provider, "rerank-workers", "bench")
    engine: Any = tracing.engine(ConstantEngine())
    responder = Responder(
        tracing.sender(DiscardingSender()),
        FixedRouter(),  # type: ignore[arg-type]
        engine.model_name,
        DLQ,
        Metrics(CollectorRegistry()),
    )
    processor = tracing.processor(RequestProcessor(engine, responder, RequestLimits()))
    headers = [
        ("correlation-id", b"0f8fad5bd9cb469fa16570867728950e"),
        ("reply-topic", REPLIES.encode()),
        ("deadline-ms", str(int(time.time() * 1000) + 3_600_000).encode()),
    ]
    if provider is not None:  # the request comes from a traced producer
        span = provider.get_tracer("bench").start_span("send", kind=SpanKind.PRODUCER)
        inject(headers, span)
        span.end()
    record = request_record(
        orjson.dumps({"query": "what is a reranker?", "documents": documents}), headers
    )

    async def step() -> object:
        return await processor.start(record, 0.0).run

    return step


def header_steps(
    provider: TracerProvider | None,
) -> tuple[Callable[[], object], Callable[[], object]] | None:
    if provider is None:
        return None
    span = provider.get_tracer("bench").start_span("send", kind=SpanKind.PRODUCER)
    base = [("correlation-id", b"0f8fad5bd9cb469fa16570867728950e")]
    carried = list(base)
    inject(carried, span)

    def inject_once() -> object:
        headers = list(base)
        inject(headers, span)
        return headers

    def extract_once() -> object:
        return extract(carried)

    return inject_once, extract_once


# ---- running ---------------------------------------------------------------------------


async def _time_async(step: Callable[[], Awaitable[object]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await step()
    return (time.perf_counter() - start) / n * 1e6


def _time_sync(step: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e6


async def run(iterations: int, rounds: int, documents: int, doc_bytes: int) -> dict[str, Any]:
    """Microseconds per request, per mode and path (median over ``rounds``)."""
    docs = sample_documents(documents, doc_bytes)
    providers = {mode: provider_for(mode) for mode in MODES}
    per_round = max(1, iterations // rounds)
    samples: dict[tuple[str, str], list[float]] = {}
    clients = {mode: loopback_client(providers[mode], documents) for mode in MODES}
    workers = {mode: worker_step(providers[mode], docs) for mode in MODES}
    headers = {mode: header_steps(providers[mode]) for mode in MODES}

    def sdk_step(client: RerankClient) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            return await client.rerank("what is a reranker?", docs, top_n=5)

        return call

    sdk = {mode: sdk_step(clients[mode]) for mode in MODES}
    for mode in MODES:  # warm-up
        await _time_async(sdk[mode], min(500, per_round))
        await _time_async(workers[mode], min(500, per_round))
    for _ in range(rounds):
        for mode in MODES:
            samples.setdefault(("sdk", mode), []).append(await _time_async(sdk[mode], per_round))
            samples.setdefault(("worker", mode), []).append(
                await _time_async(workers[mode], per_round)
            )
            steps = headers[mode]
            if steps is not None:
                inject_once, extract_once = steps
                samples.setdefault(("inject", mode), []).append(_time_sync(inject_once, per_round))
                samples.setdefault(("extract", mode), []).append(
                    _time_sync(extract_once, per_round)
                )
    for provider in providers.values():
        if provider is not None:
            provider.shutdown()
    return {f"{path}/{mode}": statistics.median(values) for (path, mode), values in samples.items()}


def hardware() -> str:
    cpu = cpu_model()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("opentelemetry-api", "opentelemetry-sdk", "aiokafka", "orjson")
    )
    return (
        f"hardware: {cpu}, {usable} usable CPU cores ({os.cpu_count()} online); "
        f"Python {platform.python_version()}; {versions}"
    )


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        hardware(),
        f"{args.documents} documents x {args.doc_bytes} bytes per request, "
        f"{args.iterations} requests per mode in {args.rounds} interleaved rounds, one core; "
        "median of the rounds, microseconds per request",
        f"{'path':10s}"
        + "".join(f"{mode:>12s}" for mode in MODES)
        + "   on - off  unsampled - off",
    ]
    for path in ("sdk", "worker", "inject", "extract"):
        cells = [results.get(f"{path}/{mode}") for mode in MODES]
        row = f"{path:10s}" + "".join(
            f"{'-':>12s}" if cell is None else f"{cell:12.2f}" for cell in cells
        )
        off, on, unsampled = cells
        if off is not None and on is not None and unsampled is not None:
            row += f"{on - off:+11.2f}{unsampled - off:+16.2f}"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20_000, help="requests per mode")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--doc-bytes", type=int, default=1024)
    args = parser.parse_args()
    results = asyncio.run(run(args.iterations, args.rounds, args.documents, args.doc_bytes))
    print(report(results, args))


if __name__ == "__main__":
    main()
