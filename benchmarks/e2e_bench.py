"""The whole path on GPUs: a real Kafka broker, one worker per GPU, a load generator.

On a GPU host (no Java or network needed there; ``benchmarks/e2e/pack.sh`` packs a Java
runtime, the broker's jars, the wheels and the tokenizer into ``.e2e/`` beforehand):

    bash benchmarks/e2e/run.sh --out results/     # = python -m benchmarks.e2e_bench ...

It starts the broker with ``deploy/local/kafka``, creates the topics, saves a random-weight
model of the released shape (``--config``; it costs what the real model costs), starts
``python -m consumer`` once per GPU (``CUDA_VISIBLE_DEVICES``) in one consumer group, and
drives them through the SDK with the engine bench's synthetic requests:

* saturation: a closed loop with ``--concurrency`` requests in flight per GPU;
* lone: one request at a time;
* paced: an open loop at each of ``--fractions`` of the saturated rate, then at each of
  ``--rates`` (requests/s, all workers together: the same offered load in every run, for
  before/after comparisons), requests sent at steady intervals.

Each phase also reads the workers' ``/metrics`` before and after it: how many batches ran,
their mean pairs and mean model time. ``--workload`` names the requests' shape
(``benchmarks.workload.WORKLOADS``: ``8docs``, ``rag``, ``rag-long``). ``--worker-root``
runs the workers from another checkout (an earlier commit), with this harness, in the
same call.

The load comes from one process per GPU (``--generators``), each with its own SDK client,
so that a two-GPU run is not paced by one Python process; each phase reports the busiest
generator's CPU time over the phase's wall time. Latency is from the SDK call (produce) to
its reply read. Each phase counts answered,
error, lost (no reply in time) and duplicate replies. Then, with the workers stopped, the
engine bench runs in the same call, so ratios to it hold. Output: ``summary.txt``,
``results.json`` and ``latency_vs_load.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.e2e_stages import PROBE_DIR, join, read_probe, request_key, stage_lines, summarize
from benchmarks.host import positive_float
from benchmarks.workload import (
    CONFIGS,
    WORKLOADS,
    build_random_model,
    default_tokenizer_dir,
    workload_named,
    workload_requests,
)

ROOT = Path(__file__).resolve().parents[1]
KAFKA = ROOT / "deploy" / "local" / "kafka"
KAFKA_PORT = 29092  # away from a broker on 9092, below the ephemeral range (see conftest)
FIRST_HTTP_PORT = 9300
READY_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 30.0


@dataclass
class Phase:
    """One load phase's counts and latencies (seconds)."""

    name: str
    offered_per_s: float | None = None
    seconds: float = 0.0
    sent: int = 0
    answered: int = 0
    errors: int = 0
    lost: int = 0
    duplicates: int = 0
    latencies: list[float] = field(default_factory=list, repr=False)
    # the worker's own timing of each answered request (ms): queue, inference, total
    worker_ms: list[tuple[float, float, float]] = field(default_factory=list, repr=False)
    # (unix time sent, latency ms, worker total, queue and inference ms, request key) of
    # each answered request; the key joins it to the engine probe's stages
    timeline: list[tuple[float, float, float, float, float, str]] = field(
        default_factory=list, repr=False
    )
    # the workers' batches during the phase: count, mean pairs, mean model ms
    batches: dict[str, float] = field(default_factory=dict)
    batches_per_gpu: dict[int, dict[str, float]] = field(default_factory=dict)
    # when each reply was read (perf_counter), and for a closed loop when sending stopped
    answered_at: list[float] = field(default_factory=list, repr=False)
    sending_ended: float | None = None
    # the load generator's CPU time over the phase's wall time (1.0 = one core busy): near
    # or above 1 its own event loop, not the workers, may set the pace
    generator_cpu: float | None = None

    def summary(self, docs: int) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None

        hidden = ("latencies", "worker_ms", "timeline", "answered_at", "sending_ended")
        out = {k: v for k, v in asdict(self).items() if k not in hidden}
        out |= {
            "requests_per_s": round(self.answered / self.seconds, 1) if self.seconds else None,
            "pairs_per_s": round(self.answered * docs / self.seconds, 1) if self.seconds else None,
            "p50_ms": pct(0.5),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 1) if lat else None,
            "steady_pairs_per_s": self.steady_pairs_per_s(docs),
        }
        if self.worker_ms:
            for i, part in enumerate(("queue", "inference", "total")):
                out[f"worker_{part}_p50_ms"] = round(
                    statistics.median(t[i] for t in self.worker_ms), 2
                )
            totals = sorted(t[2] for t in self.worker_ms)
            out["worker_total_p99_ms"] = round(totals[int(0.99 * (len(totals) - 1))], 2)
        return out

    def steady_pairs_per_s(self, docs: int) -> float | None:
        """A closed loop's rate from its first reply to the end of sending: the pipeline is
        full then, without the ramp-up before the first reply and the drain after."""
        if self.sending_ended is None or not self.answered_at:
            return None
        first = min(self.answered_at)
        seconds = self.sending_ended - first
        if seconds <= 0:
            return None
        answered = sum(1 for t in self.answered_at if t <= self.sending_ended)
        return round(answered * docs / seconds, 1)


