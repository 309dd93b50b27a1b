"""The GPU benchmark and parity scripts stay runnable: CPU smoke runs on a tiny model.

Their numbers are measurements for a GPU and are not checked here; only that each runs to
the end and reports what it promises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks import engine_bench, gpu_check
from benchmarks.workload import default_tokenizer_dir


def test_engine_bench_reports_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    engine_bench.main(
        ["--config", "tiny", "--device", "cpu", "--pairs", "32", "--reference-pairs", "16",
         "--idle-requests", "3", "--warm-pairs", "8", "--json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    load, idle = report["engine"]["load"], report["engine"]["idle"]
    assert load["pairs"] == 32 and load["pairs_per_s"] > 0
    assert idle["requests"] == 3
    assert {"p50_tokenize_ms", "p50_queue_ms", "p50_inference_ms"} <= set(idle)
    assert report["reference"]["pairs"] == 16 and report["speedup"] > 0
    strong = report["strong_reference"]
    assert strong["pairs"] == 16 and strong["compiled"] is False  # CPU: no compile
    assert report["speedup_strong"] > 0
    assert load["device_busy_share"] is None  # CUDA events only on a GPU
    assert "idle engine" in out and "engine / strong reference" in out


def test_lone_stages_times_the_hand_overs_of_every_variant(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import lone_stages
    from consumer.engine import handoff

    lone_stages.main(
        ["--config", "tiny", "--device", "cpu", "--requests", "3", "--warm", "1",
         "--gap-ms", "1", "--json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    medians = json.loads(out.strip().splitlines()[-1])
    assert set(medians) == set(lone_stages.VARIANTS)
    for steps in medians.values():
        # the CPU path has no packing, graphs or device events; every other step is timed
        for step in ("pool pickup", "encode", "back on loop", "former wakes", "prepare",
                     "inference wakes", "launch", "to loop", "loop resumes"):  # fmt: skip
            assert 0 <= steps[step] <= steps["total"], (step, steps)
    assert "step (ms, median)" in out and "no GPU" in out
    assert handoff.WAIT_ON_DEVICE_WHEN_QUIET  # the variants leave the default behind


def test_gpu_check_passes_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """Without CUDA it runs the padded path in float32 against the model card."""
    assert gpu_check.main(["gpu_check", str(default_tokenizer_dir()), "24", "--tiny"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    verdict = lines[-1]
    assert verdict["ok"] is True and verdict["launched_ahead_ok"] is True


def test_e2e_compare_tabulates_the_paced_phases_of_committed_runs() -> None:
    """The before/after table of docs/benchmarks.md comes from these raw runs."""
    from pathlib import Path

    from benchmarks import e2e_compare

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    runs = results / "2026-12-04-e2e-quick-batches" / "call3"
    text = e2e_compare.table({"after": [runs / "after5"], "before": [runs / "before5"]})
    rows = text.splitlines()[1:]
    assert len(rows) == 6  # three paced phases a run, saturated and lone left out
    assert [row.split()[2] for row in rows[:3]] == ["816", "1304", "1464"]
    assert rows[0].startswith("after") and rows[3].startswith("before")


def test_lone_path_times_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import lone_path

    lone_path.main(["--requests", "3"])
    out = capsys.readouterr().out
    parts = [
        f"{row} ({backend})"
        for row in ("encode", "encode via pool", "pool rate, k tokens/s")
        for backend in ("huggingface", "tiktoken")
    ]
    parts += ["split over 4 threads (huggingface)", "pack + graph layout", "pack 216 pairs"]
    for part in parts:
        assert f"  {part} " in out
    assert "cores, TOKENIZERS_PARALLELISM=" in out


def test_the_bench_counts_causal_attention_and_shared_heads_once() -> None:
    from benchmarks.engine_bench import BatchLog, ModelShape, packed_work
    from consumer.runtime.prompt import EncodedPair

    shape = ModelShape(layers=2, heads=4, head_dim=8, non_embedding_params=1000)
    attention = 4 * 2 * 4 * 8  # FLOPs per attended (query, key) pair
    head = [1, 2, 3]
    pairs = [
        EncodedPair([*head, 10, 11], 5, False, shared_prefix=3),
        EncodedPair([*head, 20], 4, False, shared_prefix=3),
    ]
    log = BatchLog(batches=[pairs])
    anchor = 2000 * 9 + attention * (5 * 5 + 4 * 4)
    # the head (3 tokens) once, then the tails: 3 + 2 + 1 tokens; the head attends
    # causally within itself (6 pairs), each tail sees the head and itself causally
    needed = 2000 * 6 + attention * (6 + (2 * 3 + 3) + (1 * 3 + 1))
    padded = 2000 * 10 + attention * 2 * (5 * 6 // 2)
    works = [packed_work(pairs)]
    assert log.flops(shape, True, works) == {
        "anchor": anchor, "needed": needed, "executed": needed
    }  # fmt: skip
    assert log.flops(shape, False, works) == {
        "anchor": anchor, "needed": needed, "executed": padded
    }  # fmt: skip


def test_strong_reference_batches_sorted_pairs_within_the_budget() -> None:
    from benchmarks.strong_reference import length_batches

    lengths = [300, 10, 200, 20, 5000, 30]
    batches = length_batches(lengths, budget=600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert longest * len(batch) <= 600 or len(batch) == 1
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert batches[-1] == [4]  # over the budget: alone


def test_bench_arguments_out_of_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import e2e_bench, engine_bench, strong_reference

    for run, argv in (
        (e2e_bench.parse_args, ["--out", "x", "--gpus", "1", "--rates", "0"]),
        (e2e_bench.parse_args, ["--out", "x", "--gpus", "1", "--generators", "-1"]),
        (engine_bench.parse_args, ["--cuda-graph-max-tokens", "0"]),
        (strong_reference.main, ["--pairs", "0"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
    assert "must be above 0" in capsys.readouterr().err


def test_drift_measures_agreement_per_request() -> None:
    """Top-1 and rank agreement are per request of 8 documents; score differences over all."""
    from benchmarks.drift import agreement, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    truth = [0.1, 0.9, 0.3, 0.2, 0.5, 0.6, 0.7, 0.8] * 2
    same_top = [0.1, 0.9, 0.3, 0.2, 0.5, 0.6, 0.8, 0.7]  # two lower ranks swapped
    new_top = [0.95, 0.9, 0.3, 0.2, 0.5, 0.6, 0.7, 0.8]  # another document on top
    a = agreement(same_top + new_top, truth)
    assert a["top1_agreement"] == 0.5
    assert a["max_abs_score_diff"] == pytest.approx(0.85)
    assert a["mean_abs_score_diff"] == pytest.approx((0.1 + 0.1 + 0.85) / 16)
    assert a["spearman_min"] < a["spearman_mean"] < 1.0


class _FakeEvent:
    """Stands in for torch.cuda.Event: a tick per record() in milliseconds."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self) -> None:
        _FakeEvent.clock += 5.0
        self.at = _FakeEvent.clock

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.at - self.at


