"""Documents longer than the model's window: split into overlapping windows that fit,
each scored, the document taking its best window's score (a tiny Qwen3 reranker with the
real tokenizer, on the CPU)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.engine.api import InvalidRequest, ScoreRequest
from consumer.engine.engine import Engine, document_groups
from consumer.engine.settings import EngineSettings
from consumer.runtime.loader import LoadedModel, load_model
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import EncodedPair, Window
from consumer.service.codec import encode_success
from schemas.models import RerankReply, RerankRequest

WINDOW = 128  # tokens a prompt may have here: a document gets 48 of them
QUERY = "Which partition holds a key's records?"
SHORT = "Kafka keeps the records of one key in one partition."
LONG = " ".join(f"Sentence {i} talks about topic number {i * 7 % 13}." for i in range(12))
DEFAULTS = EngineSettings()


@pytest.fixture(scope="module")
def model(tiny_causal_dir: Path) -> LoadedModel:
    options = ModelOptions(
        model=str(tiny_causal_dir), device="cpu", compile="off", packed="off",
        max_pair_tokens=WINDOW,
    )  # fmt: skip
    return load_model(options)


async def started(model: LoadedModel, **settings: Any) -> Engine:
    engine = Engine.for_model(model, EngineSettings(**settings))
    await engine.start()
    return engine


@pytest.fixture
async def engine(model: LoadedModel) -> AsyncIterator[Engine]:
    engine = await started(model)
    yield engine
    await engine.close()


def window_pairs(model: LoadedModel, documents: Sequence[str]) -> list[EncodedPair]:
    encoder: Any = model.encoder
    pairs: list[EncodedPair] = encoder.encode_windows(
        QUERY, documents, None, DEFAULTS.window_overlap_tokens, DEFAULTS.max_windows_per_document
    )
    return pairs


def test_windows_fit_overlap_and_cover_the_whole_document(model: LoadedModel) -> None:
    pairs = window_pairs(model, [SHORT, LONG])
    whole = model.encoder.encode(QUERY, [SHORT, LONG], None)
    assert pairs[0] == whole[0]  # a document that fits is one pair, as without windows
    windows = [p.window for p in pairs[1:]]
    assert all(w is not None for w in windows) and len(windows) == 5
    assert [w.index for w in windows if w] == list(range(len(windows)))
    assert {w.count for w in windows if w} == {len(windows)}
    assert all(p.tokens <= WINDOW and not p.truncated for p in pairs)
    first, last = windows[0], windows[-1]
    assert first is not None and last is not None
    assert first.start == 0 and last.end == len(LONG)
    for a, b in itertools.pairwise(windows):
        assert a is not None and b is not None
        assert a.start < b.start < a.end < b.end  # each overlaps the next
    # the first window is exactly the document as truncation cuts it
    assert pairs[1].payload == whole[1].payload and whole[1].truncated
    assert document_groups(pairs) == [range(0, 1), range(1, len(pairs))]


def test_a_document_past_its_most_windows_keeps_the_first_ones_and_is_truncated(
    model: LoadedModel,
) -> None:
    encoder: Any = model.encoder
    pairs = encoder.encode_windows(QUERY, [LONG], None, 16, 2)
    assert [(p.window.index, p.window.count) for p in pairs] == [(0, 2), (1, 2)]
    assert [p.truncated for p in pairs] == [False, True]
    assert pairs[1].window.end < len(LONG)


async def test_a_split_document_gets_its_best_windows_score(
    model: LoadedModel, engine: Engine
) -> None:
    pairs = window_pairs(model, [SHORT, LONG])
    per_window = model.scorer.score(pairs)
    best = max(range(1, len(pairs)), key=lambda k: per_window[k])
    result = await engine.score(ScoreRequest(QUERY, (SHORT, LONG), split_long_documents=True))
    assert result.logits == pytest.approx((per_window[0], per_window[best]), abs=1e-5)
    assert result.windows == (None, pairs[best].window)
    assert result.truncated == (False, False)
    assert result.prompt_tokens == sum(p.tokens for p in pairs)
    cut = await engine.score(ScoreRequest(QUERY, (SHORT, LONG)))
    # truncated, the long document is its first window
    assert cut.logits == pytest.approx((per_window[0], per_window[1]), abs=1e-5)
    assert cut.truncated == (False, True) and cut.windows == ()


async def test_split_documents_need_no_truncation_unless_past_their_windows(
    model: LoadedModel, engine: Engine
) -> None:
    fits = await engine.score(
        ScoreRequest(QUERY, (SHORT, LONG), truncate=False, split_long_documents=True)
    )
    assert fits.truncated == (False, False)
    with pytest.raises(InvalidRequest, match=r"1 of 2 documents .* documents \[1\]"):
        await engine.score(ScoreRequest(QUERY, (SHORT, LONG), truncate=False))
    few = await started(model, max_windows_per_document=2)
    try:
        with pytest.raises(InvalidRequest, match=r"1 of 2 documents .* documents \[1\]"):
            await few.score(
                ScoreRequest(QUERY, (SHORT, LONG), truncate=False, split_long_documents=True)
            )
    finally:
        await few.close()


async def test_the_engines_default_applies_when_the_request_does_not_say(
    model: LoadedModel,
) -> None:
    splitting = await started(model, split_long_documents=True)
    try:
        by_default = await splitting.score(ScoreRequest(QUERY, (SHORT, LONG)))
        refused = await splitting.score(
            ScoreRequest(QUERY, (SHORT, LONG), split_long_documents=False)
        )
    finally:
        await splitting.close()
    assert by_default.windows[1] is not None and by_default.truncated == (False, False)
    assert refused.windows == () and refused.truncated == (False, True)


class _NoWindows:
    """An encoder of our interface that cannot split (as the non-Qwen3 ones)."""

    def __init__(self, encoder: Any) -> None:
        self.encode = encoder.encode


async def test_asking_an_encoder_that_cannot_split_is_an_invalid_request(
    model: LoadedModel,
) -> None:
    engine = Engine(_NoWindows(model.encoder), model.scorer, "m", EngineSettings())
    await engine.start()
    try:
        with pytest.raises(InvalidRequest, match="cannot split long documents"):
            await engine.score(ScoreRequest(QUERY, (LONG,), split_long_documents=True))
        plain = await engine.score(ScoreRequest(QUERY, (LONG,)))
    finally:
        await engine.close()
    assert plain.truncated == (True,)


def test_the_reply_says_which_window_scored_each_split_document() -> None:
    window = Window(index=2, count=5, start=120, end=310)
    body = encode_success(
        "id-1", model="m", documents=["a", "b", "c"], scores=[0.1, 0.9, 0.5],
        logits=[-2.0, 2.0, 0.0], top_n=2, return_documents=False, raw_scores=False,
        prompt_tokens=10, queue_ms=1.0, inference_ms=2.0, total_ms=3.0,
        windows=[None, window, None],
    )  # fmt: skip
    reply = RerankReply.model_validate(orjson.loads(body))
    assert [r.index for r in reply.results] == [1, 2]
    assert reply.results[0].window is not None
    assert reply.results[0].window.model_dump() == {
        "index": 2, "count": 5, "start": 120, "end": 310
    }  # fmt: skip
    assert "window" not in orjson.loads(body)["results"][1]


def test_the_request_field_is_a_bool_or_absent() -> None:
    base = {"query": "q", "documents": ["d"]}
    assert RerankRequest.model_validate(base).split_long_documents is None
    assert RerankRequest.model_validate({**base, "split_long_documents": True}).split_long_documents
    with pytest.raises(ValueError, match="split_long_documents"):
        RerankRequest.model_validate({**base, "split_long_documents": "yes"})


def test_engine_settings_refuse_windows_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="max_windows_per_document"):
        EngineSettings(max_windows_per_document=0)
    with pytest.raises(ValueError, match="window_overlap_tokens"):
        EngineSettings(window_overlap_tokens=-1)
