"""The service's own overhead: ``python -m benchmarks.overhead_bench [--requests N]``.

A real :class:`consumer.service.worker.Worker` (this process) answers requests with a no-op
engine (constant scores, no model), so what is measured is everything else: fetching,
decoding, validation, reply encoding, producing, acks and commits. A load generator
in a separate process (confluent-kafka) produces requests of 8 documents of about
1 KB each and reads the replies. Topics are uuid-named and deleted afterwards.

Two runs:
* burst: every request produced as fast as possible; requests/s is first produce to
  last reply. Latencies here are mostly queueing behind the burst.
* paced: requests produced at half the burst rate; its p50/p95 latencies are what a
  request costs when the service is not saturated.

A probe, not a test: numbers depend on the machine (the broker shares its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import platform
import random
import string
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.engine.api import ScoreRequest, ScoreResult
from consumer.service.metrics import Metrics
from consumer.service.worker import Worker
from consumer.service.worker_config import WorkerConfig

log = logging.getLogger(__name__)


class NoOpEngine:
    """A :class:`consumer.engine.api.RerankEngine` that returns constant scores at once."""

    model_name = "no-op"
    ready = True
    in_flight_pairs = 0
    failure: str | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def score(self, request: ScoreRequest) -> ScoreResult:
        n = len(request.documents)
        return ScoreResult(
            logits=(0.0,) * n,
            scores=(0.5,) * n,
            prompt_tokens=0,
            truncated=(False,) * n,
            queue_ms=0.0,
            inference_ms=0.0,
        )


@dataclass(frozen=True)
class LoadSpec:
    bootstrap: str
    request_topic: str
    reply_topic: str
    reply_partitions: int
    requests: int
    documents: int
    doc_bytes: int
    rate: float  # requests/s; 0 = as fast as possible
    run_id: str


def _request_values(spec: LoadSpec) -> tuple[list[bytes], list[str]]:
    import orjson

    rng = random.Random(0)
    alphabet = string.ascii_lowercase + " "
    docs = ["".join(rng.choices(alphabet, k=spec.doc_bytes)) for _ in range(spec.documents * 4)]
    values, ids = [], []
    for i in range(spec.requests):
        chosen = [docs[(i + k) % len(docs)] for k in range(spec.documents)]
        values.append(orjson.dumps({"query": f"query {i}", "documents": chosen, "top_n": 5}))
        ids.append(f"{spec.run_id}-{i}")
    return values, ids


def run_load(spec: LoadSpec, conn: Connection) -> None:
    """The load generator (a separate process): produce, read replies, report timings."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    values, ids = _request_values(spec)
    consumer = Consumer(
        {
            "bootstrap.servers": spec.bootstrap,
            "group.id": f"bench-{spec.run_id}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    partitions = [TopicPartition(spec.reply_topic, p) for p in range(spec.reply_partitions)]
    for tp in partitions:
        _, high = consumer.get_watermark_offsets(tp, timeout=10)
        tp.offset = high
    consumer.assign(partitions)
    sent_at: dict[str, float] = {}
    replied_at: dict[str, float] = {}
    expected = set(ids)
    done = threading.Event()

    def read_replies() -> None:
        deadline = time.monotonic() + 600
        while len(replied_at) < len(expected) and time.monotonic() < deadline:
            # poll, not consume(n): a batch read waits for n records or its timeout,
            # which would add up to that timeout to every latency.
            message = consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            key = message.key()
            cid = key.decode() if key is not None else ""
            if cid in expected and cid not in replied_at:
                replied_at[cid] = time.monotonic()
        done.set()

    reader = threading.Thread(target=read_replies, daemon=True)
    reader.start()
    producer = Producer(
        {
            "bootstrap.servers": spec.bootstrap,
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "compression.type": "none",
        }
    )
    conn.send("ready")
    conn.recv()  # go
    start = time.monotonic()
    interval = 1.0 / spec.rate if spec.rate > 0 else 0.0
    for i, (value, cid) in enumerate(zip(values, ids, strict=True)):
        if interval:
            wait = start + i * interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        sent_at[cid] = time.monotonic()
        while True:
            try:
                producer.produce(
                    spec.request_topic,
                    value=value,
                    key=cid.encode(),
                    headers=[("correlation-id", cid.encode())],
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    produced = time.monotonic()
    done.wait(600)
    consumer.close()
    latencies = sorted(replied_at[c] - sent_at[c] for c in replied_at)
    conn.send(
        {
            "replies": len(replied_at),
            "seconds": (max(replied_at.values()) - start) if replied_at else math.nan,
            "produce_seconds": produced - start,
            "latencies": latencies,
        }
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


async def _create_topics(bootstrap: str, partitions: int) -> tuple[str, str, str]:
    run = uuid.uuid4().hex
    names = (f"bench-requests-{run}", f"bench-replies-{run}", f"bench-dlq-{run}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(names[0], partitions, 1),
                NewTopic(names[1], partitions, 1),
                NewTopic(names[2], 1, 1),
            ]
        )
        await asyncio.sleep(1.0)  # let every partition get its leader
    finally:
        await admin.close()
    return names


async def _delete_topics(bootstrap: str, names: tuple[str, ...]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    except Exception:
        log.warning("could not delete bench topics %s", names)
    finally:
        await admin.close()


async def _load_run(spec: LoadSpec) -> dict[str, Any]:
    """Start the generator process, wait for it to be ready, let it go, collect its report."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=run_load, args=(spec, child), daemon=True)
    process.start()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, parent.recv) == "ready"
    parent.send("go")
    report: dict[str, Any] = await loop.run_in_executor(None, parent.recv)
    await loop.run_in_executor(None, process.join, 30)
    return report


def _print_run(name: str, spec: LoadSpec, report: dict[str, Any]) -> float:
    rate = report["replies"] / report["seconds"] if report["seconds"] else math.nan
    lat = report["latencies"]
    print(
        f"{name:6s} {report['replies']:>6d}/{spec.requests} replies  "
        f"{rate:8,.0f} requests/s  ({rate * spec.documents:,.0f} pairs/s)  "
        f"p50 {_percentile(lat, 0.5) * 1000:7.1f} ms  p95 {_percentile(lat, 0.95) * 1000:7.1f} ms  "
        f"p99 {_percentile(lat, 0.99) * 1000:7.1f} ms"
        + (f"  (offered {spec.rate:,.0f}/s)" if spec.rate else "")
    )
    return rate


@contextlib.asynccontextmanager
async def worker_on_fresh_topics(
    bootstrap: str, partitions: int, engine: Any, **settings: Any
) -> AsyncIterator[tuple[Worker, WorkerConfig]]:
    """A :class:`Worker` on this event loop over new uuid-named topics, once it is in its
    group; stopped and the topics deleted afterwards. ``settings``: more WorkerConfig
    fields."""
    names = await _create_topics(bootstrap, partitions)
    config = WorkerConfig(
        bootstrap_servers=bootstrap,
        request_topic=names[0],
        reply_topic=names[1],
        dlq_topic=names[2],
        group_id=f"bench-workers-{uuid.uuid4().hex}",
        **settings,
    )
    worker = Worker(config, engine, Metrics())
    task = asyncio.create_task(worker.run())
    try:
        while not worker.in_group:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        yield worker, config
    finally:
        worker.request_stop()
        await task
        await _delete_topics(bootstrap, names)


async def main_async(args: argparse.Namespace) -> None:
    async with worker_on_fresh_topics(
        args.bootstrap,
        args.partitions,
        NoOpEngine(),
        client_id="bench-worker",
        delivery=args.delivery,
        producer_linger_ms=args.producer_linger_ms,
    ) as (_, config):

        def spec(requests: int, rate: float) -> LoadSpec:
            return LoadSpec(
                bootstrap=args.bootstrap,
                request_topic=config.request_topic,
                reply_topic=config.reply_topic,
                reply_partitions=args.partitions,
                requests=requests,
                documents=args.documents,
                doc_bytes=args.doc_bytes,
                rate=rate,
                run_id=uuid.uuid4().hex[:12],
            )

        print(_hardware())
        print(
            f"{args.documents} documents x {args.doc_bytes} bytes per request, "
            f"{args.partitions} partitions, no-op engine, delivery {config.delivery}, worker "
            f"defaults (linger {config.producer_linger_ms} ms, high mark "
            f"{config.inflight_high_pairs} pairs, commits every {config.commit_interval_s:g} s)"
        )
        await _load_run(spec(min(2000, args.requests), 0))  # warm-up: connections, caches
        burst_spec = spec(args.requests, 0)
        cpu_before = time.process_time()
        burst_report = await _load_run(burst_spec)
        worker_cpu = time.process_time() - cpu_before
        burst = _print_run("burst", burst_spec, burst_report)
        per_request_us = worker_cpu / max(1, burst_report["replies"]) * 1e6
        print(
            f"       worker process CPU: {per_request_us:.0f} us "
            f"per request ({worker_cpu:.1f} s for the burst; the rest of the cores went to "
            "the broker and the load generator)"
        )
        if args.paced and math.isfinite(burst):
            rate = args.paced_rate or burst / 2
            paced_spec = spec(max(1000, min(args.requests // 2, int(rate * 5))), rate)
            _print_run("paced", paced_spec, await _load_run(paced_spec))


def _hardware() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"hardware: {usable} usable CPU cores ({os.cpu_count()} online), {platform.machine()}, "
        f"{platform.processor() or 'unknown CPU'}; Python {platform.python_version()}; "
        "broker, worker and load generator share these cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--doc-bytes", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=0.0,
        help="offered rate of the paced run (half the burst rate)",
    )
    parser.add_argument("--no-paced", dest="paced", action="store_false", help="skip the paced run")
    parser.add_argument(
        "--delivery",
        default="at_least_once",
        choices=("at_least_once", "exactly_once"),
        help="the worker's delivery mode (exactly_once: replies in transactions; the load "
        "generator reads with read_committed either way)",
    )
    parser.add_argument(
        "--producer-linger-ms",
        type=int,
        default=WorkerConfig.producer_linger_ms,
        help="the worker's producer linger (default: the worker's)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
