"""Our batched scorers against the Qwen3-Reranker model card, pair by pair.

The reference below is the model card's code: the whole prompt tokenized without
special tokens between the PREFIX and SUFFIX ids, the middle truncated to fit, one pair
at a time (no padding), FULL vocabulary logits at the last token, softmax over
[no, yes]. Only this reference computes full logits.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import minilm_dir
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from consumer.runtime.last_token import LastTokenScorer
from consumer.runtime.loader import LoadedModel, load_model
from consumer.runtime.options import DEFAULT_INSTRUCTION, ModelOptions
from consumer.runtime.prompt import (
    QWEN3_PREFIX,
    QWEN3_SUFFIX,
    EncodedPair,
    PromptTooLong,
    TextPairIds,
)

SHORT_LIMIT = 96  # small enough that the long documents below are cut
TOL = 1e-5
LONG_DOC = "The quick brown fox jumps over the lazy dog near the riverbank. " * 20
REQUESTS: list[tuple[str, list[str], str | None]] = [
    (
        "What is the capital of China?",
        [
            "The capital of China is Beijing.",
            "Gravity is a force that attracts two bodies towards each other.",
            LONG_DOC,
            "",
        ],
        None,
    ),
    (
        "北京有什么好吃的？",
        [
            "北京烤鸭是北京最有名的菜。" * 6,
            "東京の天気は晴れです。",
            "Peking duck 🦆🔥 is great 😋",
        ],
        "Given a Chinese food question, find passages that answer it",
    ),
    (
        "emoji 🚀 query\nwith a newline",
        ["🚀🚀🚀 rockets " * 30, "  leading spaces\n\nand blank lines ", "x"],
        "Retrieve documents 📄",
    ),
]


class ModelCardReference:
    """The Qwen3-Reranker model card's scoring code, run on one pair at a time."""

    def __init__(self, folder: Path, max_length: int) -> None:
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.max_length = max_length
        self.prefix = self.tok.encode(QWEN3_PREFIX, add_special_tokens=False)
        self.suffix = self.tok.encode(QWEN3_SUFFIX, add_special_tokens=False)
        self.yes = self.tok.convert_tokens_to_ids("yes")
        self.no = self.tok.convert_tokens_to_ids("no")

    def ids(self, query: str, doc: str, instruction: str | None) -> list[int]:
        text = (
            f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
        )
        middle = self.tok(
            [text],
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix) - len(self.suffix),
        )["input_ids"][0]
        return self.prefix + middle + self.suffix

    def untruncated_len(self, query: str, doc: str, instruction: str | None) -> int:
        text = (
            f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
        )
        middle = self.tok(text, add_special_tokens=False)["input_ids"]
        return len(self.prefix) + len(middle) + len(self.suffix)

    @torch.no_grad()
    def causal_logit_and_score(self, model: torch.nn.Module, ids: list[int]) -> tuple[float, float]:
        # full vocabulary logits at the last position (logits_to_keep only skips the others)
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[:, -1, :]
        pair = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        score = F.log_softmax(pair, dim=1)[:, 1].exp()
        return float(pair[0, 1] - pair[0, 0]), float(score[0])

    @torch.no_grad()
    def seqcls_logit(self, model: torch.nn.Module, ids: list[int]) -> float:
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def ids_of(pair: EncodedPair) -> list[int]:
    """The prompt ids of a Qwen3 pair."""
    assert isinstance(pair.payload, list)
    return pair.payload


def all_pairs(loaded: LoadedModel) -> tuple[list[EncodedPair], list[tuple[str, str, str | None]]]:
    """Every request encoded, flattened, with the (query, doc, instruction) of each pair."""
    pairs, sources = [], []
    for query, docs, instruction in REQUESTS:
        pairs += loaded.encoder.encode(query, docs, instruction)
        sources += [(query, d, instruction) for d in docs]
    return pairs, sources


@pytest.fixture(scope="module", params=[SHORT_LIMIT, 8192], ids=["truncating", "full"])
def limit(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir: Path, limit: int) -> LoadedModel:
    return load_model(ModelOptions(model=str(tiny_causal_dir), max_pair_tokens=limit))


@pytest.fixture(scope="module")
def reference(tiny_causal_dir: Path, limit: int) -> ModelCardReference:
    return ModelCardReference(tiny_causal_dir, limit)


def test_prompt_ids_equal_model_card_tokenization(
    causal: LoadedModel, reference: ModelCardReference, limit: int
) -> None:
    pairs, sources = all_pairs(causal)
    for pair, (query, doc, instruction) in zip(pairs, sources, strict=True):
        assert pair.payload == reference.ids(query, doc, instruction)
        assert pair.tokens == len(ids_of(pair))
        assert pair.truncated == (reference.untruncated_len(query, doc, instruction) > limit)
    if limit == SHORT_LIMIT:  # the inputs are chosen so both cases occur
        assert any(p.truncated for p in pairs) and not all(p.truncated for p in pairs)
        assert max(p.tokens for p in pairs) == limit


