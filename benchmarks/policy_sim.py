"""The batching policy against a simulated device, on the CPU: late cut on and off.

    python -m benchmarks.policy_sim [--scale 5] [--fractions 0.5 0.8 0.9] [--seconds 20]

The engine is the real one (tokenizer threads, batcher, batch former, inference thread);
the scorer is a pipelined fake whose device runs one batch after another, each taking
``fixed + per_request`` (defaults: the 0.6B model on an H100 with 8-document requests,
1.5 ms + 4.6 ms a request, times ``--scale`` so that a busy CPU's thread wake-ups stay
small beside them). Quick batches hold at most three requests, as 8,192-token CUDA graphs
do. Requests come at steady intervals at ``--fractions`` of the device's saturated rate
(1 / per_request); latency is from ``score()`` to its return. It says what the policy does
to the queueing, not what a GPU does: GPU numbers come from ``benchmarks/e2e/run.sh``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from consumer.engine.api import ScoreRequest
from consumer.engine.engine import Engine
from consumer.engine.settings import EngineSettings
from consumer.runtime.prompt import EncodedPair, PromptEncoder
from consumer.runtime.scorer import ScorerBase, ScorerTraits

DOCS = 8
TOKENS = 100  # per pair: a request costs 800, three fit the quick size


class Encoder:
    """One pair per document, ``TOKENS`` tokens each."""

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        return [EncodedPair(f"{query}|{d}", TOKENS, False) for d in documents]


class SimulatedDevice(ScorerBase):
    """Runs each batch ``fixed_s + per_pair_s`` per pair after the ones queued before it."""

    def __init__(self, fixed_s: float, per_pair_s: float) -> None:
        self.fixed_s, self.per_pair_s = fixed_s, per_pair_s
        self.free_at = 0.0
        self.busy_s = 0.0
        self.batches: list[int] = []
        self.traits = ScorerTraits("sim", "cpu", "float32", packed=True, pipelined=True)

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        return sum(p.tokens for p in pairs)

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        return list(pairs)

    def launch(self, prepared: object) -> object:
        assert isinstance(prepared, list)
        now = time.perf_counter()
        seconds = self.fixed_s + self.per_pair_s * len(prepared)
        self.free_at = max(now, self.free_at) + seconds
        self.busy_s += seconds
        self.batches.append(len(prepared))
        finished = threading.Event()
        threading.Timer(self.free_at - now, finished.set).start()
        return finished, len(prepared)

    def done(self, handle: object) -> bool:
        assert isinstance(handle, tuple)
        return bool(handle[0].is_set())

    def collect(self, handle: object) -> list[float]:
        assert isinstance(handle, tuple)
        handle[0].wait()
        return [0.0] * handle[1]

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        return list(logits)

    def warmup(self, encoder: PromptEncoder) -> None:
        self.traits = ScorerTraits(
            "sim", "cpu", "float32", packed=True, pipelined=True, quick_batch_cost=3 * DOCS * TOKENS
        )


async def paced(engine: Engine, rate: float, seconds: float) -> list[float]:
    """Requests at steady intervals; each one's latency (s)."""
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        await engine.score(ScoreRequest(f"q{i}", tuple(f"d{j}" for j in range(DOCS))))
        latencies.append(time.perf_counter() - started)

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latencies


async def run(late_cut: bool, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    device = SimulatedDevice(args.fixed_ms * args.scale / 1000, args.request_ms * args.scale / 8000)
    settings = EngineSettings(late_cut=late_cut, max_wait_ms=0)
    engine = Engine(Encoder(), device, "sim", settings)
    await engine.start()
    saturated = 1000 / (args.request_ms * args.scale)  # requests/s of big batches
    await paced(engine, saturated * fraction, 2.0)  # the clock learns the pace
    busy, batches, wall = device.busy_s, len(device.batches), time.perf_counter()
    latencies = sorted(await paced(engine, saturated * fraction, args.seconds))
    wall = time.perf_counter() - wall
    sizes = device.batches[batches:]
    await engine.close()
    return {
        "late_cut": late_cut,
        "fraction": fraction,
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[int(0.99 * len(latencies))], 1),
        "mean_requests_a_batch": round(statistics.fmean(sizes) / DOCS, 2),
        "device_busy": round((device.busy_s - busy) / wall, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fixed-ms", type=float, default=1.5, help="a batch's fixed device time")
    p.add_argument("--request-ms", type=float, default=4.6, help="device time per request")
    p.add_argument("--scale", type=float, default=5.0, help="all device times times this")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    for fraction in args.fractions:
        for late_cut in (False, True):
            print(json.dumps(asyncio.run(run(late_cut, fraction, args))), flush=True)


if __name__ == "__main__":
    main()
