"""What the HTTP gateway adds: ``python -m benchmarks.gateway_bench [--calls N]``.

One worker process (the real :class:`consumer.service.worker.Worker`, no-op engine: no
model) answers through a real broker. The same calls go two ways, in alternating rounds
of the same run:

* ``sdk``: ``RerankClient.rerank`` in this process, straight to Kafka;
* ``gateway``: ``POST /v2/rerank`` (Cohere's shape) over HTTP to the ``rerank-gateway``
  binary, which makes the same SDK call.

Each round measures lone calls (one at a time: the latency a call pays) and a closed loop
of ``--concurrency`` calls (requests/s). The gateway's added latency is the difference of
the medians. A probe, not a test: broker, worker, gateway and caller share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.overhead_bench import NoOpEngine, _create_topics, _delete_topics, _hardware
from producer_sdk import RerankClient

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
QUERY = "what is kafka?"
DOCUMENTS = [f"document {i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(8)]
Call = Callable[[], Awaitable[Any]]


def _run_worker(bootstrap: str, names: tuple[str, str, str], group: str, ready: Any) -> None:
    """The worker process: a real Worker with the no-op engine, until SIGTERM."""
    from consumer.service.metrics import Metrics
    from consumer.service.worker import Worker
    from consumer.service.worker_config import WorkerConfig

    async def run() -> None:
        config = WorkerConfig(
            bootstrap_servers=bootstrap,
            request_topic=names[0],
            reply_topic=names[1],
            dlq_topic=names[2],
            group_id=group,
            client_id="bench-worker",
        )
        worker = Worker(config, NoOpEngine(), Metrics())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.request_stop)
        task = asyncio.create_task(worker.run())
        while not worker.in_group:
            await asyncio.sleep(0.05)
        ready.send("ready")
        await task

    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _start_gateway(
    bootstrap: str, names: tuple[str, str, str], group: str
) -> tuple[Any, str]:
    port = _free_port()
    binary = Path(sys.executable).with_name("rerank-gateway")
    args = [str(binary), "--bootstrap-servers", bootstrap, "--port", str(port)]
    args += ["--request-topic", names[0], "--reply-topic", names[1], "--group-id", group]
    args += ["--max-concurrency", "4096", "--log-level", "WARNING"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RERANK_GATEWAY_API_TOKEN", None)
    proc = subprocess.Popen(args, env=env)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health/ready") as response:
                    if response.status == 200:
                        return proc, url
            await asyncio.sleep(0.1)


async def _lone(call: Call, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return latencies


async def _closed_loop(call: Call, n: int, concurrency: int) -> float:
    remaining = n

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main_async(args: argparse.Namespace) -> None:
    names = await _create_topics(args.bootstrap, args.partitions)
    group = f"bench-workers-{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    worker = context.Process(target=_run_worker, args=(args.bootstrap, names, group, child))
    worker.start()
    gateway: Any = None
    try:
        assert await asyncio.to_thread(parent.recv) == "ready"
        gateway, url = await _start_gateway(args.bootstrap, names, group)
        client = RerankClient(args.bootstrap, request_topic=names[0], reply_topic=names[1])
        async with client, aiohttp.ClientSession() as http:
            body = {"model": "m", "query": QUERY, "documents": DOCUMENTS, "top_n": 5}

            async def via_sdk() -> Any:
                return await client.rerank(QUERY, DOCUMENTS, top_n=5)

            async def via_gateway() -> Any:
                async with http.post(f"{url}/v2/rerank", json=body) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            await _measure(args, {"sdk": via_sdk, "gateway": via_gateway})
    finally:
        if gateway is not None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        if worker.pid is not None:
            os.kill(worker.pid, signal.SIGTERM)
        worker.join(30)
        await _delete_topics(args.bootstrap, names)


async def _measure(args: argparse.Namespace, ways: dict[str, Call]) -> None:
    print(_hardware() + ", and the gateway")
    print(
        f"{len(DOCUMENTS)} documents (~{len(DOCUMENTS[0])} bytes) per call, top_n 5, "
        f"{args.partitions} partitions, no-op engine, worker and gateway defaults; "
        f"{args.rounds} rounds, each way: {args.calls} lone calls, then {args.loop_calls} "
        f"calls with {args.concurrency} in flight"
    )
    for call in ways.values():  # warm-up: connections, caches
        await _lone(call, 50)
    lone: dict[str, list[float]] = {name: [] for name in ways}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for round_no in range(1, args.rounds + 1):
        for name, call in ways.items():
            lone[name] += (latencies := await _lone(call, args.calls))
            rates[name].append(await _closed_loop(call, args.loop_calls, args.concurrency))
            print(
                f"round {round_no} {name:8s} lone p50 {_ms(latencies, 0.5):6.2f} ms  "
                f"p95 {_ms(latencies, 0.95):6.2f} ms  p99 {_ms(latencies, 0.99):6.2f} ms  "
                f"| {rates[name][-1]:7,.0f} calls/s at {args.concurrency} in flight"
            )
    sdk, gw = statistics.median(lone["sdk"]), statistics.median(lone["gateway"])
    sdk_rate, gw_rate = statistics.median(rates["sdk"]), statistics.median(rates["gateway"])
    print(
        f"all rounds: lone p50 sdk {sdk * 1000:.2f} ms, gateway {gw * 1000:.2f} ms: the gateway "
        f"adds {(gw - sdk) * 1000:.2f} ms; calls/s (median of rounds) sdk {sdk_rate:,.0f}, "
        f"gateway {gw_rate:,.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--calls", type=int, default=300, help="lone calls per way per round")
    parser.add_argument("--loop-calls", type=int, default=2000, help="closed-loop calls")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