def test_truncation_cuts_only_the_document(
    causal: LoadedModel, reference: ModelCardReference
) -> None:
    for query, docs, instruction in REQUESTS:
        instruct = instruction or DEFAULT_INSTRUCTION
        head = f"{QWEN3_PREFIX}<Instruct>: {instruct}\n<Query>: {query}\n<Document>:"
        for pair, doc in zip(causal.encoder.encode(query, docs, instruction), docs, strict=True):
            text = str(reference.tok.decode(ids_of(pair)))
            assert text.startswith(head)
            assert text.endswith(QWEN3_SUFFIX)
            kept = text[len(head) : len(text) - len(QWEN3_SUFFIX)]
            if pair.truncated:
                # a cut inside a multi-byte character decodes to U+FFFD; drop it
                assert (" " + doc).startswith(kept.rstrip("\ufffd"))
                assert len(kept) < len(doc) + 1
            else:
                assert kept == " " + doc


def test_prompt_too_long_when_query_leaves_no_room(causal: LoadedModel, limit: int) -> None:
    query = "why " * limit
    with pytest.raises(PromptTooLong, match="no room for a document") as info:
        causal.encoder.encode(query, ["a document"], None)
    assert isinstance(info.value, ValueError)


def test_causal_scores_match_model_card(
    causal: LoadedModel, reference: ModelCardReference, tiny_causal_dir: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir)).eval()
    pairs, _ = all_pairs(causal)
    logits = causal.scorer.score(pairs)  # one padded batch of mixed lengths
    scores = causal.scorer.calibrate(logits)
    for pair, logit, score in zip(pairs, logits, scores, strict=True):
        ref_logit, ref_score = reference.causal_logit_and_score(model, ids_of(pair))
        assert logit == pytest.approx(ref_logit, abs=TOL)
        assert score == pytest.approx(ref_score, abs=TOL)
    assert max(scores) - min(scores) > 0.05  # the random model does discriminate


def test_seqcls_scores_match_reference_and_causal(
    causal: LoadedModel, reference: ModelCardReference, tiny_seqcls_dir: Path, limit: int
) -> None:
    seqcls = load_model(ModelOptions(model=str(tiny_seqcls_dir), max_pair_tokens=limit))
    assert seqcls.kind == "seq-cls"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_seqcls_dir)).eval()
    pairs, _ = all_pairs(seqcls)
    assert [p.payload for p in pairs] == [p.payload for p in all_pairs(causal)[0]]
    logits = seqcls.scorer.score(pairs)
    for pair, logit in zip(pairs, logits, strict=True):
        assert logit == pytest.approx(reference.seqcls_logit(model, ids_of(pair)), abs=TOL)
    assert logits == pytest.approx(causal.scorer.score(pairs), abs=TOL)
    assert seqcls.scorer.calibrate(logits) == pytest.approx(
        [1 / (1 + math.exp(-x)) for x in logits], abs=1e-12
    )


def test_scores_do_not_depend_on_batch_composition(causal: LoadedModel) -> None:
    pairs, _ = all_pairs(causal)
    together = causal.scorer.score(pairs)
    alone = [causal.scorer.score([p])[0] for p in pairs]
    reversed_batch = causal.scorer.score(pairs[::-1])[::-1]
    assert alone == pytest.approx(together, abs=TOL)
    assert reversed_batch == pytest.approx(together, abs=TOL)


def test_padded_cost_and_empty_batch(causal: LoadedModel) -> None:
    pairs, _ = all_pairs(causal)
    assert causal.scorer.batch_cost(pairs) == max(p.tokens for p in pairs) * len(pairs)
    assert causal.scorer.batch_cost([]) == 0
    assert causal.scorer.score([]) == []


def test_no_vocabulary_wide_projection_is_kept(causal: LoadedModel, tiny_causal_dir: Path) -> None:
    vocab = len(AutoTokenizer.from_pretrained(str(tiny_causal_dir)))
    scorer = causal.scorer
    assert isinstance(scorer, LastTokenScorer)
    linears = [m for m in scorer._base.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.out_features < vocab for m in linears)


def test_encoder_is_thread_safe(causal: LoadedModel) -> None:
    expected = [causal.encoder.encode(q, d, i) for q, d, i in REQUESTS]
    results: list[object] = [None] * 8

    def work(slot: int) -> None:
        results[slot] = [causal.encoder.encode(q, d, i) for q, d, i in REQUESTS * 5][:3]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


