"""The scoring engine with a fake encoder and scorer of our own interfaces (no torch model)."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumer.engine.api import (
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    EngineFailed,
    InvalidRequest,
    ScoreRequest,
)
from consumer.engine.engine import Engine
from consumer.engine.inference import is_out_of_memory
from consumer.engine.settings import EngineSettings
from consumer.runtime.prompt import EncodedPair, PromptEncoder, PromptTooLong
from consumer.runtime.scorer import OneCallScorer, ScorerTraits
from consumer.service.metrics import Metrics

TRUNCATE_AT = 300  # the fake encoder cuts documents longer than this many "tokens"
CHECK_PAYLOAD = "check query|check document"  # the engine's check batch, as the fake encodes it


def fake_logit(payload: str) -> float:
    """The fake model: a deterministic function of the encoded pair."""
    return (sum(ord(c) * (i + 1) for i, c in enumerate(payload)) % 2000) / 100.0 - 10.0


def fake_calibrate(logit: float) -> float:
    return logit / 100.0 + 0.5


class FakeEncoder:
    """Payload = "query|doc"; one token per character of the document plus the query's."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        with self.lock:
            self.calls += 1
        if len(query) > 1000:
            raise PromptTooLong("query too long")
        pairs = []
        for doc in documents:
            cut = len(doc) > TRUNCATE_AT
            doc = doc[:TRUNCATE_AT]
            pairs.append(EncodedPair(f"{query}|{doc}", len(query) + len(doc), cut))
        return pairs


class FakeScorer(OneCallScorer):
    """Records every batch; can block on a gate, fail, or run out of memory on demand."""

    traits = ScorerTraits("fake", "cpu", "float32")

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.warmed = False
        self.threads: set[str] = set()

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        return max((p.tokens for p in pairs), default=0) * len(pairs)

    def check(self, payloads: list[str]) -> None:
        """Hook for subclasses: raise to simulate a failure."""

    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        payloads = [str(p.payload) for p in pairs]
        self.threads.add(threading.current_thread().name)
        if payloads != [CHECK_PAYLOAD]:  # the gate holds requests, not the engine's check
            self.entered.set()
            assert self.gate.wait(10), "test gate never opened"
        self.check(payloads)
        with self.lock:
            self.batches.append(payloads)
        return [fake_logit(p) for p in payloads]

    def calibrate(self, logits: Sequence[float]) -> list[float]:
        return [fake_calibrate(x) for x in logits]

    def warmup(self, encoder: PromptEncoder) -> None:
        self.warmed = True

    def scored(self) -> list[str]:
        with self.lock:
            return [p for batch in self.batches for p in batch]

    def forget_the_check_batch(self) -> None:
        """Drop the engine's check batch (scored at start) from the record."""
        with self.lock:
            assert self.batches[-1] == [CHECK_PAYLOAD], self.batches
            self.batches.pop()


class FakeOutOfMemoryError(RuntimeError):
    pass