# -- set-up on the GPU host -----------------------------------------------------------------


def unpack(bundle: Path, work: Path) -> dict[str, str]:
    """Java runtime, broker jars and tokenizer from the bundle; the environment to use."""
    cache = work / "cache"
    for archive, target in (
        ("jre.tar.xz", work),
        ("kafka-libs.tar.xz", cache / "kafka-4.1.1"),
        ("tokenizer.tar.xz", work),
    ):
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle / archive) as tar:
            tar.extractall(target, filter="tar")
    env = dict(os.environ)
    env["PATH"] = f"{work / 'jre' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["RERANK_CACHE_DIR"] = str(cache)
    env["KAFKA_HEAP_OPTS"] = "-Xms1g -Xmx4g"
    return env


def kafka(command: str, env: dict[str, str]) -> None:
    subprocess.run([str(KAFKA), command], env=env, check=True, timeout=180)


async def create_topics(bootstrap: str, partitions: int) -> tuple[str, str, str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    run = uuid.uuid4().hex[:8]
    names = (f"e2e-requests-{run}", f"e2e-replies-{run}", f"e2e-dlq-{run}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        sizes = (partitions, partitions, 1)
        await admin.create_topics([NewTopic(n, k, 1) for n, k in zip(names, sizes, strict=True)])
    finally:
        await admin.close()
    await asyncio.sleep(2.0)  # leaders for every partition
    return names


def start_workers(
    args: argparse.Namespace, model: Path, bootstrap: str, names: tuple[str, str, str], out: Path
) -> list[subprocess.Popen[bytes]]:
    group = f"e2e-workers-{uuid.uuid4().hex[:8]}"
    workers = []
    for gpu in worker_gpus(args):
        command = [sys.executable, "-m", "consumer", "--model", str(model), "--device", args.device]
        command += ["--bootstrap-servers", bootstrap, "--group-id", group]
        command += ["--request-topic", names[0], "--reply-topic", names[1]]
        command += ["--dlq-topic", names[2], "--group-instance-id", f"gpu{gpu}"]
        command += ["--http-host", "127.0.0.1", "--http-port", str(FIRST_HTTP_PORT + gpu)]
        command += shlex.split(args.worker_args)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
        if args.gc_probe_ms:
            probe = str(Path(__file__).parent / "e2e" / "gc_probe")
            env["PYTHONPATH"] = os.pathsep.join([probe, env.get("PYTHONPATH", "")])
            env["RERANK_GC_PROBE_MS"] = str(args.gc_probe_ms)
        if args.engine_probe:
            env["PYTHONPATH"] = os.pathsep.join([str(PROBE_DIR), env.get("PYTHONPATH", "")])
            env["RERANK_ENGINE_PROBE"] = str(probe_path(out, gpu).resolve())
        root = args.worker_root.resolve() if args.worker_root else ROOT
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        log = (out / f"worker-gpu{gpu}.log").open("wb")
        workers.append(
            subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return workers


def probe_path(out: Path, gpu: int) -> Path:
    """Where the engine probe of the worker on ``gpu`` writes its lines."""
    return out / f"engine-probe-gpu{gpu}.jsonl"


def worker_gpus(args: argparse.Namespace) -> range:
    """The GPUs the workers run on, one each (``--first-gpu`` on)."""
    return range(args.first_gpu, args.first_gpu + args.gpus)


async def wait_ready(workers: list[subprocess.Popen[bytes]], gpus: range) -> float:
    import aiohttp

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for gpu, worker in zip(gpus, workers, strict=True):
            url = f"http://127.0.0.1:{FIRST_HTTP_PORT + gpu}/health/ready"
            while True:
                if worker.poll() is not None:
                    raise SystemExit(f"worker on GPU {gpu} exited with {worker.returncode}")
                if time.monotonic() - started > READY_TIMEOUT_S:
                    raise SystemExit(f"worker on GPU {gpu} not ready in {READY_TIMEOUT_S} s")
                try:
                    async with http.get(url) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1.0)
    return time.monotonic() - started


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> list[int | None]:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for worker in workers:
        try:
            codes.append(worker.wait(60))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(None)
    return codes


# -- the workers' batches -------------------------------------------------------------------

BATCH_SERIES = (
    "rerank_batch_pairs_sum",
    "rerank_batch_pairs_count",
    "rerank_inference_seconds_sum",
)


async def batch_totals(gpus: range) -> dict[int, dict[str, float]]:
    """Each worker's batch counters, by GPU (empty when a worker does not answer)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    by_gpu: dict[int, dict[str, float]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for gpu in gpus:
            url = f"http://127.0.0.1:{FIRST_HTTP_PORT + gpu}/metrics"
            try:
                async with http.get(url) as response:
                    text = await response.text()
            except aiohttp.ClientError:
                return {}
            totals = by_gpu[gpu] = dict.fromkeys(BATCH_SERIES, 0.0)
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in totals:
                        totals[sample.name] += sample.value
    return by_gpu


def summed(by_gpu: dict[int, dict[str, float]]) -> dict[str, float]:
    """All workers' counters added up (empty when any worker's are missing)."""
    if not by_gpu:
        return {}
    return {name: sum(totals[name] for totals in by_gpu.values()) for name in BATCH_SERIES}


def batch_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches run between two readings: count, mean pairs, mean model ms."""
    if not before or not after:
        return {}
    count = after["rerank_batch_pairs_count"] - before["rerank_batch_pairs_count"]
    if count <= 0:
        return {"count": 0}
    pairs = after["rerank_batch_pairs_sum"] - before["rerank_batch_pairs_sum"]
    seconds = after["rerank_inference_seconds_sum"] - before["rerank_inference_seconds_sum"]
    return {
        "count": count,
        "mean_pairs": round(pairs / count, 1),
        "mean_model_ms": round(1000 * seconds / count, 2),
    }


# -- load phases ------------------------------------------------------------------------


class Load:
    """Sends the synthetic requests round-robin through one SDK client."""

    def __init__(self, client: Any, requests: list[tuple[str, list[str]]], first: int = 0) -> None:
        self._client = client
        self._requests = requests
        self._next = first

    def _take(self) -> tuple[str, list[str]]:
        request = self._requests[self._next % len(self._requests)]
        self._next += 1
        return request

    async def one(self, phase: Phase) -> None:
        from producer_sdk import RerankErrorReply, RerankTimeout

        query, documents = self._take()
        key = request_key(query, documents)
        phase.sent += 1
        sent_at = time.time()
        started = time.perf_counter()
        try:
            result = await self._client.rerank(query, documents, timeout=CALL_TIMEOUT_S)
        except RerankTimeout:
            phase.lost += 1
            return
        except RerankErrorReply:
            phase.errors += 1
            return
        phase.answered_at.append(time.perf_counter())
        phase.latencies.append(phase.answered_at[-1] - started)
        phase.answered += 1
        timing = result.timing
        phase.worker_ms.append((timing.queue_ms, timing.inference_ms, timing.total_ms))
        latency_ms = round(phase.latencies[-1] * 1000, 2)
        phase.timeline.append(
            (
                round(sent_at, 4),
                latency_ms,
                round(timing.total_ms, 2),
                round(timing.queue_ms, 2),
                round(timing.inference_ms, 2),
                key,
            )
        )

    async def lone(self, name: str, count: int) -> Phase:
        phase = Phase(name)
        started = time.perf_counter()
        for _ in range(count):
            await self.one(phase)
        phase.seconds = time.perf_counter() - started
        return phase

    async def closed_loop(self, name: str, concurrency: int, seconds: float) -> Phase:
        phase = Phase(name)
        end = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < end:
                await self.one(phase)

        started = time.perf_counter()
        await self._counting(phase, asyncio.gather(*(caller() for _ in range(concurrency))))
        phase.seconds = time.perf_counter() - started
        phase.sending_ended = end
        return phase

    async def open_loop(
        self, name: str, rate: float, seconds: float, start_after_s: float = 0.0
    ) -> Phase:
        """Requests at steady intervals; ``start_after_s`` interleaves several generators."""
        phase = Phase(name, offered_per_s=round(rate, 1))
        count = max(1, int(rate * seconds))

        async def paced() -> None:
            tasks = []
            started = time.perf_counter() + start_after_s
            for i in range(count):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.one(phase)))
            await asyncio.gather(*tasks)

        started = time.perf_counter()
        await self._counting(phase, paced())
        # the offered window, not the tail of the last replies
        phase.seconds = min(time.perf_counter() - started, count / rate)
        return phase

    async def _counting(self, phase: Phase, work: Any) -> None:
        before = self._client.stats.duplicates_dropped
        cpu, wall = time.process_time(), time.perf_counter()
        await work
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        phase.generator_cpu = round(cpu / wall, 3) if wall > 0 else None
        await asyncio.sleep(1.0)  # late repeats of this phase's replies
        phase.duplicates = self._client.stats.duplicates_dropped - before


