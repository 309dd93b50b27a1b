"""Where an idle engine spends a lone request's time, hand-over by hand-over.

    python -m benchmarks.lone_stages [--requests 100] [--gap-ms 20] [--variants ...]

Builds the engine bench's random-weight model (default: the 0.6B shape) with the real
Qwen3 tokenizer, loads it like the service does, and sends one 8-document request at a
time, ``--gap-ms`` apart, so that every thread is asleep when a request comes. Each
hand-over point of the engine is wrapped to note the moment it is reached (a
``perf_counter`` call, well under a microsecond), and the report gives the median of
every step:

* ``pool pickup``: the request handed to the tokenizer pool, until a pool thread runs it;
* ``encode``: the encoder (tokenizing and the prompt);
* ``back on loop``: the encoder's result, until the event loop queues the pairs;
* ``former wakes``: the pairs queued, until the batch former has cut them;
* ``prepare``: the scorer's host inputs: ``pack`` (the packed stream), ``graph layout``
  (the stream in its CUDA graph's shapes) and ``pinned copies`` (page-locked, for the
  upload);
* ``inference wakes``: the batch offered, until the inference thread has taken it;
* ``launch``: queuing the device work: ``graph replay`` (the inputs' uploads, the graph,
  its output's copy) and ``logits' copy`` (the score head and the copy to the host);
* ``device``: the batch's span on the device, from CUDA events around the launch;
* ``results read``: the launch returned, until the logits are on the host;
* ``to loop``: the logits read, until the event loop hands them to the request;
* ``loop resumes``: until the caller's ``await`` returns;
* ``total``: the request handed in, until its result is back.

Variants run in the same process on the same engine, interleaved in rounds so that drift
on the host falls on all of them alike:

* ``default``: the engine as it ships;
* ``poll``: with a batch in flight and nothing else to do, the inference thread polls the
  device every 0.5 ms (``WAIT_ON_DEVICE_WHEN_QUIET`` off), as before 2026-12-04;
* ``switch``: the default with Python's GIL switch interval at 0.5 ms, not 5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.host import cpu_model, positive_int
from benchmarks.workload import (
    CONFIGS,
    build_random_model,
    default_tokenizer_dir,
    synthetic_requests,
)
from consumer.engine import handoff
from consumer.engine.api import ScoreRequest
from consumer.engine.engine import Engine
from consumer.engine.settings import EngineSettings

# (step, from the moment, to the moment): the report's rows, in the request's order
STEPS = (
    ("pool pickup", "submitted", "encode_start"),
    ("encode", "encode_start", "encode_end"),
    ("back on loop", "encode_end", "enqueued"),
    ("former wakes", "enqueued", "cut"),
    ("prepare", "cut", "prepared"),
    ("  pack", "cut", "packed"),
    ("  graph layout", "packed", "laid_out"),
    ("  pinned copies", "laid_out", "prepared"),
    ("inference wakes", "prepared", "taken"),
    ("launch", "launch_start", "launch_end"),
    ("  graph replay", "launch_start", "replayed"),
    ("  logits' copy", "replayed", "launch_end"),
    ("results read", "launch_end", "collected"),
    ("to loop", "collected", "delivered"),
    ("loop resumes", "delivered", "returned"),
    ("total", "submitted", "returned"),
)
VARIANTS = ("default", "poll", "switch")


class StageClock:
    """The moments one request reached each hand-over (the first time it did)."""

    def __init__(self) -> None:
        self.moments: dict[str, float] = {}
        self.device_events: tuple[Any, Any] | None = None  # CUDA events around the launch

    def mark(self, name: str) -> None:
        self.moments.setdefault(name, time.perf_counter())

    def steps_ms(self) -> dict[str, float]:
        out = {
            step: 1000 * (self.moments[end] - self.moments[start])
            for step, start, end in STEPS
            if start in self.moments and end in self.moments
        }
        if self.device_events is not None:
            start, end = self.device_events
            end.synchronize()
            out["device"] = start.elapsed_time(end)
        return out


def wrap(
    owner: Any, name: str, before: str | None, after: str | None, clock: Callable[[], StageClock]
) -> None:
    """Replace ``owner.name`` with a call that marks ``before`` and ``after`` on the clock."""
    inner = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if before:
            clock().mark(before)
        result = inner(*args, **kwargs)
        if after and result is not None:
            clock().mark(after)
        return result

    setattr(owner, name, timed)


def instrument(engine: Engine, clock: Callable[[], StageClock], cuda: bool) -> None:
    """Wrap the engine's hand-over points (its private parts: this is a profiler)."""
    import torch

    queue, scorer = engine._queue, engine._scorer
    wrap(engine._encoder, "encode", "encode_start", "encode_end", clock)
    wrap(queue, "enqueue", "enqueued", None, clock)
    wrap(queue, "cut", None, "cut", clock)
    wrap(scorer, "prepare", None, "prepared", clock)
    wrap(queue, "take", None, "taken", clock)
    wrap(scorer, "collect", None, "collected", clock)
    wrap(engine._requests, "deliver", "delivered", None, clock)
    packed = getattr(scorer, "_packed", None)  # the packed path's parts, when it runs
    if packed is not None:
        from consumer.runtime.qwen3 import forward

        wrap(forward, "pack", None, "packed", clock)
        if packed.graphs is not None:
            wrap(packed.graphs, "fit", None, "laid_out", clock)
            wrap(packed.graphs, "replay", None, "replayed", clock)
    launch = scorer.launch

    def timed_launch(prepared: object) -> object:
        c = clock()
        c.mark("launch_start")
        if not cuda:
            handle = launch(prepared)
            c.mark("launch_end")
            return handle
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        handle = launch(prepared)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        c.mark("launch_end")
        c.device_events = (start, end)
        return handle

    setattr(scorer, "launch", timed_launch)  # noqa: B010 (mypy: no method assignment)