class OomScorer(FakeScorer):
    """Runs out of memory on batches of more than ``limit`` pairs, or on a poisoned payload."""

    def __init__(
        self,
        limit: int,
        poison: str | None = None,
        error: type[Exception] = FakeOutOfMemoryError,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.poison = poison
        self.error = error
        self.ooms = 0

    def check(self, payloads: list[str]) -> None:
        if len(payloads) > self.limit or any(self.poison and self.poison in p for p in payloads):
            self.ooms += 1
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


class FailingScorer(FakeScorer):
    """Fails (plain error) every batch that holds a poisoned payload."""

    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = poison
        self.failed: list[list[str]] = []

    def check(self, payloads: list[str]) -> None:
        if any(self.poison in p for p in payloads):
            self.failed.append(payloads)
            raise ValueError("model exploded")


class PreparingScorer(FakeScorer):
    """Records where batches are prepared and how many prepared batches ran."""

    def __init__(self) -> None:
        super().__init__()
        self.prepare_threads: set[str] = set()
        self.prepared_runs = 0

    def prepare(self, pairs: Sequence[EncodedPair]) -> object:
        self.prepare_threads.add(threading.current_thread().name)
        return list(pairs)

    def forget_the_check_batch(self) -> None:
        """Also forget where the check batch was prepared (the inference thread)."""
        super().forget_the_check_batch()
        self.prepare_threads.clear()
        self.prepared_runs = 0

    def launch(self, prepared: object) -> object:
        self.prepared_runs += 1
        return super().launch(prepared)


class LaunchingScorer(PreparingScorer):
    """A pipelined scorer: device work queued at launch, results read at collect.

    Records the order of launches and collects; ``fail_collect`` fails the collect of a
    batch holding that payload (an error the device reports late), ``oom_launch``
    runs out of memory when launching more than that many pairs.
    """

    def __init__(self, fail_collect: str | None = None, oom_launch: int | None = None) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.launches = itertools.count(1)
        self.fail_collect = fail_collect
        self.oom_launch = oom_launch
        self.launch_gate = threading.Event()
        self.launch_gate.set()

    traits = ScorerTraits("fake", "cpu", "float32", pipelined=True)

    def launch(self, prepared: object) -> object:
        assert isinstance(prepared, list)
        if [str(p.payload) for p in prepared] == [CHECK_PAYLOAD]:
            return 0, prepared  # the engine's check batch: neither gated nor recorded
        assert self.launch_gate.wait(10), "launch gate never opened"
        if self.oom_launch is not None and len(prepared) > self.oom_launch:
            raise FakeOutOfMemoryError("CUDA out of memory (simulated at launch)")
        number = next(self.launches)
        with self.lock:
            self.events.append(("launch", number))
        return number, prepared

    def collect(self, handle: object) -> list[float]:
        assert isinstance(handle, tuple)
        number, prepared = handle
        if number == 0:
            return self.compute_logits(prepared)
        with self.lock:
            self.events.append(("collect", number))
        if self.fail_collect and any(self.fail_collect in str(p.payload) for p in prepared):
            raise RuntimeError("device reported an error")
        return self.compute_logits(prepared)


def random_request(rng: random.Random, docs: int | None = None) -> ScoreRequest:
    query = "q" + "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 20)))
    documents = tuple(
        "".join(rng.choice("xyz ") for _ in range(rng.randint(1, 400)))
        for _ in range(docs if docs is not None else rng.randint(1, 12))
    )
    return ScoreRequest(query=query, documents=documents)


def expected_logits(request: ScoreRequest) -> tuple[float, ...]:
    return tuple(fake_logit(f"{request.query}|{d[:TRUNCATE_AT]}") for d in request.documents)


async def started_engine(
    scorer: FakeScorer, metrics: Metrics | None = None, **settings: object
) -> Engine:
    engine = Engine(
        encoder=FakeEncoder(),
        scorer=scorer,
        name="fake-model",
        settings=EngineSettings(**settings),  # type: ignore[arg-type]
        metrics=metrics,
    )
    await engine.start()
    scorer.forget_the_check_batch()
    return engine


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def test_concurrent_requests_get_their_own_scores_back() -> None:
    rng = random.Random(1)
    scorer = FakeScorer()
    metrics = Metrics(CollectorRegistry())
    engine = await started_engine(scorer, metrics, max_batch_tokens=2000, max_batch_pairs=16)
    assert scorer.warmed and engine.ready and engine.model_name == "fake-model"
    requests = [random_request(rng) for _ in range(40)]
    results = await asyncio.gather(*(engine.score(r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        assert result.logits == expected_logits(request)
        assert result.scores == tuple(fake_calibrate(x) for x in result.logits)
        assert result.truncated == tuple(len(d) > TRUNCATE_AT for d in request.documents)
        assert result.prompt_tokens == sum(
            len(request.query) + min(len(d), TRUNCATE_AT) for d in request.documents
        )
        assert result.queue_ms >= 0 and result.inference_ms >= 0
    assert scorer.threads == {"rerank-inference"}
    assert engine.in_flight_pairs == 0
    total_pairs = sum(len(r.documents) for r in requests)
    assert metrics.registry.get_sample_value("rerank_pairs_total") == total_pairs
    assert metrics.registry.get_sample_value("rerank_queue_wait_seconds_count") == total_pairs
    assert metrics.registry.get_sample_value("rerank_batch_pairs_count") == len(scorer.batches)
    await engine.close()


async def test_batches_respect_the_token_budget_and_score_each_pair_once() -> None:
    rng = random.Random(2)
    scorer = FakeScorer()
    scorer.gate.clear()  # let a backlog build up so batches are cut from a full queue
    engine = await started_engine(scorer, max_batch_tokens=1500, max_batch_pairs=8)
    requests = [random_request(rng, docs=6) for _ in range(30)]
    tasks = [asyncio.create_task(engine.score(r)) for r in requests]
    await wait_for(lambda: engine.in_flight_pairs == 180)
    scorer.gate.set()
    results = await asyncio.gather(*tasks)

    for batch in scorer.batches:
        assert len(batch) <= 8
        if len(batch) > 1:
            assert max(len(p) - 1 for p in batch) * len(batch) <= 1500
    scored = scorer.scored()
    assert sorted(scored) == sorted(
        f"{r.query}|{d[:TRUNCATE_AT]}" for r in requests for d in r.documents
    )
    assert [res.logits for res in results] == [expected_logits(r) for r in requests]
    await engine.close()


async def test_request_past_its_deadline_is_refused_without_tokenizing() -> None:
    scorer = FakeScorer()
    engine = await started_engine(scorer)
    encoder = engine._encoder
    assert isinstance(encoder, FakeEncoder)
    calls = encoder.calls
    with pytest.raises(DeadlineExceeded):
        await engine.score(ScoreRequest("q", ("d",), deadline=time.time() - 1))
    assert encoder.calls == calls
    assert scorer.batches == []
    await engine.close()


async def test_pairs_expiring_in_the_queue_never_reach_the_scorer() -> None:
    scorer = FakeScorer()
    scorer.gate.clear()
    engine = await started_engine(scorer)
    blocker = asyncio.create_task(engine.score(ScoreRequest("blocker", ("a", "b"))))
    await asyncio.to_thread(scorer.entered.wait, 5)  # the model is busy with the blocker
    late = ScoreRequest("late", ("x", "y", "z"), deadline=time.time() + 0.1)
    with pytest.raises(DeadlineExceeded):
        await engine.score(late)
    scorer.gate.set()
    assert (await blocker).logits == expected_logits(ScoreRequest("blocker", ("a", "b")))
    assert not [p for p in scorer.scored() if p.startswith("late|")]
    assert engine.in_flight_pairs == 0
    # the engine still works afterwards
    ok = ScoreRequest("after", ("m", "n"), deadline=time.time() + 30)
    assert (await engine.score(ok)).logits == expected_logits(ok)
    await engine.close()


@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError, FakeOutOfMemoryError], ids=["torch", "named-like-it"]
)
async def test_out_of_memory_splits_the_batch_and_lowers_the_budget(
    error: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(3)
    scorer = OomScorer(limit=3, error=error)
    scorer.gate.clear()
    metrics = Metrics(CollectorRegistry())
    engine = await started_engine(
        scorer, metrics, max_batch_tokens=100_000, min_batch_tokens=10, max_batch_pairs=64
    )
    assert metrics.registry.get_sample_value("rerank_max_batch_tokens") == 100_000
    requests = [random_request(rng, docs=5) for _ in range(12)]
    tasks = [asyncio.create_task(engine.score(r)) for r in requests]
    await wait_for(lambda: engine.in_flight_pairs == 60)
    scorer.gate.set()
    results = await asyncio.gather(*tasks)

    assert [res.logits for res in results] == [expected_logits(r) for r in requests]
    assert scorer.ooms > 0
    assert all(len(batch) <= 3 for batch in scorer.batches)
    assert len(scorer.scored()) == 60
    assert engine.max_batch_tokens < 100_000
    assert metrics.registry.get_sample_value("rerank_max_batch_tokens") == engine.max_batch_tokens
    assert (metrics.registry.get_sample_value("rerank_oom_splits_total") or 0) >= 1
    splits = [r for r in caplog.records if "out of memory on a batch" in r.getMessage()]
    assert splits and all(r.levelname == "WARNING" for r in splits)
    assert f"max_batch_tokens now {engine.max_batch_tokens}" in splits[-1].getMessage()
    await engine.close()


async def test_single_pair_out_of_memory_fails_only_its_request() -> None:
    scorer = OomScorer(limit=10_000, poison="POISON")
    engine = await started_engine(scorer, max_batch_tokens=100_000, min_batch_tokens=10)
    scorer.gate.clear()
    good = ScoreRequest("good", ("a", "bb", "ccc"))
    bad = ScoreRequest("bad", ("POISON", "fine"))
    tasks = [asyncio.create_task(engine.score(r)) for r in (good, bad)]
    await wait_for(lambda: engine.in_flight_pairs == 5)
    scorer.gate.set()
    good_result, bad_result = await asyncio.gather(*tasks, return_exceptions=True)
    assert not isinstance(good_result, BaseException)
    assert good_result.logits == expected_logits(good)
    assert isinstance(bad_result, EngineError)
    assert "out of memory" in str(bad_result)
    assert engine.in_flight_pairs == 0
    await engine.close()


async def test_a_poisoned_request_fails_alone_and_its_batch_neighbours_are_scored() -> None:
    """A batch that fails on a working model is retried in halves by request: only the
    request that makes the model fail gets an error."""
    rng = random.Random(4)
    scorer = FailingScorer(poison="POISON")
    scorer.gate.clear()
    engine = await started_engine(scorer, max_batch_tokens=100_000)
    requests = [random_request(rng, docs=3) for _ in range(6)]
    requests.insert(3, ScoreRequest("poisoned", ("POISON doc", "other")))
    tasks = [asyncio.create_task(engine.score(r)) for r in requests]
    await wait_for(lambda: engine.in_flight_pairs == 20)
    scorer.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert len(scorer.failed) > 1  # the whole batch failed first, then its halves
    for request, outcome in zip(requests, outcomes, strict=True):
        if request.query == "poisoned":
            assert type(outcome) is EngineError and "model exploded" in str(outcome)
        else:
            assert not isinstance(outcome, BaseException), outcome
            assert outcome.logits == expected_logits(request)
    assert engine.in_flight_pairs == 0 and engine.failure is None and engine.ready
    later = random_request(rng)
    assert (await engine.score(later)).logits == expected_logits(later)
    await engine.close()


class BrokenScorer(FakeScorer):
    """Scores until ``broken`` is set; then every batch fails (a sticky device error),
    or, with ``garbage``, returns wrong numbers without failing."""

    def __init__(self, garbage: bool = False) -> None:
        super().__init__()
        self.broken = threading.Event()
        self.garbage = garbage

    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        logits = super().compute_logits(pairs)
        if self.broken.is_set():
            if not self.garbage:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return [x + 100.0 for x in logits]
        return logits


async def test_a_broken_model_fails_the_engine_and_every_request_is_left_unanswered() -> None:
    scorer = BrokenScorer()
    engine = await started_engine(scorer)
    assert (await engine.score(ScoreRequest("q", ("d",)))).logits
    scorer.broken.set()
    scorer.gate.clear()
    requests = [ScoreRequest(f"q{i}", ("a", "b")) for i in range(5)]
    tasks = [asyncio.create_task(engine.score(r)) for r in requests]
    await wait_for(lambda: engine.in_flight_pairs == 10)
    scorer.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, EngineFailed) for o in outcomes), outcomes
    assert engine.failure is not None and "check batch" in engine.failure
    assert not engine.ready and engine.in_flight_pairs == 0
    with pytest.raises(EngineFailed):
        await engine.score(ScoreRequest("after", ("x",)))
    await engine.close()


async def test_a_model_that_scores_its_check_batch_wrongly_fails_the_engine() -> None:
    """Wrong numbers without an error: a request failing then shows the model is broken."""
    scorer = BrokenScorer(garbage=True)

    class ExplodesOnPoison(BrokenScorer):
        def check(self, payloads: list[str]) -> None:
            if any("POISON" in p for p in payloads):
                raise ValueError("model exploded")

    scorer = ExplodesOnPoison(garbage=True)
    engine = await started_engine(scorer)
    scorer.broken.set()
    outcome = await asyncio.gather(
        engine.score(ScoreRequest("q", ("POISON",))), return_exceptions=True
    )
    assert isinstance(outcome[0], EngineFailed)
    assert engine.failure is not None and "scored its check batch" in engine.failure
    await engine.close()


class NanScorer(FakeScorer):
    """Returns NaN logits (without raising) for the pairs ``nan_for`` picks."""

    def __init__(self, nan_for: object) -> None:
        super().__init__()
        self.nan_for = nan_for

    def compute_logits(self, pairs: Sequence[EncodedPair]) -> list[float]:
        logits = super().compute_logits(pairs)
        return [
            float("nan") if self.nan_for(str(p.payload)) else x  # type: ignore[operator]
            for p, x in zip(pairs, logits, strict=True)
        ]


async def test_a_model_that_turns_to_nan_fails_the_engine_like_one_that_raises() -> None:
    """NaN scores were answered as internal errors while the worker stayed ready: a broken
    GPU or checkpoint that does not raise must make the worker step aside all the same."""
    turned = threading.Event()
    scorer = NanScorer(lambda payload: turned.is_set())
    engine = await started_engine(scorer)
    assert (await engine.score(ScoreRequest("q", ("d",)))).logits
    turned.set()
    outcomes = await asyncio.gather(
        *(engine.score(ScoreRequest(f"q{i}", ("a", "b"))) for i in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(o, EngineFailed) for o in outcomes), outcomes
    assert engine.failure is not None and "check batch" in engine.failure
    assert not engine.ready
    await engine.close()


async def test_nan_for_one_request_on_a_working_model_fails_that_request_alone() -> None:
    scorer = NanScorer(lambda payload: "overflow" in payload)
    engine = await started_engine(scorer, max_wait_ms=50)
    requests = [ScoreRequest("q", ("overflow",)), ScoreRequest("r", ("fine", "also fine"))]
    bad, good = await asyncio.gather(*(engine.score(r) for r in requests), return_exceptions=True)
    assert type(bad) is EngineError and "not finite" in str(bad)
    assert not isinstance(good, BaseException) and good.logits == expected_logits(requests[1])
    assert engine.failure is None and engine.ready
    await engine.close()


async def test_a_model_whose_check_pair_is_nan_at_warm_up_never_becomes_ready() -> None:
    scorer = NanScorer(lambda payload: True)
    engine = Engine(encoder=FakeEncoder(), scorer=scorer, name="nan", settings=EngineSettings())
    with pytest.raises(EngineError, match="check pair"):
        await engine.start()
    assert not engine.ready


async def test_a_stalled_model_fails_the_engine_instead_of_waiting_forever() -> None:
    """A hung device: the request has no deadline, yet it is answered (EngineFailed)."""
    scorer = FakeScorer()
    engine = await started_engine(scorer, engine_stall_timeout_s=0.5)
    scorer.gate.clear()  # the model never finishes this batch
    started = time.monotonic()
    with pytest.raises(EngineFailed):
        await asyncio.wait_for(engine.score(ScoreRequest("q", ("d",))), 10)
    assert time.monotonic() - started < 5
    assert engine.failure is not None and "has not finished a batch" in engine.failure
    scorer.gate.set()
    await engine.close()


async def test_close_resolves_pending_requests_with_engine_closed() -> None:
    rng = random.Random(5)
    scorer = FakeScorer()
    scorer.gate.clear()
    engine = await started_engine(scorer, max_batch_pairs=4)
    tasks = [asyncio.create_task(engine.score(random_request(rng, docs=4))) for _ in range(5)]
    await wait_for(lambda: engine.in_flight_pairs == 20)
    closing = asyncio.create_task(engine.close())
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, EngineClosed) for o in outcomes)
    scorer.gate.set()  # lets the batch on the "GPU" finish so the thread can stop
    await asyncio.wait_for(closing, 10)
    assert not engine.ready
    assert engine.in_flight_pairs == 0
    with pytest.raises(EngineClosed):
        await engine.score(random_request(rng))