def merge_phases(parts: list[Phase]) -> Phase:
    """One phase from the same phase of several load generators, run side by side."""
    first = parts[0]
    merged = Phase(first.name, seconds=max(p.seconds for p in parts))
    rates = [p.offered_per_s for p in parts if p.offered_per_s is not None]
    merged.offered_per_s = round(sum(rates), 1) if rates else None
    for part in parts:
        merged.sent += part.sent
        merged.answered += part.answered
        merged.errors += part.errors
        merged.lost += part.lost
        merged.duplicates += part.duplicates
        merged.latencies += part.latencies
        merged.worker_ms += part.worker_ms
        merged.timeline += part.timeline
        merged.answered_at += part.answered_at  # perf_counter: one clock for the host
    merged.timeline.sort()
    ended = [p.sending_ended for p in parts if p.sending_ended is not None]
    merged.sending_ended = max(ended) if ended else None
    # the busiest generator: near one core, it may be what sets the pace
    shares = [p.generator_cpu for p in parts if p.generator_cpu is not None]
    merged.generator_cpu = max(shares) if shares else None
    return merged


def _shares(total: int, count: int) -> list[int]:
    """``total`` split over ``count`` as evenly as whole numbers go."""
    return [total // count + (i < total % count) for i in range(count)]


class SplitLoad:
    """The phases of :class:`Load` from several processes, each with its own SDK client
    (one Python process drives a few thousand requests/s at most)."""

    def __init__(self, connections: list[Any]) -> None:
        self._connections = connections

    async def _run(self, calls: list[tuple[Any, str, tuple[Any, ...]]]) -> Phase:
        for connection, method, arguments in calls:
            connection.send((method, arguments))
        parts = [Phase(**await asyncio.to_thread(c.recv)) for c, _, _ in calls]
        return merge_phases(parts)

    async def lone(self, name: str, count: int) -> Phase:
        return await self._run([(self._connections[0], "lone", (name, count))])

    async def closed_loop(self, name: str, concurrency: int, seconds: float) -> Phase:
        shares = _shares(concurrency, len(self._connections))
        return await self._run(
            [
                (c, "closed_loop", (name, n, seconds))
                for c, n in zip(self._connections, shares, strict=True)
                if n > 0
            ]
        )

    async def open_loop(self, name: str, rate: float, seconds: float) -> Phase:
        count = len(self._connections)
        return await self._run(
            [
                (c, "open_loop", (name, rate / count, seconds, i / rate))
                for i, c in enumerate(self._connections)
            ]
        )


def _generator_process(connection: Any, settings: dict[str, Any], index: int) -> None:
    """A load generator's process: runs the phases the parent sends, returns each Phase."""
    asyncio.run(_serve_phases(connection, settings, index))


async def _serve_phases(connection: Any, settings: dict[str, Any], index: int) -> None:
    # each generator starts at another place in the requests, so none repeats another's
    async with _load(settings, first=index * 7919) as load:
        connection.send("ready")
        while (call := await asyncio.to_thread(connection.recv)) is not None:
            method, arguments = call
            phase = await getattr(load, method)(*arguments)
            # plain data: this module is the parent's __main__, so its classes pickle by a
            # module name the other side may not have
            connection.send(asdict(phase))


@contextlib.asynccontextmanager
async def _load(settings: dict[str, Any], first: int = 0) -> AsyncIterator[Load]:
    """A :class:`Load` with its SDK client, the synthetic requests built."""
    from producer_sdk import RerankClient

    shape = replace(WORKLOADS[settings["workload"]], docs_per_request=settings["docs"])
    requests = workload_requests(
        Path(settings["tokenizer"]), shape, settings["pairs"], settings["seed"]
    )
    # The load generator's own full collections must not show up as service latency.
    gc.collect()
    gc.freeze()
    client = RerankClient(
        settings["bootstrap"], request_topic=settings["requests"], reply_topic=settings["replies"]
    )
    async with client:
        yield Load(client, requests, first)


@contextlib.asynccontextmanager
async def load_generators(settings: dict[str, Any], count: int) -> AsyncIterator[Load | SplitLoad]:
    """One load generator in this process, or ``count`` in processes of their own."""
    if count <= 1:
        async with _load(settings) as load:
            yield load
        return
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(count)]
    processes = [
        context.Process(target=_generator_process, args=(child, settings, i), daemon=True)
        for i, (_, child) in enumerate(pipes)
    ]
    for process in processes:
        process.start()
    connections = [parent for parent, _ in pipes]
    try:
        for connection in connections:
            if await asyncio.to_thread(connection.recv) != "ready":
                raise RuntimeError("a load generator did not start")
        yield SplitLoad(connections)
    finally:
        for connection, process in zip(connections, processes, strict=True):
            with contextlib.suppress(OSError):
                connection.send(None)
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()