def set_variant(variant: str, default_switch_s: float) -> None:
    handoff.WAIT_ON_DEVICE_WHEN_QUIET = variant != "poll"
    sys.setswitchinterval(0.0005 if variant == "switch" else default_switch_s)


async def one_request(engine: Engine, query: str, docs: list[str], clock: StageClock) -> None:
    clock.mark("submitted")
    await engine.score(ScoreRequest(query, tuple(docs)))
    clock.mark("returned")


async def run(
    args: argparse.Namespace, folder: Path, requests: list[tuple[str, list[str]]]
) -> dict[str, dict[str, float]]:
    from consumer.runtime.loader import load_model
    from consumer.runtime.options import ModelOptions

    model = await asyncio.to_thread(
        load_model, ModelOptions(model=str(folder), device=args.device, layers=args.layers)
    )
    engine = Engine(model.encoder, model.scorer, model.name, EngineSettings())
    await engine.start()
    current = StageClock()
    instrument(engine, lambda: current, model.device.startswith("cuda"))
    default_switch = sys.getswitchinterval()
    steps: dict[str, dict[str, list[float]]] = {v: {} for v in args.variants}
    for i in range(args.warm + args.requests):
        for variant in args.variants:
            set_variant(variant, default_switch)
            query, docs = requests[i % len(requests)]
            current = StageClock()
            await one_request(engine, query, docs, current)
            if i >= args.warm:
                for step, ms in current.steps_ms().items():
                    steps[variant].setdefault(step, []).append(ms)
            await asyncio.sleep(args.gap_ms / 1000)
    set_variant("default", default_switch)
    await engine.close()
    return {
        v: {step: round(statistics.median(ms), 3) for step, ms in by_step.items()}
        for v, by_step in steps.items()
    }


def hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{gpu} | {cpu_model()} ({os.cpu_count()} cores)"


def report_lines(medians: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    variants = list(medians)
    names = [step for step, _, _ in STEPS]
    at = names.index("launch")
    rows = [*names[: at + 3], "device", *names[at + 3 :]]
    lines = [
        f"hardware  {hardware()}",
        f"workload  one {args.docs}-document request at a time, {args.gap_ms:g} ms apart; "
        f"median of {args.requests} per variant; layers={args.layers}",
        f"{'step (ms, median)':<18}" + "".join(f"{v:>10}" for v in variants),
    ]
    for step in rows:
        cells = "".join(f"{medians[v].get(step, float('nan')):>10.3f}" for v in variants)
        lines.append(f"{step:<18}{cells}")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lone_stages", description=__doc__.split("\n")[0]
    )
    p.add_argument("--requests", type=positive_int, default=100, help="measured requests each")
    p.add_argument("--warm", type=int, default=10, help="unmeasured requests a variant first")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between requests")
    p.add_argument("--docs", type=positive_int, default=8, help="documents a request")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--layers", default="auto", help="the packed path's layers (auto, fp8, ...)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    p.add_argument("--config", default="0.6b", help="a config.json path, or: " + ", ".join(CONFIGS))
    p.add_argument("--tokenizer", type=Path, default=None, help="folder with the Qwen3 tokenizer")
    p.add_argument("--json", action="store_true", help="one JSON line at the end")
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    config = json.loads(CONFIGS.get(args.config, Path(args.config)).read_text())
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    requests = synthetic_requests(tokenizer_dir, 64 * args.docs, args.docs, seed=0)
    with tempfile.TemporaryDirectory(prefix="rerank-stages-") as tmp:
        await asyncio.to_thread(
            build_random_model, config, tokenizer_dir, Path(tmp), args.device, 0
        )
        return await run(args, Path(tmp), requests)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    medians = asyncio.run(main_async(args))
    print("\n".join(report_lines(medians, args)))
    if args.json:
        print(json.dumps(medians))


if __name__ == "__main__":
    main()