async def test_tokenization_does_not_block_the_event_loop() -> None:
    ticks = 0
    ticked = threading.Event()

    class SlowEncoder(FakeEncoder):
        seen_ticks = -1

        def encode(
            self, query: str, documents: Sequence[str], instruction: str | None
        ) -> list[EncodedPair]:
            # Busy "tokenization" that only ends once the loop has ticked meanwhile.
            start = ticks
            deadline = time.monotonic() + 5
            while ticks < start + 3 and time.monotonic() < deadline:
                sum(range(1000))
                ticked.wait(0.001)
            self.seen_ticks = ticks - start
            return super().encode(query, documents, instruction)

    encoder = SlowEncoder()
    engine = Engine(encoder=encoder, scorer=FakeScorer(), name="fake", settings=EngineSettings())
    await engine.start()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    big = ScoreRequest("big", tuple(f"doc {i}" for i in range(2000)))
    result = await engine.score(big)
    ticking.cancel()
    assert encoder.seen_ticks >= 3
    assert result.logits == expected_logits(big)
    await engine.close()


async def test_prompt_too_long_is_an_invalid_request() -> None:
    engine = await started_engine(FakeScorer())
    with pytest.raises(InvalidRequest) as caught:
        await engine.score(ScoreRequest("q" * 2000, ("doc",)))
    assert caught.value.code == "invalid_request"
    assert engine.in_flight_pairs == 0
    await engine.close()