def test_device_timed_scorer_sums_each_batch_span(
    tiny_causal_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The span between the events around a batch's launch is added when it is collected;
    the scores and traits are the wrapped scorer's."""
    import torch

    from benchmarks.device_time import DeviceTimedScorer
    from consumer.runtime.loader import load_model
    from consumer.runtime.options import ModelOptions

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    model = load_model(ModelOptions(model=str(tiny_causal_dir)))
    pairs = model.encoder.encode("q", ["a", "b c"], None)
    timed = DeviceTimedScorer(model.scorer)
    assert timed.traits is model.scorer.traits
    handle = timed.launch(timed.prepare(pairs))
    assert timed.busy_s == 0.0  # counted when collected
    assert timed.collect(handle) == model.scorer.score(pairs)
    assert timed.busy_s == pytest.approx(0.005) and timed.batches == 1
    timed.score(pairs)
    assert timed.busy_s == pytest.approx(0.010) and timed.batches == 2
    timed.reset()
    assert (timed.busy_s, timed.batches) == (0.0, 0)


def test_the_fp8_speed_table_comes_from_the_committed_runs() -> None:
    """Every engine-bench rate in docs/benchmarks.md's FP8 table is in the raw output."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = root / "benchmarks" / "results" / "2026-12-04-fp8"
    docs = (root / "docs" / "benchmarks.md").read_text()
    table = docs[docs.index("### FP8 linear layers") :][:3000]
    rates = {}
    for path in [*runs.glob("call2/bench-*.txt"), *runs.glob("call3/bench-*.txt")]:
        report = json.loads(path.read_text().strip().splitlines()[-1])
        rates[path.stem] = report["engine"]["load"]["pairs_per_s"]
    assert len(rates) == 8
    for name, rate in rates.items():
        assert f"{rate:,.1f}" in table, name


ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def docs_section(heading: str) -> str:
    """docs/benchmarks.md from ``heading`` up to the next ``## `` heading."""
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    section = docs[docs.index(heading) :]
    return section[: section.index("\n## ")]


def e2e_phases(path: Path) -> dict[str, dict[str, Any]]:
    """An e2e run's phases (its results.json), by name."""
    return {p["name"]: p for p in json.loads(path.read_text())["phases"]}


def last_json_line(path: Path) -> Any:
    """The JSON line a benchmark printed last."""
    return json.loads(path.read_text().strip().splitlines()[-1])


def assert_quoted(numbers: list[str], section: str) -> None:
    for number in numbers:
        assert number in section, number


def test_the_tiktoken_tables_come_from_the_committed_runs() -> None:
    """Every rate and lone p50 in docs/benchmarks.md's tiktoken tables is in the raw output."""
    runs = RESULTS / "2026-12-04-tiktoken"
    numbers = []
    for path in sorted(runs.glob("call*/bench-*.txt")):
        numbers.append(f"{last_json_line(path)['engine']['load']['pairs_per_s']:,.1f}")
    for path in sorted(runs.glob("call*/*/results.json")):
        phases = e2e_phases(path)
        numbers += [f"{phases['lone']['p50_ms']}", f"{phases['saturated']['pairs_per_s']:,.1f}"]
    assert len(numbers) == 8 + 2 * 9
    assert_quoted(numbers, docs_section("### Tokenizing with tiktoken"))


def test_the_handover_tables_come_from_the_committed_runs() -> None:
    """The lone-request and saturated numbers and the step totals of docs/benchmarks.md's
    hand-over section are in the raw output of the calls it cites."""
    runs = RESULTS / "2026-12-04-handovers"
    numbers = []
    for path in sorted(runs.glob("call[34]/e2e-*/results.json")):
        phases = e2e_phases(path)
        numbers += [f"{phases['lone']['p50_ms']}", f"{phases['saturated']['pairs_per_s']:,.1f}"]
    for side in ("old", "new"):
        steps = last_json_line(runs / "call4" / f"stages-{side}.txt")["default"]
        numbers += [f"{steps[name]:.2f}" for name in ("prepare", "total", "  pack")]
    assert len(numbers) == 2 * 5 + 2 * 3
    assert_quoted(numbers, docs_section("### A lone request's hand-overs in the engine"))


def test_the_oldest_first_table_comes_from_the_committed_runs() -> None:
    """The oldest-first table quotes each variant's ranges over the three committed runs."""
    bench = (RESULTS / "2026-12-04-oldest-first" / "dev-window-fairness.txt").read_text()
    rows = [line.rsplit(maxsplit=6) for line in bench.splitlines() if line[:1].islower()]
    rows = [row for row in rows if row[0] != "variant"]
    numbers = []
    for variant in ("fixed", "window", "window, backlog", "window, oldest first"):
        runs = [row[1:] for row in rows if row[0] == variant]
        assert len(runs) == 3, variant
        for column in range(5):  # pairs/s, p50, p95, p99, max
            values = sorted(float(run[column]) for run in runs)
            fmt = "{:,.1f}" if column == 0 else "{:,.0f}"
            numbers.append(f"{fmt.format(values[0])}-{fmt.format(values[-1])}")
    assert_quoted(numbers, docs_section("### The in-flight window"))


def test_the_window_tables_come_from_the_committed_runs() -> None:
    """docs/benchmarks.md's in-flight window section quotes the committed raw output."""
    runs = RESULTS / "2026-12-04-window"
    numbers = []
    for path in sorted(runs.glob("call*/e2e-*/results.json")):
        phases = e2e_phases(path)
        saturated = phases["saturated"]
        numbers += [f"{saturated['pairs_per_s']:,.1f}", f"{phases['lone']['p50_ms']}"]
        if "4b" in json.dumps(json.loads(path.read_text())["settings"]):
            numbers += [f"{saturated[k]:,.0f}" for k in ("p50_ms", "p95_ms", "p99_ms")]
    bench = (runs / "dev-window-fairness.txt").read_text().splitlines()
    for variant in ("fixed", "window  ", "window, fair poll"):  # p99 ranges of 3 runs
        p99 = [int(line.split()[-3]) for line in bench if line.startswith(variant)]
        assert len(p99) == 3, variant
        numbers.append(f"{min(p99):,}-{max(p99):,}")
    assert len(numbers) == 3 * 2 + 2 * 3 + 3  # 3 runs; 4B percentiles; 3 p99 ranges
    assert_quoted(numbers, docs_section("### The in-flight window"))


def test_the_graph_size_tables_come_from_the_committed_runs() -> None:
    """docs/benchmarks.md's larger-graphs and 4B-window tables quote calls 21-23."""
    runs = RESULTS / "2026-12-04-graph-sizes"
    numbers = []
    for path in sorted(runs.glob("call2[123]/g*/results.json")):
        phases = e2e_phases(path)
        numbers += [
            f"{phases['saturated']['steady_pairs_per_s']:,.1f}",
            f"{phases['paced 163/s #1']['p99_ms']:,.1f}",
            f"{phases['paced 183/s #1']['p99_ms']:,.1f}",
            f"{phases['lone']['p50_ms']}",
        ]
    for side in ("window", "fixed"):
        saturated = e2e_phases(runs / "call23" / side / "results.json")["saturated"]
        numbers.append(f"{saturated['steady_pairs_per_s']:,.1f}")
        numbers += [f"{saturated[k]:,.0f}" for k in ("p50_ms", "p95_ms", "p99_ms")]
    assert len(numbers) == 10 * 4 + 2 * 4
    section = docs_section("**Oldest first on a GPU**") + docs_section("### Larger CUDA graphs")
    assert_quoted(numbers, section)


def test_e2e_summary_shows_a_phase_with_nothing_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A phase where every request was lost has no percentiles: the summary says '-'."""
    from benchmarks import e2e_bench

    monkeypatch.setattr(e2e_bench, "plot", lambda *a: None)
    args = e2e_bench.parse_args(["--out", str(tmp_path), "--gpus", "1"])
    phase = {
        "name": "lone", "offered_per_s": None, "answered": 0, "sent": 5, "pairs_per_s": 0.0,
        "p50_ms": None, "p95_ms": None, "p99_ms": None, "errors": 0, "lost": 5, "duplicates": 0,
    }  # fmt: skip
    report = {
        "hardware": {"cpu_cores": 2, "cpu": "x", "torch": "t", "transformers": "t", "python": "p"},
        "settings": {},
        "phases": [phase],
        "worker_exit_codes": [0],
    }
    e2e_bench._write(report, args, tmp_path)
    line = (tmp_path / "summary.txt").read_text().splitlines()[3]
    assert line.startswith("lone") and line.split()[2:6] == ["0", "-", "-", "-"]


def test_e2e_bench_without_a_gpu_asks_for_a_worker_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from benchmarks import e2e_bench

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as exit_info:
        e2e_bench.parse_args(["--out", "x"])
    assert exit_info.value.code == 2
    assert "no GPU visible" in capsys.readouterr().err


def test_e2e_batches_are_summed_over_workers_and_kept_per_gpu() -> None:
    from benchmarks.e2e_bench import batch_summary, summed

    def counters(pairs: float, count: float, seconds: float) -> dict[str, float]:
        return {
            "rerank_batch_pairs_sum": pairs,
            "rerank_batch_pairs_count": count,
            "rerank_inference_seconds_sum": seconds,
        }

    before = {0: counters(0, 0, 0), 1: counters(100, 1, 0.1)}
    after = {0: counters(400, 2, 0.2), 1: counters(700, 3, 0.9)}
    assert batch_summary(summed(before), summed(after)) == {
        "count": 4, "mean_pairs": 250.0, "mean_model_ms": 250.0,
    }  # fmt: skip
    assert batch_summary(before[1], after[1]) == {
        "count": 2, "mean_pairs": 300.0, "mean_model_ms": 400.0,
    }  # fmt: skip
    assert summed({}) == {}  # a worker that did not answer: no totals at all


def test_e2e_steady_rate_leaves_out_the_ramp_up_and_the_drain() -> None:
    from benchmarks.e2e_bench import Phase

    phase = Phase("saturated", seconds=10.0, answered=8, sent=8)
    # first reply at 2 s; sending stopped at 6 s; two replies drained after it
    phase.answered_at = [2.0, 3.0, 4.0, 4.5, 5.0, 6.0, 7.0, 9.0]
    phase.sending_ended = 6.0
    summary = phase.summary(docs=8)
    assert summary["pairs_per_s"] == 6.4  # 64 pairs over the whole 10 s phase
    assert summary["steady_pairs_per_s"] == 12.0  # 6 replies x 8 pairs over 2 s..6 s
    assert Phase("lone").summary(docs=8)["steady_pairs_per_s"] is None  # not a closed loop


def test_e2e_saves_the_gpu_topology_when_nvidia_smi_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess

    from benchmarks import e2e_bench

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert e2e_bench._gpu_topology() is None  # a host without the NVIDIA tools

    def answers(command: list[str], **kwargs: Any) -> Any:
        assert command == ["nvidia-smi", "topo", "-m"]
        return subprocess.CompletedProcess(command, 0, "GPU0\tX\tNV18\n", "")

    monkeypatch.setattr(subprocess, "run", answers)
    assert e2e_bench._gpu_topology() == "GPU0\tX\tNV18\n"


def test_e2e_phases_of_several_generators_merge_into_one() -> None:
    from benchmarks.e2e_bench import Phase, _shares, merge_phases

    a = Phase("paced 5/s #1", offered_per_s=2.5, seconds=10.0, sent=25, answered=24, lost=1)
    a.latencies, a.answered_at, a.timeline = [0.01] * 24, [1.0] * 24, [(2.0, 10.0, 8.0)]
    a.sending_ended, a.generator_cpu = 11.0, 0.4
    b = Phase("paced 5/s #1", offered_per_s=2.5, seconds=10.2, sent=25, answered=25, errors=0)
    b.latencies, b.answered_at, b.timeline = [0.02] * 25, [1.5] * 25, [(1.0, 20.0, 9.0)]
    b.sending_ended, b.generator_cpu, b.duplicates = 11.5, 0.9, 1
    merged = merge_phases([a, b])
    assert (merged.name, merged.offered_per_s, merged.seconds) == ("paced 5/s #1", 5.0, 10.2)
    assert (merged.sent, merged.answered, merged.lost, merged.duplicates) == (50, 49, 1, 1)
    assert len(merged.latencies) == len(merged.answered_at) == 49
    assert merged.timeline == [(1.0, 20.0, 9.0), (2.0, 10.0, 8.0)]  # in sending order
    assert (merged.sending_ended, merged.generator_cpu) == (11.5, 0.9)  # the busiest
    assert _shares(512, 2) == [256, 256] and _shares(5, 3) == [2, 2, 1] and sum(_shares(1, 2)) == 1


def test_gpu_check_runs_the_ways_it_is_asked_for_in_their_order() -> None:
    args = gpu_check.parse_args(["tok", "--variants", "padded_eager, packed_compiled"])
    assert args.variants == ["packed_compiled", "padded_eager"]
    assert gpu_check.parse_args(["tok"]).variants is None
    for wrong in ("packed_magic", "", "packed_large_graphs"):  # the last needs pairs first
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["tok", "--variants", wrong])
    both = "packed_compiled,packed_large_graphs"
    assert gpu_check.parse_args(["tok", "--variants", both]).variants == both.split(",")


def test_gpu_check_takes_every_released_shape() -> None:
    assert gpu_check.parse_args(["tok"]).config == "0.6b"
    args = gpu_check.parse_args(["tok", "32", "--config", "4b"])
    assert (args.config, args.n_pairs, str(args.tokenizer_dir)) == ("4b", 32, "tok")
    assert gpu_check.parse_args(["tok", "--config", "8b", "--tiny"]).config == "tiny"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["tok", "--config", "70b"])


def test_the_fp8_emulation_table_comes_from_the_committed_runs() -> None:
    """Every variant's max and mean score drift in the emulated-FP8 table is in the raw
    output, and every variant run is in the table."""
    section = docs_section("### FP8 scale granularity and bf16 layers, emulated")
    table = section[: section.index("What this shows")]
    drifts = [
        json.loads(line)
        for path in sorted((RESULTS / "2026-12-04-fp8-emulation").glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if '"vs": "card_fp32"' in line
    ]
    assert len(drifts) == 4 + 3 + 3 + 3  # four runs: the card's bf16 and 3, 2, 2, 2 variants
    for drift in drifts:
        row = f"| {drift['max_abs_score_diff']:.3f} | {drift['mean_abs_score_diff']:.3f} |"
        assert row in table, drift["variant"]


def test_the_large_shape_tables_come_from_the_committed_runs() -> None:
    """docs/benchmarks.md's 4B/8B parity and graph-size tables quote 2026-12-05-large-shapes."""
    runs = RESULTS / "2026-12-05-large-shapes"
    numbers = []
    for call, config in (("call1", "4b"), ("call2", "8b")):
        lines = [
            json.loads(x) for x in (runs / call / f"check-{config}.txt").read_text().splitlines()
        ]
        numbers += [
            str(x["max_abs_score_diff"])
            for x in lines
            if "vs reference_fp32" in x.get("compare", "")
        ]
        numbers += [str(x["allowed"]) for x in lines if "allowed" in x]
        for graphs in (8192, 16384):
            report = last_json_line(runs / call / f"bench-{config}-g{graphs}.txt")
            numbers.append(f"{report['engine']['load']['pairs_per_s']:,.1f}")
            idle = report["engine"]["idle"]
            numbers.append(f"{idle['p50_ms']:.1f} ms ({idle['p50_inference_ms']:.1f})")
    rerun = [json.loads(x) for x in (runs / "call4" / "check-8b-128.txt").read_text().splitlines()]
    numbers += [
        str(x["max_abs_score_diff"]) for x in rerun if "vs reference_fp32" in x.get("compare", "")
    ]
    numbers += [str(x["allowed"]) for x in rerun if "allowed" in x]
    for path in sorted((runs / "call3").glob("mem-*.err")):
        held = re.search(r"they hold (\d+\.\d+) GiB", path.read_text())
        assert held is not None, path
        numbers.append(f"{held.group(1)} GiB")
    assert len(numbers) == 2 * (7 + 1 + 4) + 3 + 1 + 4
    assert_quoted(numbers, docs_section("### The 4B and 8B shapes"))


PROBED_ENGINE = """
import asyncio, sys
from consumer.engine.api import ScoreRequest
from consumer.engine.engine import Engine
from consumer.runtime.prompt import EncodedPair
from consumer.runtime.scorer import OneCallScorer, ScorerTraits

class Encoder:
    def encode(self, query, documents, instruction):
        return [EncodedPair(query + "|" + d, len(query) + len(d), False) for d in documents]

class Scorer(OneCallScorer):
    traits = ScorerTraits("fake", "cpu", "float32")
    def batch_cost(self, pairs):
        return sum(p.tokens for p in pairs)
    def compute_logits(self, pairs):
        return [0.0 for _ in pairs]
    def calibrate(self, logits):
        return list(logits)

async def main():
    engine = Engine(Encoder(), Scorer(), "fake")
    await engine.start()
    requests = [ScoreRequest(f"q{i}", (f"a{i}", f"b{i}")) for i in range(int(sys.argv[1]))]
    await asyncio.gather(*(engine.score(r) for r in requests))
    await engine.close()

asyncio.run(main())
"""


def test_the_engine_probe_times_every_request_and_the_bench_joins_it(tmp_path: Path) -> None:
    """The probe (as e2e_bench --engine-probe loads it into a worker) writes one line per
    request with every stage, and the bench joins them to its own timeline by request key."""
    import os
    import subprocess
    import sys

    from benchmarks.e2e_stages import (
        ENGINE_STAGES,
        PROBE_DIR,
        join,
        read_probe,
        request_key,
        summarize,
    )

    probe_file = tmp_path / "probe.jsonl"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(PROBE_DIR), str(ROOT)]),
        RERANK_ENGINE_PROBE=str(probe_file),
    )
    subprocess.run(
        [sys.executable, "-c", PROBED_ENGINE, "12"], env=env, check=True, timeout=120, cwd=ROOT
    )
    lines = [json.loads(line) for line in probe_file.read_text().splitlines()]
    assert len(lines) == 12
    for line in lines:
        assert all(line[stage] >= 0 for stage in ENGINE_STAGES), line
        assert line["pairs"] >= 2 and line["batches"] == 1
    # the bench's own rows for the same requests: sent 2 ms before the engine had them,
    # 50 ms end to end; one more that the engine never saw
    called = {line["key"]: line["t"] for line in lines}
    keys = [request_key(f"q{i}", [f"a{i}", f"b{i}"]) for i in range(12)]
    timeline = [(called[key] - 0.002, 50.0, 40.0, 1.0, 1.0, key) for key in keys]
    timeline.append((called[keys[0]], 50.0, 40.0, 1.0, 1.0, request_key("never", ["sent"])))
    late = (called[keys[0]] + 1.0, 50.0, 40.0, 1.0, 1.0, keys[0])  # the same text, sent later
    joined = join(timeline, read_probe([probe_file]))
    assert len(joined) == 12
    for request in joined:
        assert request["kafka"] == 10.0
        engine_ms = sum(request[stage] for stage in ENGINE_STAGES)
        assert abs(request["service"] - (40.0 - engine_ms)) < 1e-6
    summary = summarize(joined, answered=13)
    assert (summary["joined"], summary["answered"]) == (12, 13)
    assert summary["p50"]["kafka"] == 10.0 and summary["slowest_1pct"]["latency"] == 50.0
    # a row whose text the engine saw at another time, or without a key (a bench before
    # keys), is left out, not mismatched
    assert join([late, (called[keys[0]], 50.0, 40.0)], read_probe([probe_file])) == []


