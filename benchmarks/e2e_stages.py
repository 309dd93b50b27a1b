"""Where each paced request's time went: the e2e bench's timings joined to the engine probe's.

The bench times every request from the SDK call to its reply (and reads the worker's own
total from the reply); the engine probe (``benchmarks/e2e/engine_probe``, on with
``e2e_bench --engine-probe``) writes, for every request the worker's engine scores, its
stages inside the engine. Joined by the request's text (hashed the same way on both
sides) and its time, each request's latency splits into:

* ``kafka``: the SDK call to its reply read, less the worker's own total (two produces,
  two fetches, the SDK);
* ``service``: the worker's total less the engine's (decoding the request, building and
  producing the reply);
* the engine probe's stages: ``tokenize``, ``wait`` (queued -> cut into a batch), ``form``
  (cut -> prepared), ``handoff``, ``behind`` (taken by the inference thread -> its own
  model time starts: the launch and the batches ahead of it on the device), ``model``,
  ``to_loop``, ``resume``.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

PROBE_DIR = Path(__file__).resolve().parent / "e2e" / "engine_probe"
ENGINE_STAGES = ("tokenize", "wait", "form", "handoff", "behind", "model", "to_loop", "resume")
STAGES = ("kafka", "service", *ENGINE_STAGES)
# a probe line belongs to a request sent at most this long before the worker took it up
# (clock reads of one host; a little slack for rounding)
_SLACK_S = 0.005


@cache
def _probe() -> ModuleType:
    """The probe's own module (its folder is no package: the worker loads it as
    sitecustomize), for the request key both sides must compute alike."""
    spec = importlib.util.spec_from_file_location("engine_probe", PROBE_DIR / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request_key(query: str, documents: Sequence[str]) -> str:
    """The key the probe gives a request of this text."""
    return str(_probe().request_key(query, documents))


def read_probe(paths: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    """The probe's lines of every worker, by request key, in time order."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_key[record["key"]].append(record)
    for records in by_key.values():
        records.sort(key=lambda r: r["t"])
    return by_key


def join(
    timeline: Sequence[Sequence[Any]], probe: dict[str, list[dict[str, Any]]]
) -> list[dict[str, float]]:
    """Each answered request of a phase with its stages (those the probe saw).

    A timeline row is (sent unix time, latency ms, worker total ms, worker queue ms,
    worker inference ms, key); the probe line taken is the one with that key whose call
    fell between the request's sending and its reply.
    """
    joined = []
    for row in timeline:
        if len(row) < 6:
            continue  # a row of a bench without keys
        sent, latency_ms, total_ms, key = row[0], row[1], row[2], row[5]
        for record in probe.get(key, ()):
            if sent - _SLACK_S <= record["t"] <= sent + latency_ms / 1000.0:
                engine_ms = sum(record[s] for s in ENGINE_STAGES)
                stages = {s: float(record[s]) for s in ENGINE_STAGES}
                stages["kafka"] = latency_ms - total_ms
                stages["service"] = total_ms - engine_ms
                stages["latency"] = latency_ms
                stages["pairs"] = float(record["pairs"])
                joined.append(stages)
                break
    return joined


def summarize(joined: list[dict[str, float]], answered: int) -> dict[str, Any]:
    """p50 and p99 of each stage, and the mean stages of the slowest 1% and 5% of requests
    (by latency): what the tail is made of."""
    if not joined:
        return {"joined": 0, "answered": answered}

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    by_latency = sorted(joined, key=lambda j: j["latency"])
    out: dict[str, Any] = {"joined": len(joined), "answered": answered}
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        out[name] = {s: pct([j[s] for j in joined], q) for s in (*STAGES, "latency", "pairs")}
    for share, name in ((0.01, "slowest_1pct"), (0.05, "slowest_5pct")):
        slow = by_latency[-max(1, round(share * len(by_latency))) :]
        out[name] = {
            s: round(statistics.fmean(j[s] for j in slow), 2) for s in (*STAGES, "latency", "pairs")
        }
    return out


def stage_lines(name: str, summary: dict[str, Any]) -> list[str]:
    """summary.txt's lines for one phase's stages."""
    if not summary.get("joined"):
        return [f"{name:12s}  stages: none joined (of {summary.get('answered')} answered)"]
    lines = [f"{name:12s}  stages, ms ({summary['joined']} of {summary['answered']} joined):"]
    header = "".join(f"{s:>9s}" for s in (*STAGES, "latency", "pairs"))
    lines.append(f"{'':14s}{'':14s}{header}")
    for row in ("p50", "p99", "slowest_5pct", "slowest_1pct"):
        values = "".join(f"{summary[row][s]:>9.2f}" for s in (*STAGES, "latency", "pairs"))
        lines.append(f"{'':14s}{row:14s}{values}")
    return lines