async def test_truncate_false_refuses_documents_the_encoder_cut_and_scores_nothing() -> None:
    scorer = FakeScorer()
    engine = await started_engine(scorer)
    encoder = engine._encoder
    assert isinstance(encoder, FakeEncoder)
    long_doc = "x" * (TRUNCATE_AT + 1)
    documents = ("short", long_doc, "fits", long_doc)
    calls = encoder.calls

    with pytest.raises(InvalidRequest) as caught:
        await engine.score(ScoreRequest("q", documents, truncate=False))

    assert caught.value.code == "invalid_request" and not caught.value.retriable
    message = str(caught.value)
    assert "2 of 4 documents do not fit the model's token limit" in message
    assert message.endswith("documents [1, 3]")
    assert encoder.calls == calls + 1  # tokenized once: the check reads the encoder's flags
    assert scorer.batches == [] and engine.in_flight_pairs == 0
    # The same documents with truncate on (the default) are cut and scored; short ones
    # with it off are scored as usual.
    cut = await engine.score(ScoreRequest("q", documents))
    assert cut.truncated == (False, True, False, True)
    fits = ScoreRequest("q", ("short", "fits"), truncate=False)
    assert (await engine.score(fits)).logits == expected_logits(fits)
    await engine.close()


async def test_truncate_false_names_the_indices_and_limit_of_a_real_encoder(
    tiny_causal_dir: Path,
) -> None:
    from consumer.runtime.loader import load_model
    from consumer.runtime.options import ModelOptions

    model = load_model(
        ModelOptions(
            model=str(tiny_causal_dir),
            device="cpu",
            compile="off",
            packed="off",
            max_pair_tokens=128,
        )
    )
    engine = Engine.for_model(model)
    await engine.start()
    try:
        documents = tuple(["a short passage"] * 60 + ["a long passage " * 50] * 60)
        with pytest.raises(InvalidRequest) as caught:
            await engine.score(ScoreRequest("what is kafka", documents, truncate=False))
    finally:
        await engine.close()
    assert str(caught.value) == (
        "60 of 120 documents do not fit the limit of 128 tokens per prompt (template, "
        "instruction, query and document) and truncate is false: documents ["
        + ", ".join(str(i) for i in range(60, 110))
        + ", ... (10 more)]"
    )