def test_bi_encoder_ranks_relevant_documents_first() -> None:
    loaded = load_model(ModelOptions(model=str(minilm_dir())))
    assert loaded.kind == "bi-encoder"
    cases = [
        (
            "What is the capital of France?",
            "Paris is the capital and largest city of France.",
            "Mitochondria are the powerhouse of the cell.",
        ),
        (
            "How do I bake sourdough bread?",
            "Mix flour, water and a sourdough starter, let it rise overnight, then bake it hot.",
            "The stock market closed higher today after strong earnings reports.",
        ),
    ]
    for query, relevant, irrelevant in cases:
        pairs = loaded.encoder.encode(query, [irrelevant, relevant], None)
        logits = loaded.scorer.score(pairs)
        assert logits[1] > logits[0]
        assert all(-1.0 <= x <= 1.0 + 1e-6 for x in logits)
        assert loaded.scorer.calibrate(logits) == pytest.approx([(x + 1) / 2 for x in logits])
    # two requests in one batch score as they do alone
    first = loaded.encoder.encode(cases[0][0], list(cases[0][1:]), None)
    second = loaded.encoder.encode(cases[1][0], list(cases[1][1:]), None)
    both = loaded.scorer.score(first + second)
    assert both == pytest.approx(loaded.scorer.score(first) + loaded.scorer.score(second), abs=1e-5)


async def test_bi_encoder_replies_scores_in_0_1_ranked_as_the_cosines() -> None:
    """The offline fallback through the engine, as the worker runs it: a document whose
    embedding points away from the query's (cosine < 0) still scores within [0, 1]."""
    from consumer.engine.api import ScoreRequest
    from consumer.engine.engine import Engine

    loaded = load_model(ModelOptions(model=str(minilm_dir())))
    engine = Engine.for_model(loaded)
    await engine.start()
    try:
        request = ScoreRequest(
            "What is the capital of France?",
            (
                "buy cheap shoes online",  # cosine about -0.07 with this query
                "Paris is the capital and largest city of France.",
                "Mitochondria are the powerhouse of the cell.",
                "What is the capital of France?",  # cosine 1 (a hair above, in float32)
            ),
        )
        result = await engine.score(request)
    finally:
        await engine.close()
    cosines = result.logits  # what raw_scores reports
    assert min(cosines) < 0
    assert all(0.0 <= s <= 1.0 for s in result.scores)
    assert result.scores == pytest.approx([(c + 1) / 2 for c in cosines], abs=1e-6)
    by_score = sorted(range(4), key=lambda i: -result.scores[i])
    assert by_score == sorted(range(4), key=lambda i: -cosines[i]) == [3, 1, 2, 0]
    assert loaded.scorer.calibrate([-1.0, 0.0, 1.0]) == [0.0, 0.5, 1.0]


def test_non_qwen_cross_encoder_matches_its_tokenizer_and_model(
    tiny_bert_cross_encoder_dir: Path,
) -> None:
    """bge-reranker style: tokenizer(query, doc, truncation="only_second"), the one logit."""
    folder = str(tiny_bert_cross_encoder_dir)
    loaded = load_model(ModelOptions(model=folder))
    assert loaded.kind == "seq-cls"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    limit = 128  # the tiny model's position table
    query = "what do rockets burn?"
    docs = ["Rockets burn fuel with an oxidizer. " * 30, "Kerosene and liquid oxygen.", "日本語 😀"]
    pairs = loaded.encoder.encode(query, docs, "an instruction these models do not use")
    logits = loaded.scorer.score(pairs)
    for pair, doc, logit in zip(pairs, docs, logits, strict=True):
        ref = tok(query, doc, truncation="only_second", max_length=limit, return_tensors="pt")
        full = tok(query, doc)["input_ids"]
        assert isinstance(pair.payload, TextPairIds)
        assert pair.payload.input_ids == ref["input_ids"][0].tolist()
        assert pair.truncated == (len(full) > limit)
        with torch.no_grad():
            assert logit == pytest.approx(float(model(**ref).logits[0, 0]), abs=TOL)
    assert pairs[0].truncated and not pairs[1].truncated
    assert loaded.scorer.calibrate([0.0]) == [0.5]


def test_prepared_batches_score_like_direct_ones(causal: LoadedModel) -> None:
    """The engine may build a batch's tensors on another thread (prepare) and run it later."""
    scorer = causal.scorer
    assert isinstance(scorer, LastTokenScorer)
    pairs, _ = all_pairs(causal)
    prepared = scorer.prepare(pairs)
    assert scorer.collect(scorer.launch(prepared)) == pytest.approx(scorer.score(pairs), abs=TOL)
    assert scorer.collect(scorer.launch(scorer.prepare([]))) == []
