"""What the host-side torch calls of a lone request cost on this machine (needs CUDA).

    python -m benchmarks.host_ops [--repeat 300]

Median microseconds of one call each, on the calling thread, with nothing else running:
the calls :mod:`benchmarks.lone_stages` finds between a request's tokens and its batch
on the device (pinning, small CPU tensor ops, uploads, a graph replay, events).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from benchmarks.host import cpu_model, positive_int


def median_us(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return round(statistics.median(times) * 1e6, 1)


def rows(repeat: int) -> list[tuple[str, float]]:
    ids = torch.arange(3072, dtype=torch.int64)
    small = torch.arange(9, dtype=torch.int32)
    pinned_ids = ids.pin_memory()
    view, source = pinned_ids.numpy(), ids.numpy()
    on_device = torch.empty(3072, dtype=torch.int64, device="cuda")
    x = torch.zeros(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        x.add_(1)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("pin_memory(), 3,072 int64", ids.pin_memory),
        ("pin_memory(), 9 int32", small.pin_memory),
        ("torch.empty(8, pin_memory=True)", lambda: torch.empty(8, pin_memory=True)),
        ("torch.cat of two 9-element tensors", lambda: torch.cat((small, small))),
        ("torch.full(100, 0)", lambda: torch.full((100,), 0)),
        ("numpy: 3,072 int64 into a pinned view", lambda: np.copyto(view, source)),
        ("upload 3,072 int64 from pinned (copy_, non_blocking)",
         lambda: on_device.copy_(pinned_ids, non_blocking=True)),
        ("upload 3,072 int64 from pageable (copy_)",
         lambda: on_device.copy_(ids, non_blocking=True)),
        ("replay a one-kernel CUDA graph", graph.replay),
        ("torch.cuda.Event() and record()", lambda: torch.cuda.Event().record()),
        ("add on the device (one kernel launch)", lambda: x.add_(1)),
    ]  # fmt: skip
    return [(name, median_us(call, repeat)) for name, call in calls]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.host_ops", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repeat", type=positive_int, default=300)
    args = p.parse_args(argv)
    print(f"hardware  {torch.cuda.get_device_name()} | {cpu_model()} ({os.cpu_count()} cores)")
    print(f"software  torch {torch.__version__}; median of {args.repeat} calls, microseconds")
    for name, us in rows(args.repeat):
        print(f"  {name:<55}{us:>10.1f}")


if __name__ == "__main__":
    main()