async def test_cancelled_request_leaves_nothing_in_flight() -> None:
    scorer = FakeScorer()
    scorer.gate.clear()
    engine = await started_engine(scorer)
    blocker = asyncio.create_task(engine.score(ScoreRequest("blocker", ("a",))))
    await asyncio.to_thread(scorer.entered.wait, 5)
    victim = asyncio.create_task(engine.score(ScoreRequest("victim", ("x", "y"))))
    await wait_for(lambda: engine.in_flight_pairs == 3)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert engine.in_flight_pairs == 1
    scorer.gate.set()
    await blocker
    assert not [p for p in scorer.scored() if p.startswith("victim|")]
    await engine.close()


async def test_prepared_batches_are_built_off_the_inference_thread() -> None:
    rng = random.Random(6)
    scorer = PreparingScorer()
    engine = await started_engine(scorer)
    requests = [random_request(rng) for _ in range(10)]
    results = await asyncio.gather(*(engine.score(r) for r in requests))
    assert [res.logits for res in results] == [expected_logits(r) for r in requests]
    assert scorer.prepared_runs > 0
    assert scorer.prepare_threads == {"rerank-batcher"}
    assert scorer.threads == {"rerank-inference"}
    await engine.close()


async def test_score_before_start_and_empty_request() -> None:
    engine = Engine(encoder=FakeEncoder(), scorer=FakeScorer(), name="fake")
    with pytest.raises(EngineError):
        await engine.score(ScoreRequest("q", ("d",)))
    await engine.start()
    result = await engine.score(ScoreRequest("q", ()))
    assert result.logits == () and result.prompt_tokens == 0
    await engine.close()


def test_out_of_memory_is_recognised_by_class_name() -> None:
    assert is_out_of_memory(FakeOutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("CUDA out of memory"))


async def test_engine_scores_equal_the_scorer_alone_on_a_tiny_real_model(
    tiny_causal_dir: Path,
) -> None:
    from consumer.runtime.loader import load_model
    from consumer.runtime.options import ModelOptions

    model = load_model(
        ModelOptions(model=str(tiny_causal_dir), device="cpu", compile="off", packed="off")
    )
    engine = Engine.for_model(model, EngineSettings(max_batch_tokens=600, max_batch_pairs=8))
    await engine.start()
    requests = [
        ScoreRequest("what is kafka", ("a distributed log", "a novelist from Prague", "")),
        ScoreRequest("capital of France", ("Paris is the capital of France.", "Berlin " * 80)),
        ScoreRequest("gpu batching", tuple(f"document number {i} " * (i + 1) for i in range(6))),
        ScoreRequest("x", ("y",), instruction="Judge relevance"),
    ]
    results = await asyncio.gather(*(engine.score(r) for r in requests))
    await engine.close()

    for request, result in zip(requests, results, strict=True):
        pairs = model.encoder.encode(request.query, request.documents, request.instruction)
        alone = model.scorer.score(pairs)
        assert result.logits == pytest.approx(alone, rel=1e-4, abs=1e-4)
        assert result.scores == pytest.approx(model.scorer.calibrate(alone), rel=1e-4, abs=1e-5)
        assert result.prompt_tokens == sum(p.tokens for p in pairs)


async def test_close_fails_requests_still_waiting_for_tokenization() -> None:
    release, entered = threading.Event(), threading.Event()

    class BlockingEncoder(FakeEncoder):
        def encode(
            self, query: str, documents: Sequence[str], instruction: str | None
        ) -> list[EncodedPair]:
            entered.set()
            release.wait(10)
            return super().encode(query, documents, instruction)

    encoder = BlockingEncoder()
    engine = Engine(
        encoder=encoder,
        scorer=FakeScorer(),
        name="fake",
        settings=EngineSettings(tokenizer_threads=1),
    )
    await engine.start()
    running = asyncio.create_task(engine.score(ScoreRequest("a", ("x",))))
    queued = asyncio.create_task(engine.score(ScoreRequest("b", ("y",))))
    await asyncio.to_thread(entered.wait, 5)
    await asyncio.sleep(0.01)  # let the second request reach the pool's queue
    await engine.close()
    release.set()
    outcomes = await asyncio.gather(running, queued, return_exceptions=True)
    assert all(isinstance(o, EngineClosed) for o in outcomes), outcomes


async def test_the_next_batch_is_launched_before_the_last_one_is_collected() -> None:
    scorer = LaunchingScorer()
    scorer.launch_gate.clear()  # hold the first launch until the next batch is cut
    engine = await started_engine(scorer, max_batch_pairs=2, max_wait_ms=0)
    requests = [ScoreRequest(f"q{i}", (f"{i}a", f"{i}b")) for i in range(4)]
    tasks = [asyncio.create_task(engine.score(r)) for r in requests]
    await wait_for(lambda: engine.in_flight_pairs == 8)
    await asyncio.sleep(0.05)  # the batch former cuts batch 2 meanwhile
    scorer.launch_gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [r.logits for r in results] == [expected_logits(r) for r in requests]
    assert scorer.events.index(("launch", 2)) < scorer.events.index(("collect", 1))
    launched = [n for kind, n in scorer.events if kind == "launch"]
    collected = [n for kind, n in scorer.events if kind == "collect"]
    assert launched == collected == sorted(launched)  # every launch collected, in order
    assert scorer.threads == {"rerank-inference"}
    await engine.close()