async def drive(
    args: argparse.Namespace, bootstrap: str, names: tuple[str, str, str], phases: list[Phase]
) -> None:
    """Run the phases, appending each to ``phases`` as it ends."""
    settings = {
        "tokenizer": str(args.tokenizer),
        "pairs": args.pairs,
        "docs": args.docs,
        "workload": args.workload.name,
        "seed": args.seed,
        "bootstrap": bootstrap,
        "requests": names[0],
        "replies": names[1],
    }
    generators = args.generators or args.gpus

    async def run(phase: Any) -> Phase:
        before = await batch_totals(worker_gpus(args))
        done: Phase = await phase
        after = await batch_totals(worker_gpus(args))
        done.batches = batch_summary(summed(before), summed(after))
        if len(after) > 1:  # one slow GPU shows here, not in the sum
            done.batches_per_gpu = {
                gpu: batch_summary(before.get(gpu, {}), totals) for gpu, totals in after.items()
            }
        phases.append(done)
        _say(done, args.docs)
        return done

    async with load_generators(settings, generators) as load:
        in_flight = args.concurrency * args.gpus
        await load.closed_loop("warm-up", in_flight, args.warm_s)
        saturated = await run(load.closed_loop("saturated", in_flight, args.phase_s))
        await run(load.lone("lone", args.lone))
        rate = saturated.answered / saturated.seconds
        steady = saturated.steady_pairs_per_s(args.docs)
        if args.fraction_of == "steady" and steady:
            rate = steady / args.docs
        paced = [(f"paced {f:.0%}", rate * f) for f in args.fractions]
        paced += [(f"paced {r:g}/s", r) for r in args.rates]
        for name, offered in paced:
            name += f" #{sum(p.name.startswith(name + ' #') for p in phases) + 1}"
            await run(load.open_loop(name, offered, args.phase_s))


