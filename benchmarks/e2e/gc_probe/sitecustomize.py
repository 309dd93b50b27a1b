"""A diagnostic, loaded only when this folder is on PYTHONPATH (e2e_bench --gc-probe-ms):
prints every garbage collection that takes longer than RERANK_GC_PROBE_MS to stderr, so a
worker's log shows whether GC pauses line up with latency spikes."""

import gc
import os
import sys
import time

_THRESHOLD_S = float(os.environ.get("RERANK_GC_PROBE_MS", "0") or 0) / 1000
_started: dict[str, float] = {}


def _probe(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started["t"] = time.perf_counter()
        return
    took = time.perf_counter() - _started.get("t", time.perf_counter())
    if took >= _THRESHOLD_S:
        print(
            f"gc-probe {time.time():.3f} generation {info.get('generation')} took "
            f"{took * 1000:.1f} ms, collected {info.get('collected')}",
            file=sys.stderr,
            flush=True,
        )


if _THRESHOLD_S > 0:
    gc.callbacks.append(_probe)