class TimedDeviceScorer(LaunchingScorer):
    """A pipelined scorer whose device takes ``device_s`` a batch: ``done`` says whether
    it has finished (counting the calls), ``collect`` waits for it."""

    def __init__(self, device_s: float) -> None:
        super().__init__()
        self.device_s = device_s
        self.done_calls = 0

    def launch(self, prepared: object) -> object:
        number, pairs = super().launch(prepared)  # type: ignore[misc]
        finished = threading.Event()
        threading.Timer(self.device_s, finished.set).start()
        return number, pairs, finished

    def done(self, handle: object) -> bool:
        assert isinstance(handle, tuple)
        self.done_calls += 1
        return handle[2].is_set()

    def collect(self, handle: object) -> list[float]:
        assert isinstance(handle, tuple)
        number, pairs, finished = handle
        assert finished.wait(10), "the fake device never finished"
        return super().collect((number, pairs))


async def test_with_nothing_else_to_do_the_inference_thread_waits_on_the_device() -> None:
    """A lone batch on the device: the inference thread waits on the device itself, not
    polling it every IN_FLIGHT_POLL_S (up to a poll late); work that comes meanwhile is
    still scored."""
    scorer = TimedDeviceScorer(device_s=0.2)
    engine = await started_engine(scorer, max_wait_ms=0)
    scorer.done_calls = 0
    first = asyncio.create_task(engine.score(ScoreRequest("q1", ("a", "b"))))
    await asyncio.sleep(0.05)  # the first batch is on the device
    second = ScoreRequest("q2", ("c",))
    results = await asyncio.wait_for(asyncio.gather(first, engine.score(second)), 10)
    assert results[1].logits == expected_logits(second)
    # polling every 0.5 ms over 0.4 s of device time would have asked hundreds of times
    assert scorer.done_calls <= 10, scorer.done_calls
    await engine.close()


async def test_an_error_reported_at_collect_fails_only_that_batch() -> None:
    scorer = LaunchingScorer(fail_collect="bad")
    engine = await started_engine(scorer, max_batch_pairs=2, max_wait_ms=0)
    bad, good = ScoreRequest("q", ("bad1", "bad2")), ScoreRequest("r", ("ok1", "ok2"))
    outcomes = await asyncio.wait_for(
        asyncio.gather(engine.score(bad), engine.score(good), return_exceptions=True), 10
    )
    assert isinstance(outcomes[0], EngineError) and "device reported" in str(outcomes[0])
    assert not isinstance(outcomes[1], BaseException)
    assert outcomes[1].logits == expected_logits(good)
    assert (await engine.score(good)).logits == expected_logits(good)  # still serving
    await engine.close()


async def test_out_of_memory_at_launch_splits_and_retries() -> None:
    scorer = LaunchingScorer(oom_launch=1)
    engine = await started_engine(scorer, max_batch_pairs=4, max_wait_ms=0)
    request = ScoreRequest("q", ("a", "b", "c", "d"))
    assert (await asyncio.wait_for(engine.score(request), 10)).logits == expected_logits(request)
    assert engine.stats.oom_splits >= 1
    await engine.close()


async def test_an_idle_model_waits_for_requests_still_being_tokenized() -> None:
    release = threading.Event()

    class SlowForOneQuery(FakeEncoder):
        def encode(
            self, query: str, documents: Sequence[str], instruction: str | None
        ) -> list[EncodedPair]:
            if query == "slow":
                release.wait(10)
            return super().encode(query, documents, instruction)

    scorer = FakeScorer()
    engine = Engine(
        encoder=SlowForOneQuery(),
        scorer=scorer,
        name="fake",
        settings=EngineSettings(max_wait_ms=600_000, max_batch_pairs=8, tokenizer_threads=2),
    )
    await engine.start()
    scorer.forget_the_check_batch()
    slow_request, fast_request = ScoreRequest("slow", ("1", "2")), ScoreRequest("a", ("3",))
    slow = asyncio.create_task(engine.score(slow_request))
    fast = asyncio.create_task(engine.score(fast_request))
    await wait_for(lambda: engine.in_flight_pairs == 1)
    await asyncio.sleep(0.05)
    assert scorer.batches == []  # the queued request waits for the one being tokenized
    release.set()
    results = await asyncio.wait_for(asyncio.gather(slow, fast), 10)
    assert [r.logits for r in results] == [
        expected_logits(slow_request),
        expected_logits(fast_request),
    ]
    assert len(scorer.batches) == 1  # the wait let both share one batch
    await engine.close()


async def test_max_wait_applies_only_while_the_model_is_idle() -> None:
    # A wait far longer than the test's timeouts: a request that waited for it fails.
    scorer = FakeScorer()
    engine = await started_engine(
        scorer, max_wait_ms=600_000, max_batch_pairs=4, max_batch_tokens=100_000
    )
    # A lone request has nothing to wait for: it runs at once.
    lone = ScoreRequest("z", ("0",))
    assert (await asyncio.wait_for(engine.score(lone), 10)).logits == expected_logits(lone)
    scorer.batches.clear()

    scorer.gate.clear()
    scorer.entered.clear()
    full = ScoreRequest("c", ("5", "6", "7", "8"))  # a full batch goes at once
    busy = asyncio.create_task(engine.score(full))
    await asyncio.to_thread(scorer.entered.wait, 5)
    small = asyncio.create_task(engine.score(ScoreRequest("d", ("9",))))
    await wait_for(lambda: engine.in_flight_pairs == 5)
    scorer.gate.set()
    # The small request was cut while the model was busy: no max_wait for it.
    done = await asyncio.wait_for(asyncio.gather(busy, small), 10)
    assert done[1].logits == expected_logits(ScoreRequest("d", ("9",)))
    assert scorer.batches[-1] == ["d|9"]
    await engine.close()