def _say(phase: Phase, docs: int) -> None:
    s = phase.summary(docs)
    offered = f" offered {s['offered_per_s']}/s" if s["offered_per_s"] else ""
    steady = f" (steady {s['steady_pairs_per_s']})" if s["steady_pairs_per_s"] else ""
    print(
        f"{phase.name:12s}{offered} {s['answered']}/{s['sent']} answered, {s['pairs_per_s']} "
        f"pairs/s{steady}, p50 {s['p50_ms']} ms p95 {s['p95_ms']} ms p99 {s['p99_ms']} ms, "
        f"errors {s['errors']} lost {s['lost']} duplicates {s['duplicates']}; worker p50 "
        f"queue {s.get('worker_queue_p50_ms')} inference {s.get('worker_inference_p50_ms')} "
        f"total {s.get('worker_total_p50_ms')} ms",
        flush=True,
    )


# -- the engine bench, the plot -------------------------------------------------------------


def engine_bench(args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    command = [sys.executable, "-m", "benchmarks.engine_bench", "--config", args.config]
    command += ["--tokenizer", str(args.tokenizer), "--pairs", str(args.engine_pairs)]
    command += ["--workload", args.workload.name, "--docs-per-request", str(args.docs)]
    command += ["--skip-reference"]
    command += ["--json", "--device", args.device]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(args.first_gpu))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    (out / "engine_bench.txt").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if done.returncode == 0 and lines else None


