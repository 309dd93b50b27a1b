"""Latency against offered load, two variants side by side, from e2e bench runs.

    python -m benchmarks.e2e_compare --variant before DIR DIR ... --variant after DIR ... \\
        --out compare.png

Each DIR is an ``--out`` folder of :mod:`benchmarks.e2e_bench` (its ``results.json``). The
paced phases are drawn by offered pairs/s, every run a line, so run-to-run spread shows;
the table printed beside it gives p50/p99 and the workers' mean batch per phase and run.
Compare only runs of the same card and, ideally, the same call.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple")


def paced_phases(run: Path) -> list[dict[str, Any]]:
    """The paced phases of one run, by offered load; each with ``offered_pairs_per_s`` and
    ``share`` (of the run's steady saturated rate, None without one)."""
    report = json.loads((run / "results.json").read_text())
    phases = [p for p in report["phases"] if p["offered_per_s"]]
    docs = report["settings"]["docs"]
    saturated: dict[str, Any] = next((p for p in report["phases"] if p["name"] == "saturated"), {})
    steady = saturated.get("steady_pairs_per_s")
    for phase in phases:
        phase["offered_pairs_per_s"] = phase["offered_per_s"] * docs
        phase["share"] = phase["offered_pairs_per_s"] / steady if steady else None
    return sorted(phases, key=lambda p: p["offered_pairs_per_s"])


def table(variants: dict[str, list[Path]]) -> str:
    header = "variant                run      offered pairs/s  p50 ms  p99 ms"
    lines = [header + "  batches: mean pairs, mean ms  p95 ms  of steady  errors/lost/dup"]
    for name, runs in variants.items():
        for run in runs:
            for p in paced_phases(run):
                batches = p.get("batches") or {}
                share = f"{100 * p['share']:.0f}%" if p["share"] else "-"
                lines.append(
                    f"{name:22s} {run.name:8s} {p['offered_pairs_per_s']:>15.0f}"
                    f"  {p['p50_ms']:>6}  {p['p99_ms']:>6}  "
                    f"{batches.get('mean_pairs', '-')}, {batches.get('mean_model_ms', '-')}"
                    f"  {p['p95_ms']:>6}  {share:>9}  "
                    f"{p['errors']}/{p['lost']}/{p['duplicates']}"
                )
    return "\n".join(lines)


def plot(
    variants: dict[str, list[Path]],
    title: str,
    path: Path,
    percentiles: tuple[str, ...] = ("p50", "p99"),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(f"{q}_ms" for q in percentiles)
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), sharey=True)
    for (name, runs), colour in zip(variants.items(), COLOURS, strict=False):
        for i, run in enumerate(runs):
            phases = paced_phases(run)
            x = [p["offered_pairs_per_s"] for p in phases]
            label = name if i == 0 else None
            for ax, key in zip(axes, keys, strict=True):
                ax.plot(x, [p[key] for p in phases], "o-", color=colour, alpha=0.7, label=label)
    for ax, key in zip(axes, percentiles, strict=True):
        ax.set_title(f"{key}, produce to reply read")
        ax.set_xlabel("offered load (pairs/s)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("ms")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--variant", nargs="+", action="append", required=True, metavar="NAME DIR",
        help="a name, then the run folders of that variant",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default="latency against offered load")
    p.add_argument(
        "--percentiles", nargs="+", default=["p50", "p99"], choices=["p50", "p95", "p99"]
    )
    args = p.parse_args()
    variants = {v[0]: [Path(d) for d in v[1:]] for v in args.variant}
    for runs in variants.values():
        for run in runs:
            if not (run / "results.json").is_file():
                p.error(f"{run} has no results.json (an --out folder of benchmarks.e2e_bench)")
    print(table(variants))
    plot(variants, args.title, args.out, tuple(args.percentiles))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