async def test_the_service_engine_reports_batch_metrics_from_the_start(
    tiny_causal_dir: Path,
) -> None:
    from consumer.app import load_real_model, make_real_engine
    from consumer.settings import load_settings

    settings = load_settings(
        ["--model", str(tiny_causal_dir), "--device", "cpu", "--max-batch-tokens", "3000"]
    )
    metrics = Metrics(CollectorRegistry())
    engine = make_real_engine(load_real_model(settings), settings, metrics)
    await engine.start()
    # Set at start, not only after an out-of-memory lowered it.
    assert metrics.registry.get_sample_value("rerank_max_batch_tokens") == 3000
    assert (
        metrics.registry.get_sample_value(
            "rerank_model_info",
            {
                "model": tiny_causal_dir.name,  # a name, never the path
                "kind": "causal-lm",
                "device": "cpu",
                "dtype": "float32",
            },
        )
        == 1
    )
    result = await engine.score(ScoreRequest("what is kafka", ("a log", "a cat", "a topic")))
    await engine.close()
    assert len(result.scores) == 3
    assert metrics.registry.get_sample_value("rerank_pairs_total") == 3
    assert metrics.registry.get_sample_value("rerank_tokens_total") == result.prompt_tokens
    assert (metrics.registry.get_sample_value("rerank_batch_pairs_count") or 0) >= 1
    assert (metrics.registry.get_sample_value("rerank_batch_tokens_count") or 0) >= 1


async def test_a_batch_being_prepared_when_the_engine_stops_is_answered() -> None:
    """The batch former holds a cut batch (neither queued nor handed over) when the
    inference thread dies: its requests get an error instead of waiting forever."""
    preparing, release = threading.Event(), threading.Event()

    class SlowPrepare(PreparingScorer):
        def prepare(self, pairs: Sequence[EncodedPair]) -> list[EncodedPair]:
            if any("hold" in str(p.payload) for p in pairs):
                preparing.set()
                release.wait(10)
            return super().prepare(pairs)

    scorer = SlowPrepare()
    engine = await started_engine(scorer, max_batch_pairs=1, max_wait_ms=0)
    held = asyncio.create_task(engine.score(ScoreRequest("q", ("hold",))))
    await asyncio.to_thread(preparing.wait, 5)
    engine._fail_from_thread("simulated death of the inference thread")
    release.set()
    with pytest.raises(EngineFailed):
        await asyncio.wait_for(held, 10)
    with pytest.raises(EngineFailed):  # nothing is accepted that nobody would score
        await asyncio.wait_for(engine.score(ScoreRequest("r", ("x",))), 10)
    assert engine.failure == "simulated death of the inference thread"
    await engine.close()


async def test_a_lowered_budget_recovers_after_enough_good_batches() -> None:
    """One out-of-memory halves nothing for good: the budget climbs back step by step."""
    scorer = OomScorer(limit=10_000, poison="POISON")
    engine = await started_engine(
        scorer,
        max_batch_tokens=1000,
        min_batch_tokens=10,
        oom_budget_factor=0.5,
        oom_recovery_batches=3,
        max_wait_ms=0,
    )
    with pytest.raises(EngineError, match="out of memory"):
        await engine.score(ScoreRequest("q", ("POISON",)))
    assert engine.max_batch_tokens == 500
    for i in range(3):
        await engine.score(ScoreRequest("q", (f"doc {i}",)))
    assert engine.max_batch_tokens == 1000  # 500 / 0.5 after 3 good batches
    for i in range(3):
        await engine.score(ScoreRequest("q", (f"more {i}",)))
    assert engine.max_batch_tokens == 1000  # never above the setting
    await engine.close()


class QuickScorer(FakeScorer):
    """Packed; once warmed up, issues batches up to ``quick`` tokens cheaply (CUDA graphs)."""

    traits = ScorerTraits("fake", "cpu", "float32", packed=True)

    def __init__(self, quick: int) -> None:
        super().__init__()
        self.quick = quick

    def batch_cost(self, pairs: Sequence[EncodedPair]) -> int:
        return sum(p.tokens for p in pairs)

    def warmup(self, encoder: PromptEncoder) -> None:
        super().warmup(encoder)
        self.traits = ScorerTraits(
            "fake", "cpu", "float32", packed=True, quick_batch_cost=self.quick
        )


async def backlog_batch_costs(backlog_requests: int, quick_backlog: float) -> list[int]:
    """Costs of the batches that serve a backlog of 100-token pairs (10 a request)."""
    scorer = QuickScorer(quick=1000)
    engine = await started_engine(
        scorer, max_batch_tokens=10_000, quick_batch_backlog=quick_backlog
    )
    scorer.gate.clear()
    # one request on the model and one in the batch cut ahead: the backlog then builds
    # in the queue and is cut only once the model is free
    lone = ScoreRequest("q" * 10, ("d" * 90,))
    ahead = [asyncio.create_task(engine.score(lone))]
    await asyncio.to_thread(scorer.entered.wait, 5)
    ahead.append(asyncio.create_task(engine.score(lone)))
    await wait_for(lambda: engine._queue._next is not None)
    requests = [ScoreRequest("q" * 10, ("d" * 90,) * 10) for _ in range(backlog_requests)]
    tasks = [asyncio.create_task(engine.score(r)) for r in requests]
    await wait_for(lambda: engine.in_flight_pairs == 2 + 10 * backlog_requests)
    scorer.gate.set()
    await asyncio.gather(*ahead, *tasks)
    await engine.close()
    return [100 * len(batch) for batch in scorer.batches[2:]]


async def test_a_moderate_backlog_runs_in_quick_batches() -> None:
    # 3,000 tokens wait: under 4 quick batches' worth
    assert await backlog_batch_costs(3, quick_backlog=4.0) == [1000, 1000, 1000]
    # turned off: one batch takes them all
    assert await backlog_batch_costs(3, quick_backlog=0) == [3000]


