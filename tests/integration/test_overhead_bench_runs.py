"""The service-overhead benchmark stays runnable: a short run against the real broker.

Its numbers are measurements and are not checked here; only that it runs to the end,
every request gets its reply, and it says on which hardware it ran.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


def test_overhead_bench_answers_every_request_and_names_the_hardware(kafka_bootstrap: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead_bench", "--bootstrap", kafka_bootstrap,
         "--requests", "200", "--partitions", "1", "--paced-rate", "400"],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "usable CPU cores" in run.stdout
    assert re.search(r"burst\s+200/200 replies\s+[\d,]+ requests/s", run.stdout), run.stdout
    assert re.search(r"paced\s+(\d+)/\1 replies", run.stdout), run.stdout


def test_gateway_bench_compares_both_ways_and_names_the_hardware(kafka_bootstrap: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gateway_bench", "--bootstrap", kafka_bootstrap,
         "--calls", "10", "--loop-calls", "40", "--concurrency", "4", "--rounds", "1",
         "--partitions", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "usable CPU cores" in run.stdout
    for way in ("sdk", "gateway"):
        assert re.search(rf"round 1 {way}\s+lone p50\s+[\d.]+ ms", run.stdout), run.stdout
    assert re.search(r"the gateway adds -?[\d.]+ ms", run.stdout), run.stdout


def test_kafka_hop_bench_times_every_client_pairing(kafka_bootstrap: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.kafka_hop", "--bootstrap", kafka_bootstrap,
         "--hops", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\d+ cores \(.+\), Python", run.stdout), run.stdout
    pairings = ("aiokafka", "librdkafka")
    for sender in pairings:
        for reader in pairings:
            assert re.search(rf"{sender} -> {reader} .*message read [\d.]+", run.stdout)
    assert re.search(r"aiokafka -> aiokafka .*fetch response read [\d.]+", run.stdout)


def test_window_fairness_bench_reports_every_variant(kafka_bootstrap: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.window_fairness", "--bootstrap", kafka_bootstrap,
         "--seconds", "1", "--warm-s", "0.5", "--clients", "8", "--partitions", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\d+ cores, Python", run.stdout), run.stdout
    for variant in ("fixed", "window", "window, backlog", "window, oldest first"):
        row = rf"^{re.escape(variant)}\s+[\d.]+(\s+\d+){{4}}\s+\d+$"
        assert re.search(row, run.stdout, re.MULTILINE), run.stdout