def test_the_policy_simulation_runs_both_policies(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import policy_sim

    policy_sim.main(["--seconds", "0.5", "--fractions", "0.5", "--scale", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["late_cut"] for row in rows] == [False, True]
    for row in rows:
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
        assert row["mean_requests_a_batch"] >= 1 and 0 < row["device_busy"] <= 1.5


def test_the_late_cut_tables_come_from_the_committed_runs() -> None:
    """docs/benchmarks.md's late-cut section quotes the raw output of its one call: every
    paced phase's percentiles, each run's saturated rates and lone request, and the p50
    stages it tabulates."""
    runs = RESULTS / "2026-12-07-latency-sweep"
    numbers = []
    for side in ("before", "after"):
        report = json.loads((runs / side / "results.json").read_text())
        phases = {p["name"]: p for p in report["phases"]}
        saturated, lone = phases["saturated"], phases["lone"]
        numbers += [f"{saturated['steady_pairs_per_s']:,.1f}", f"{saturated['pairs_per_s']:,.1f}"]
        numbers += [f"{lone[k]}" for k in ("p50_ms", "p95_ms", "p99_ms")]
        for share in range(50, 100, 5):
            phase = phases[f"paced {share}% #1"]
            assert (phase["errors"], phase["lost"], phase["duplicates"]) == (0, 0, 0)
            row = " / ".join(f"{phase[k]}" for k in ("p50_ms", "p95_ms", "p99_ms"))
            numbers.append(row.replace(f"{phase['p99_ms']}", f"**{phase['p99_ms']}**", 1)
                           if share in (80, 90) else row)  # fmt: skip
        for share in (70, 80, 90, 95):
            stages = report["stages"][f"paced {share}% #1"]["p50"]
            numbers.append(
                " / ".join(f"{stages[k]:.2f}" for k in ("wait", "form", "handoff", "behind"))
            )
    assert len(numbers) == 2 * (5 + 10 + 4)
    assert_quoted(numbers, docs_section("### Latency under load: late cut"))


def test_engine_bench_takes_a_workload_by_name_and_splits_long_documents(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--workload rag-long`` with a narrow window and ``--split-long-documents``: the
    load's requests are of 64 candidates, the long ones scored as windows (more prompt
    tokens than documents' worth, nothing truncated)."""
    engine_bench.main(
        ["--config", "tiny", "--device", "cpu", "--workload", "rag-long", "--pairs", "64",
         "--max-pair-tokens", "1024", "--split-long-documents", "--skip-reference",
         "--idle-requests", "1", "--warm-pairs", "0", "--json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    load = report["engine"]["load"]
    assert report["settings"]["workload"] == "rag-long"
    assert load["requests"] == 1 and load["pairs"] == 64
    # the 6 long candidates (every tenth) are split; the others fit the window
    assert load["documents_split"] == 6 and load["documents_truncated"] == 0
    assert load["computed_tokens_per_s"] > 0
    assert "rag-long: 64 pairs" in out and "documents split into windows" in out


def test_workloads_have_the_shapes_they_are_named_for() -> None:
    from tokenizers import Tokenizer

    from benchmarks.workload import WORKLOADS, synthetic_requests, workload_requests

    tokenizer_dir = default_tokenizer_dir()
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rag = workload_requests(tokenizer_dir, WORKLOADS["rag-long"], 128, seed=0)
    assert [len(docs) for _, docs in rag] == [64, 64]
    drawn = [len(tok.encode(d).ids) for _, docs in rag for d in docs]
    long = [n for n in drawn if n > 1000]
    assert len(long) == 12  # every tenth candidate of the workload (counted across requests)
    assert min(long) > 1800 and max(n for n in drawn if n <= 1000) < 600
    # the 8-document workload is the one every earlier number was measured on
    assert synthetic_requests(tokenizer_dir, 64, 8, 0) == workload_requests(
        tokenizer_dir, WORKLOADS["8docs"], 64, 0
    )


def test_rag_tables_read_their_phases_and_windows() -> None:
    import argparse

    from benchmarks.rag_tables import parse_phases, parse_windows

    assert parse_phases("8docs:4096,rag:2048@fp8") == [("8docs", 4096, None), ("rag", 2048, "fp8")]
    assert parse_windows("2048:1024") == (2048, 1024) and parse_windows("") is None
    for bad in ("books:10", "rag:0", "rag"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_phases(bad)


def test_the_fp8_verdict_names_the_settings_or_what_is_missing() -> None:
    from benchmarks.drift import fp8_verdict, path_options

    assert path_options("fp8-last2") == {"layers": "fp8", "fp8_bf16_last_layers": 2}
    assert path_options("fp8-normed-last4") == {"layers": "fp8-normed", "fp8_bf16_last_layers": 4}
    assert path_options("compiled") == {"layers": "compiled"}

    def row(diff: float, top1: float, rho: float) -> dict[str, float]:
        return {"max_abs_score_diff": diff, "top1_agreement": top1, "spearman_mean": rho}

    card = row(0.03, 0.95, 0.99)
    close = {
        "card_bf16": card,
        "engine_fp8-last0": row(0.2, 0.7, 0.9),
        "engine_fp8-last4": row(0.05, 0.92, 0.985),
        "engine_fp8-last2": row(0.055, 0.93, 0.99),
    }
    verdict = fp8_verdict(close)
    assert verdict["fp8_safe"] == ["engine_fp8-last4", "engine_fp8-last2"]
    # the safe way with the fewest bf16 layers
    assert verdict["advice"].endswith("RERANK_LAYERS=fp8 RERANK_FP8_BF16_LAST_LAYERS=2")
    far = fp8_verdict({"card_bf16": card, "engine_fp8-last0": row(0.2, 0.7, 0.9)})
    assert far["fp8_safe"] == [] and "keep RERANK_LAYERS=auto" in far["advice"]
    assert far["fp8_missing"]["engine_fp8-last0"] == [
        "max |score diff| 0.200 > 0.060", "top-1 0.700 < 0.900", "Spearman 0.900 < 0.980"
    ]  # fmt: skip


def test_the_window_offsets_table_comes_from_the_committed_run() -> None:
    """Each tiktoken time in the window-offsets table is in the raw output, before and after."""
    output = (RESULTS / "2026-12-07-window-offsets" / "output.txt").read_text()
    rows = re.findall(r"^tiktoken\s+truncating\s+([\d.]+) ms.*windows\s+([\d.]+) ms", output, re.M)
    assert len(rows) == 4  # before, after, before, after
    befores, afters = rows[0::2], rows[1::2]
    assert max(float(w) for _, w in afters) < min(float(w) for _, w in befores) / 3
    assert_quoted([f"{ms} ms" for row in rows for ms in row], docs_section("### Window offsets"))


def test_window_encoding_times_both_ways_for_each_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import window_encoding

    window_encoding.main(["--pairs", "64", "--rounds", "1", "--max-pair-tokens", "512"])
    out = capsys.readouterr().out
    assert out.startswith("host: ")
    rows = re.findall(
        r"^(\w+)\s+truncating .*\((\d+) pairs\)\s+windows .*\((\d+) pairs\)", out, re.M
    )
    assert [backend for backend, _, _ in rows] == ["tiktoken", "huggingface"]
    assert all(int(split) > int(cut) == 64 for _, cut, split in rows)  # long ones were split
