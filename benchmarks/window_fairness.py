"""The in-flight window under a closed loop: ``python -m benchmarks.window_fairness``.

    python -m benchmarks.window_fairness --bootstrap 127.0.0.1:9092 [--seconds 20]

A real :class:`consumer.service.worker.Worker` (this process) answers through the broker
with a steady engine: one request at a time, ``--pairs-per-s`` pairs a second, as a GPU of
that speed would. ``--clients`` callers of the SDK (:class:`producer_sdk.RerankClient`)
each send a request of ``--documents`` documents as soon as their last one is answered,
so more pairs are outstanding than the window holds. Three variants, one after another on
fresh topics:

* ``fixed``: the fixed marks (``inflight_target_s=0``): the worker takes every request;
* ``window``: the high mark holds ``--target-s`` of work at the measured rate, the rest
  waits in Kafka, and the worker polls one partition's records after another (how aiokafka
  hands them out; the worker's poll is replaced by a plain one for this variant);
* ``window, backlog``: the same window, each poll's room shared out one record at a time
  to the partition with the most records not yet taken (the worker's poll before oldest
  first; kept here to compare);
* ``window, oldest first``: the same window, with the worker's own poll: oldest first
  across partitions (:mod:`consumer.service.oldest_first`).

Reported: answered pairs/s, latency percentiles from the call to its result, and the
most pairs the worker held.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.host import positive_float, positive_int
from benchmarks.overhead_bench import NoOpEngine, _percentile, worker_on_fresh_topics
from consumer.engine.api import ScoreRequest, ScoreResult
from consumer.service.fetching import POLL_TIMEOUT_MS, FetchLoop
from consumer.service.worker_config import WorkerConfig
from producer_sdk import RerankClient

VARIANTS = ("fixed", "window", "window, backlog", "window, oldest first")


class SteadyEngine(NoOpEngine):
    """Scores one request at a time at ``pairs_per_s``."""

    def __init__(self, pairs_per_s: float) -> None:
        self.pairs_per_s = pairs_per_s
        self._turn = asyncio.Lock()

    async def score(self, request: ScoreRequest) -> ScoreResult:
        async with self._turn:
            await asyncio.sleep(len(request.documents) / self.pairs_per_s)
        return await super().score(request)


async def plain_poll(fetch: FetchLoop, consumer: Any) -> Any:
    """The poll before the fair one: aiokafka's own order of partitions."""
    size = fetch._intake.poll_size()
    return await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=size)


async def backlog_poll(fetch: FetchLoop, consumer: Any) -> Any:
    """The poll before oldest first: when the room limits it, records go one at a time to
    the partition with the most not yet taken (high watermark, as of its last fetch, less
    position)."""
    size = fetch._intake.poll_size()
    if size >= fetch._max_poll_records:
        return await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=size)
    backlog: list[tuple[int, Any]] = []
    for tp in consumer.assignment() - consumer.paused():
        end = consumer.highwater(tp)  # None until fetched once
        if end is not None and (waiting := end - await consumer.position(tp)) > 0:
            backlog.append((-waiting, tp))
    heapq.heapify(backlog)
    shares: dict[Any, int] = {}
    for _ in range(size):
        if not backlog:
            break
        waiting, tp = heapq.heappop(backlog)
        shares[tp] = shares.get(tp, 0) + 1
        if waiting < -1:
            heapq.heappush(backlog, (waiting + 1, tp))
    taken = {}
    for tp, share in shares.items():
        if records := (await consumer.getmany(tp, max_records=share)).get(tp):
            taken[tp] = records
    return taken or await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=size)


POLLS = {"window": plain_poll, "window, backlog": backlog_poll}


async def closed_loop(config: WorkerConfig, args: argparse.Namespace) -> list[float]:
    """Latencies (s) of the calls that ended in the measured span after the warm-up."""
    latencies: list[float] = []
    docs = [f"document {i} " * 20 for i in range(args.documents)]
    ends = time.monotonic() + args.warm_s + args.seconds
    measured_from = time.monotonic() + args.warm_s

    async def caller(client: RerankClient, n: int) -> None:
        while time.monotonic() < ends:
            started = time.monotonic()
            await client.rerank(f"query {n}", docs, timeout=120)
            if started >= measured_from:
                latencies.append(time.monotonic() - started)

    async with RerankClient(
        config.bootstrap_servers, request_topic=config.request_topic, reply_topic=config.reply_topic
    ) as client:
        await asyncio.gather(*(caller(client, n) for n in range(args.clients)))
    return latencies


async def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    held = 0
    async with worker_on_fresh_topics(
        args.bootstrap,
        args.partitions,
        SteadyEngine(args.pairs_per_s),
        inflight_target_s=0.0 if variant == "fixed" else args.target_s,
        inflight_min_pairs=args.documents,
    ) as (worker, config):
        if variant in POLLS:  # no records were polled yet: the callers start below
            poll = POLLS[variant]
            assert worker._running is not None
            fetch = worker._running.fetch
            fetch._poll = lambda: poll(fetch, fetch._consumer)  # type: ignore[method-assign]

        async def watch() -> None:
            nonlocal held
            while True:
                held = max(held, worker.in_flight_pairs)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            latencies = await closed_loop(config, args)
        finally:
            watcher.cancel()
    return summary(sorted(latencies), args, held)


def summary(ordered: list[float], args: argparse.Namespace, held: int) -> dict[str, float]:
    """The report of one variant from its latencies, sorted."""
    return {
        "pairs_per_s": len(ordered) * args.documents / args.seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * _percentile(ordered, 0.95),
        "p99_ms": 1000 * _percentile(ordered, 0.99),
        "max_ms": 1000 * ordered[-1],
        "most_pairs_held": float(held),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.window_fairness", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--partitions", type=positive_int, default=8)
    p.add_argument("--clients", type=positive_int, default=64)
    p.add_argument("--documents", type=positive_int, default=4)
    p.add_argument("--pairs-per-s", type=positive_float, default=400.0)
    p.add_argument("--target-s", type=positive_float, default=0.25)
    p.add_argument("--seconds", type=positive_float, default=20.0, help="measured span a run")
    p.add_argument("--warm-s", type=positive_float, default=3.0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.clients} callers x {args.documents} documents, steady engine at "
        f"{args.pairs_per_s:g} pairs/s, {args.partitions} partitions, window "
        f"{args.target_s:g} s of work; {args.seconds:g} s measured after {args.warm_s:g} s"
    )
    print(f"{'variant':<22}{'pairs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'held':>7}")  # fmt: skip
    show: Callable[[dict[str, float]], str] = lambda r: (  # noqa: E731
        f"{r['pairs_per_s']:>9.1f}{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}{r['p99_ms']:>9.0f}"
        f"{r['max_ms']:>9.0f}{r['most_pairs_held']:>7.0f}"
    )
    for variant in args.variants:
        print(f"{variant:<22}{show(asyncio.run(run_variant(variant, args)))}", flush=True)


if __name__ == "__main__":
    main()