def plot(phases: list[dict[str, Any]], title: str, path: Path) -> None:
    """Latency percentiles against the load answered; skipped without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(
        (p for p in phases if p["pairs_per_s"] and p["name"] != "lone"),
        key=lambda p: p["pairs_per_s"],
    )
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        axes.plot([p["pairs_per_s"] for p in points], [p[key] for p in points], "o-", label=key[:3])
    axes.set_xlabel("pairs/s answered through Kafka")
    axes.set_ylabel("latency, produce to reply read (ms)")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# -- main -----------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> None:
    # SIGTERM (a `timeout` around the run) cancels the run, so the finally below stops the
    # workers and the broker: a broker left running makes the next run's start fail.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    env = unpack(args.bundle, work) if args.bundle else dict(os.environ)
    if args.tokenizer is None:
        args.tokenizer = work / "tokenizer" if args.bundle else default_tokenizer_dir()
    env["KAFKA_PORT"] = str(args.kafka_port)
    for name in ("KAFKA_CONTROLLER_PORT", "KAFKA_STATE_DIR"):  # follow from the port
        env.pop(name, None)
    bootstrap = f"127.0.0.1:{args.kafka_port}"
    kafka("start", env)
    workers: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"command": " ".join(sys.argv), "settings": _settings(args)}
    phases: list[Phase] = []
    cancelled = False
    try:
        names = await create_topics(bootstrap, args.partitions)
        model = work / "model"
        config = json.loads(Path(CONFIGS.get(args.config, args.config)).read_text())
        build_random_model(config, args.tokenizer, model, args.device, args.seed)
        workers = start_workers(args, model, bootstrap, names, out)
        report["workers_ready_s"] = round(await wait_ready(workers, worker_gpus(args)), 1)
        print(f"{args.gpus} worker(s) ready after {report['workers_ready_s']} s", flush=True)
        await drive(args, bootstrap, names, phases)
    except asyncio.CancelledError:
        cancelled = True
    finally:
        report["worker_exit_codes"] = stop_workers(workers)
        kafka("stop", env)
    report["phases"] = [p.summary(args.docs) for p in phases]
    report["timelines"] = {p.name: p.timeline for p in phases if p.name != "saturated"}
    if args.engine_probe:
        report["stages"] = phase_stages(phases, [probe_path(out, g) for g in worker_gpus(args)])
    run_engine_bench = args.engine_pairs and not cancelled
    report["engine_bench"] = engine_bench(args, out) if run_engine_bench else None
    report["hardware"] = _hardware(args.device)
    _write(report, args, out)
    if cancelled:
        raise SystemExit("stopped by SIGTERM: the summary has the phases that ended before it")


def phase_stages(phases: list[Phase], probe_files: list[Path]) -> dict[str, Any]:
    """Each phase's requests split into their stages (the engine probe's lines joined)."""
    probe = read_probe(probe_files)
    return {
        p.name: summarize(join(p.timeline, probe), p.answered)
        for p in phases
        if p.name != "saturated"
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys: tuple[str, ...] = ("gpus", "first_gpu", "device", "config", "partitions", "docs")
    keys += ("workload_name",)
    keys += ("concurrency", "generators", "phase_s", "fractions", "fraction_of", "rates", "lone")
    keys += ("engine_probe",)
    keys += ("worker_args", "worker_root")
    return {k: str(v) if isinstance(v := getattr(args, k), Path) else v for k in keys}


def _hardware(device: str) -> dict[str, Any]:
    import torch

    from benchmarks.engine_bench import hardware

    info = hardware(device)
    info["gpus_visible"] = torch.cuda.device_count()
    info["topology"] = _gpu_topology()
    return info


def _gpu_topology() -> str | None:
    """``nvidia-smi topo -m``: how the GPUs connect to each other and which CPU cores and
    NUMA node each is near (two workers may land on cores far from their GPU)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _write(report: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=1))
    hw = report["hardware"]
    lines = [
        f"hardware: {args.gpus} x {hw.get('gpu')} ({hw.get('gpus_visible')} visible), "
        f"{hw['cpu_cores']} CPU cores ({hw['cpu']}), torch {hw['torch']}, "
        f"transformers {hw['transformers']}, Python {hw['python']}",
        f"settings: {json.dumps(report['settings'])}",
        "phase         offered/s  answered/sent  pairs/s    p50 ms   p95 ms   p99 ms   "
        "errors lost dup  worker p50 ms (queue/inference/total)  batches (count, mean pairs, "
        "mean model ms)",
    ]
    for p in report.get("phases", []):
        worker = "/".join(
            str(p.get(f"worker_{part}_p50_ms")) for part in ("queue", "inference", "total")
        )
        lines.append(
            f"{p['name']:12s}  {p['offered_per_s'] or '':>9}  {p['answered']:>6}/{p['sent']:<6}"
            f"  {p['pairs_per_s'] or 0:>8}  "
            + "  ".join(_ms(p[f"{q}_ms"]) for q in ("p50", "p95", "p99"))
            + f"  {p['errors']:>6} {p['lost']:>4} {p['duplicates']:>3}  {worker}"
            f"  {_batches(p.get('batches') or {})}"
        )
        for gpu, batches in (p.get("batches_per_gpu") or {}).items():
            lines.append(f"{'':14s}GPU {gpu}: batches {_batches(batches)}")
        if p.get("steady_pairs_per_s"):
            lines.append(
                f"{'':14s}steady, first reply to end of sending: {p['steady_pairs_per_s']} pairs/s"
            )
        if p.get("generator_cpu") is not None:
            lines.append(
                f"{'':14s}load generator CPU (the busiest): {p['generator_cpu']} of one core"
            )
    engine = report.get("engine_bench")
    if engine:
        lines.append(
            f"engine bench (same call, GPU {args.first_gpu}, workers stopped): "
            f"{engine['engine']['load']['pairs_per_s']} pairs/s"
        )
    for name, stages in (report.get("stages") or {}).items():
        lines += stage_lines(name, stages)
    lines.append(f"worker exit codes after SIGTERM: {report['worker_exit_codes']}")
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    if hw.get("topology"):
        (out / "gpu_topology.txt").write_text(hw["topology"])
    print(text)
    if report.get("phases"):
        title = f"{args.gpus} x {hw.get('gpu')}, {args.config}, through Kafka"
        plot(report["phases"], title, out / "latency_vs_load.png")


