"""A soak run: steady load through two workers and the gateway, sampled for growth.

    python tests/chaos/soak.py --minutes 20 --out soak.jsonl

Not part of the test command (it takes as long as asked): a broker of its own
(``deploy/local/kafka``, behind Toxiproxy like the chaos suite's), two worker processes
(the real service with the chaos suite's model-free engine, ``chaos_worker.py``), the
``rerank-gateway`` process, and callers of the gateway's Cohere route at ``--rate`` calls a
second. Every ``--every-s`` it samples each process's resident memory and open files, and
the workers' lookahead, outbox and in-flight gauges; one JSON line a sample. At the end it
prints each series' growth over the last ``--judge-min`` minutes (the first minutes are
warm-up) and exits 1 if any grew by ``--max-growth`` or more, or any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from chaos_tools import (
    REPO,
    ChaosBroker,
    Toxiproxy,
    WorkerPool,
    free_port,
    make_topics,
    pool_running,
)
from prometheus_client.parser import text_string_to_metric_families

WORKER_GAUGES = (
    "rerank_lookahead_records",
    "rerank_outbox_records",
    "rerank_outbox_bytes",
    "rerank_in_flight_pairs",
)
DOCUMENTS = [f"document {i}: " + "words " * 40 for i in range(8)]


def process_sample(pid: int) -> dict[str, int]:
    """Resident memory (bytes) and open files of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return {"rss_bytes": rss_kb * 1024, "open_files": len(os.listdir(f"/proc/{pid}/fd"))}


async def gauges(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WORKER_GAUGES:
                found[sample.name] = sample.value
    return found


@contextlib.asynccontextmanager
async def gateway(
    broker: ChaosBroker, topics: Any, group: str, log: Path
) -> AsyncIterator[tuple[int, int]]:
    """The gateway process; yields (its port, its pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "gateway",
        "--bootstrap-servers",
        broker.bootstrap,
        "--request-topic",
        topics.requests,
        "--reply-topic",
        topics.replies,
        "--group-id",
        group,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health/ready") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"the gateway never became ready; see {log}")
        yield port, process.pid
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)


class Load:
    """Calls of the gateway's /v2/rerank at a steady rate; counts outcomes."""

    def __init__(self, port: int, rate: float) -> None:
        self._url = f"http://127.0.0.1:{port}/v2/rerank"
        self._rate = rate
        self.ok = 0
        self.failed: dict[str, int] = {}
        self._calls: set[asyncio.Task[None]] = set()

    async def run(self, seconds: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            started = time.monotonic()
            n = 0
            while (now := time.monotonic()) - started < seconds:
                await asyncio.sleep(max(0.0, started + n / self._rate - now))
                task = asyncio.create_task(self._one(http, n))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
                n += 1
            await asyncio.gather(*self._calls)

    async def _one(self, http: aiohttp.ClientSession, n: int) -> None:
        body = {"model": "rerank", "query": f"query {n}", "documents": DOCUMENTS, "top_n": 3}
        try:
            async with http.post(self._url, json=body) as response:
                await response.read()
                if response.status == 200:
                    self.ok += 1
                    return
                reason = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = type(error).__name__
        self.failed[reason] = self.failed.get(reason, 0) + 1


async def sample_loop(
    pool: WorkerPool,
    gateway_pid: int,
    load: Load,
    every_s: float,
    out: Any,
    started: float,
    samples: list[dict[str, Any]],
) -> None:
    """Append a sample to ``samples`` (and a line to ``out``) every ``every_s``."""
    async with aiohttp.ClientSession() as http:
        while True:
            await asyncio.sleep(every_s)
            sample: dict[str, Any] = {
                "t_s": round(time.monotonic() - started, 1),
                "ok": load.ok,
                "failed": dict(load.failed),
                "gateway": process_sample(gateway_pid),
            }
            for slot in pool.slots:
                assert slot.process is not None
                sample[f"worker-{slot.index}"] = process_sample(slot.process.pid) | await gauges(
                    http, slot.http_port
                )
            samples.append(sample)
            out.write(json.dumps(sample) + "\n")
            out.flush()
            print(json.dumps(sample), flush=True)


def growth(samples: list[dict[str, Any]], judge_s: float) -> dict[str, float]:
    """Each process series' relative growth between the first sample of the judged window
    and the mean of the last two samples."""
    end = samples[-1]["t_s"]
    window = [s for s in samples if s["t_s"] >= end - judge_s]
    first, last = window[0], window[-2:]
    found = {}
    for process in [key for key in first if key == "gateway" or key.startswith("worker-")]:
        for series in ("rss_bytes", "open_files"):
            start = first[process][series]
            now = sum(s[process][series] for s in last) / len(last)
            found[f"{process} {series}"] = (now - start) / start if start else 0.0
    return found


async def main(args: argparse.Namespace) -> int:
    toxiproxy = Toxiproxy(
        subprocess.run(
            [str(REPO / "deploy" / "local" / "toxiproxy"), "path"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    work = Path(tempfile.mkdtemp(prefix="rerank-soak-"))
    broker = ChaosBroker(work / "broker", toxiproxy)
    samples: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(broker.start)
        topics = await make_topics(broker.bootstrap)
        pool = WorkerPool(broker, topics, work)
        for _ in range(2):
            pool.add(delivery=args.delivery, chaos_delay_s=args.delay_s)
        started = time.monotonic()
        with Path(args.out).open("w") as out:
            async with (
                pool_running(pool),
                gateway(broker, topics, pool.group, work / "gateway.log") as (port, gateway_pid),
            ):
                load = Load(port, args.rate)
                sampler = asyncio.create_task(
                    sample_loop(pool, gateway_pid, load, args.every_s, out, started, samples)
                )
                try:
                    await load.run(args.minutes * 60)
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
    finally:
        await asyncio.to_thread(broker.stop)
        toxiproxy.stop()
    grown = growth(samples, args.judge_min * 60)
    verdict = {
        "calls_ok": load.ok,
        "calls_failed": load.failed,
        "growth_over_last_min": args.judge_min,
        "growth": {name: round(value, 4) for name, value in grown.items()},
        "max_growth": max(grown.values()),
    }
    print(json.dumps(verdict, indent=2))
    with Path(args.out).open("a") as out:
        out.write(json.dumps({"summary": verdict}) + "\n")
    failed = load.failed or max(grown.values()) >= args.max_growth
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--judge-min", type=float, default=15.0)
    parser.add_argument("--every-s", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0, help="calls a second")
    parser.add_argument("--delay-s", type=float, default=0.02, help="the fake model's time")
    parser.add_argument("--delivery", default="at_least_once")
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--out", default="soak.jsonl")
    sys.exit(asyncio.run(main(parser.parse_args())))
