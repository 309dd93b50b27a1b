"""The end-to-end GPU benchmark's harness stays runnable: a short run on the CPU.

It starts its own broker (with this machine's Java and the cached jars, as no bundle is
given), a worker with the tiny random-weight model on the CPU, and every load phase.
Its numbers are not checked: only that each phase answered every request once, that the
workers' batches were read around each phase, and that the summary names the hardware.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


def free_port_pair() -> int:
    """A port whose next one is free too (the broker's, then its controller's), chosen
    now: a fixed one was once taken by a connection's own end on a busy CI machine."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two free ports in a row")


def run_bench(tmp_path: Path, *phases: str) -> None:
    """benchmarks.e2e_bench on the CPU with the tiny model, short phases, out in tmp_path/out."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e_bench", "--out", str(tmp_path / "out"),
         "--work", str(tmp_path / "work"), "--device", "cpu", "--gpus", "1",
         "--config", "tiny", "--kafka-port", str(free_port_pair()), "--phase-s", "2",
         "--warm-s", "1", "--pairs", "256", *phases],
        cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("generators", [1, 2], ids=["one-generator", "two-generator-processes"])
def test_e2e_bench_runs_every_phase_on_the_cpu(tmp_path: Path, generators: int) -> None:
    out = tmp_path / "out"
    run_bench(tmp_path, "--lone", "3", "--concurrency", "4", "--engine-pairs", "128",
              "--rates", "5", "--generators", str(generators))  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in report["phases"]] == [
        "saturated",
        "lone",
        "paced 50% #1",
        "paced 80% #1",
        "paced 5/s #1",
    ]
    for phase in report["phases"]:
        assert phase["answered"] == phase["sent"] > 0, phase
        # the worker's own batch counters, read around the phase
        assert phase["batches"]["count"] >= 1, phase
        assert phase["batches"]["mean_pairs"] >= 1, phase
        assert (phase["errors"], phase["lost"], phase["duplicates"]) == (0, 0, 0), phase
        if phase["name"] != "lone":  # the load generator's own CPU share while it sent
            assert 0 <= phase["generator_cpu"] < 4, phase
    # a few requests a second cost a generator next to nothing; the closed loop does not
    assert report["phases"][0]["generator_cpu"] > 0
    assert report["worker_exit_codes"] == [0]
    assert report["engine_bench"]["engine"]["load"]["pairs_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert "CPU cores" in summary and "load generator CPU (the busiest):" in summary
    assert report["settings"]["generators"] == generators
    paced = next(p for p in report["phases"] if p["name"] == "paced 5/s #1")
    assert paced["offered_per_s"] == 5.0  # split over the generators, summed back


def test_e2e_bench_takes_the_rag_workload_by_name(tmp_path: Path) -> None:
    """``--workload rag``: requests of 64 candidates through the broker and the worker."""
    out = tmp_path / "out"
    run_bench(tmp_path, "--lone", "2", "--concurrency", "2", "--engine-pairs", "0",
              "--fractions", "0.5", "--generators", "1", "--workload", "rag")  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["workload_name"] == "rag" and report["settings"]["docs"] == 64
    for phase in report["phases"]:
        assert phase["answered"] == phase["sent"] > 0, phase
        assert (phase["errors"], phase["lost"], phase["duplicates"]) == (0, 0, 0), phase