async def test_a_large_backlog_gets_the_full_budget() -> None:
    # 9,000 tokens wait: one full batch, then the rest was small enough for quick ones
    assert await backlog_batch_costs(9, quick_backlog=4.0) == [9000]
    costs = await backlog_batch_costs(14, quick_backlog=4.0)
    assert costs == [10_000, 1000, 1000, 1000, 1000]


class SimulatedDevice(PreparingScorer):
    """A pipelined scorer over a simulated device: one stream that runs each batch for
    ``base_s + per_pair_s`` per pair after the batches queued before it. Records, per
    batch, its payloads and when it was launched, started and finished on the device."""

    traits = ScorerTraits("fake", "cpu", "float32", pipelined=True)

    def __init__(self, base_s: float, per_pair_s: float) -> None:
        super().__init__()
        self.base_s, self.per_pair_s = base_s, per_pair_s
        self.free_at = 0.0
        self.timeline: list[tuple[list[str], float, float, float]] = []

    def launch(self, prepared: object) -> object:
        assert isinstance(prepared, list)
        payloads = [str(p.payload) for p in prepared]
        if payloads == [CHECK_PAYLOAD]:
            return None, self.compute_logits(prepared)
        now = time.perf_counter()
        start = max(now, self.free_at)
        self.free_at = start + self.base_s + self.per_pair_s * len(prepared)
        with self.lock:
            self.timeline.append((payloads, now, start, self.free_at))
        finished = threading.Event()
        threading.Timer(self.free_at - now, finished.set).start()
        return finished, prepared

    def done(self, handle: object) -> bool:
        assert isinstance(handle, tuple)
        return handle[0] is None or handle[0].is_set()

    def collect(self, handle: object) -> list[float]:
        assert isinstance(handle, tuple)
        finished, prepared = handle
        if finished is None:
            return prepared  # type: ignore[no-any-return]
        assert finished.wait(10), "the simulated device never finished"
        return self.compute_logits(prepared)

    def runs(self) -> list[tuple[list[str], float, float, float]]:
        with self.lock:
            return list(self.timeline)


async def busy_device_batches(late_cut: bool) -> list[tuple[list[str], float, float, float]]:
    """The simulated device's batches when three one-pair requests come 30 ms apart while
    a 160 ms batch runs, after ten lone batches taught the engine the device's pace."""
    device = SimulatedDevice(base_s=0.15, per_pair_s=0.01)
    # a wide margin: a loaded test machine wakes threads late, and the test is about
    # which batch the requests join, not about how close to the end the cut comes
    engine = await started_engine(device, max_wait_ms=0, late_cut=late_cut, late_cut_margin_ms=30.0)
    for i in range(10):
        await engine.score(ScoreRequest(f"warm{i}", ("w",)))
    running = asyncio.create_task(engine.score(ScoreRequest("running", ("r",))))
    requests = []
    for i in range(3):
        await asyncio.sleep(0.03)
        requests.append(asyncio.create_task(engine.score(ScoreRequest(f"q{i}", (f"d{i}",)))))
    await asyncio.wait_for(asyncio.gather(running, *requests), 10)
    await engine.close()
    return device.runs()[10:]


async def test_with_the_device_busy_the_next_batch_takes_every_request_waiting() -> None:
    """Late cut: requests that come while a batch runs are not cut one by one as they
    come (each a batch of its own, queued behind the others); the batch is cut just
    before the device needs it, with all of them, and is on the device before the running
    batch ends."""
    runs = await busy_device_batches(late_cut=True)
    assert [payloads for payloads, *_ in runs] == [["running|r"], ["q0|d0", "q1|d1", "q2|d2"]]
    (_, _, _, running_end), (_, launched, started, _) = runs
    assert launched < running_end, "the device waited for the late cut"
    assert started == running_end  # back to back on the device


async def test_without_late_cut_the_first_request_to_come_is_a_batch_of_its_own() -> None:
    """The policy before: the batch former cuts as soon as the slot ahead is free, so the
    first request that comes while the device is busy goes alone."""
    runs = await busy_device_batches(late_cut=False)
    assert runs[1][0] == ["q0|d0"]
    assert len(runs) > 2


async def test_a_full_batch_is_cut_at_once_while_the_device_is_busy() -> None:
    """Late cut never holds back a batch that could not take more: it is queued on the
    device behind the running batch at once."""
    device = SimulatedDevice(base_s=0.15, per_pair_s=0.01)
    engine = await started_engine(device, max_wait_ms=0, max_batch_pairs=4)
    for i in range(10):
        await engine.score(ScoreRequest(f"warm{i}", ("w",)))
    running = asyncio.create_task(engine.score(ScoreRequest("running", ("r",))))
    await asyncio.sleep(0.02)
    full = engine.score(ScoreRequest("full", ("a", "b", "c", "d")))
    await asyncio.wait_for(asyncio.gather(running, full), 10)
    await engine.close()
    (_, _, _, running_end), (payloads, launched, _, _) = device.runs()[10:]
    assert len(payloads) == 4
    assert launched < running_end - 0.08  # long before the device was due to need it


async def test_a_lone_request_on_an_idle_device_is_launched_at_once() -> None:
    """Late cut applies only while the device is busy: after a quiet spell a request is
    launched as soon as it is tokenized, whatever the device's measured pace."""
    device = SimulatedDevice(base_s=0.05, per_pair_s=0.0)
    engine = await started_engine(device, max_wait_ms=0)
    for i in range(10):
        await engine.score(ScoreRequest(f"warm{i}", ("w",)))
    sent = time.perf_counter()
    await asyncio.wait_for(engine.score(ScoreRequest("lone", ("x",))), 10)
    await engine.close()
    payloads, launched, started, _ = device.runs()[-1]
    assert payloads == ["lone|x"] and started == launched
    assert launched - sent < 0.04  # less than the device's own 50 ms a batch