def _ms(value: float | None) -> str:
    """A latency column; '-' when nothing was answered."""
    return f"{'-' if value is None else value:>7}"


def _batches(batches: dict[str, float]) -> str:
    if not batches.get("count"):
        return "-"
    return f"{batches['count']:.0f}, {batches['mean_pairs']}, {batches['mean_model_ms']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the results")
    p.add_argument("--bundle", type=Path, help="what benchmarks/e2e/pack.sh made (.e2e)")
    p.add_argument("--work", default="/tmp/rerank-e2e", help="scratch folder")
    p.add_argument("--tokenizer", type=Path, help="default: the bundle's")
    p.add_argument("--gpus", type=int, default=0, help="workers, one per GPU (0: every GPU)")
    p.add_argument(
        "--first-gpu",
        type=int,
        default=0,
        help="the first worker's GPU; with --kafka-port and --work, two runs can share a host",
    )
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the harness out")
    p.add_argument("--config", default="0.6b", help="0.6b, tiny or a config.json")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument(
        "--kafka-port",
        type=int,
        default=KAFKA_PORT,
        help="the broker it starts; its controller takes the next port, so two runs side by "
        "side need ports at least 2 apart",
    )
    p.add_argument(
        "--workload",
        type=workload_named,
        default=WORKLOADS["8docs"],
        help="the requests' shape: " + ", ".join(WORKLOADS),
    )
    p.add_argument(
        "--docs", type=int, default=None, help="documents per request (default: the workload's)"
    )
    p.add_argument("--pairs", type=int, default=32768, help="distinct pairs to cycle through")
    p.add_argument("--concurrency", type=int, default=128, help="requests in flight per GPU")
    p.add_argument(
        "--generators",
        type=int,
        default=0,
        help="load-generating processes, each with its own SDK client (0: one per GPU; "
        "1: in this process)",
    )
    p.add_argument("--warm-s", type=float, default=10.0)
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--lone", type=int, default=100)
    p.add_argument("--fractions", type=float, nargs="*", default=[0.5, 0.8])
    p.add_argument(
        "--fraction-of",
        choices=("whole", "steady"),
        default="whole",
        help="the saturated rate --fractions are of: the whole phase's (with its ramp-up and "
        "drain) or its steady rate (first reply to the end of sending)",
    )
    p.add_argument(
        "--rates",
        type=positive_float,
        nargs="*",
        default=[],
        help="paced phases at these requests/s",
    )
    p.add_argument(
        "--engine-pairs", type=int, default=16384, help="pairs of the engine bench (0: skip it)"
    )
    p.add_argument("--worker-args", default="", help='more worker flags: "--flag value ..."')
    p.add_argument(
        "--worker-root", type=Path, help="run the workers from this checkout (default: this one)"
    )
    p.add_argument(
        "--gc-probe-ms", type=float, default=0, help="log worker GC pauses over this (0: off)"
    )
    p.add_argument(
        "--engine-probe",
        action="store_true",
        help="have the workers write each request's stages in the engine "
        "(benchmarks/e2e/engine_probe); the summary splits each phase's latency by them",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.generators < 0:
        p.error("--generators must be 0 (one per GPU) or more")
    if args.engine_probe and args.gc_probe_ms:
        p.error("--engine-probe and --gc-probe-ms each load a sitecustomize: pick one")
    if args.docs is None:
        args.docs = args.workload.docs_per_request
    args.workload_name = args.workload.name
    if args.gpus <= 0:
        import torch

        args.gpus = torch.cuda.device_count() - args.first_gpu
        if args.gpus == 0:
            p.error("no GPU visible: pass --gpus N (with --device cpu to try the harness out)")
    return args


def main() -> None:
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    main()
