"""tiktoken against the real Qwen3 tokenizer: the same ids, or a refusal that says why."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from tiny_models import qwen3_tokenizer_dir
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from consumer.runtime.bpe import (
    CHECK_STRINGS,
    MIN_CHARS_PER_THREAD,
    UnsupportedTokenizer,
    byte_level_bpe,
    split_runs,
)
from consumer.runtime.loader import ModelLoadError, load_model
from consumer.runtime.options import DEFAULT_INSTRUCTION, ModelOptions
from consumer.runtime.prompt import TOKENIZER_BACKENDS, Qwen3RerankerEncoder, fast_bpe_for
from consumer.runtime.token_spans import ByteSpans

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen_json() -> str:
    return (qwen3_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer.from_file(str(qwen3_tokenizer_dir() / "tokenizer.json"))


def random_text(tokenizer: Tokenizer, rng: random.Random, least: int, most: int) -> str:
    """Between ``least`` and ``most`` random vocabulary tokens, decoded (the bench's text)."""
    count = rng.randint(least, most)
    return str(tokenizer.decode([rng.randrange(1000, 100_000) for _ in range(count)]))


def varied_texts(tokenizer: Tokenizer, seed: int) -> list[str]:
    """Decoded random vocabulary (the bench's documents), this repository's own source
    and docs in slices, random characters from every plane, and random bytes."""
    rng = random.Random(seed)
    texts = [
        tokenizer.decode([rng.randrange(0, 151_643) for _ in range(rng.randint(1, 200))])
        for _ in range(200)
    ]
    texts += [random_text(tokenizer, rng, 40, 480) for _ in range(300)]
    sources = sorted(ROOT.glob("consumer/**/*.py")) + sorted(ROOT.glob("docs/*.md"))
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for _ in range(10):
            start = rng.randrange(len(text))
            texts.append(text[start : start + rng.randint(1, 2000)])
    corners = (
        " \t\n\r\x0b\x0c\u00a0\u3000'sStTdDmMlLrReEvV0123456789.,!?-_<>|/\\\"\u00e9e\u0301\u0338"
    )
    corners += (
        "A\u030a\u00df\u4e2d\u6587\ud55c\U0001f642\U0001f44d\U0001f3fd\u200d\u2028\ufb01\u2460"
    )
    texts += ["".join(rng.choices(corners, k=rng.randint(1, 40))) for _ in range(3000)]
    texts += [
        "".join(chr(c) for c in rng.choices(range(0x20, 0xD800), k=rng.randint(1, 30)))
        + "".join(chr(c) for c in rng.choices(range(0xE000, 0x30000), k=rng.randint(1, 30)))
        for _ in range(1000)
    ]
    texts += [rng.randbytes(rng.randint(1, 60)).decode("utf-8", "replace") for _ in range(500)]
    return texts + list(CHECK_STRINGS) + ["<|im_end|><|im_start|>", "<think>\n\n</think>"]


def test_tiktoken_gives_the_qwen3_tokenizers_ids(qwen: Tokenizer, qwen_json: str) -> None:
    bpe = byte_level_bpe(qwen_json)
    texts = varied_texts(qwen, seed=7)
    differ = [t for t in texts if bpe.encode(t) != qwen.encode(t, add_special_tokens=False).ids]
    assert len(texts) > 5000
    assert differ == []


def test_added_tokens_in_text_become_their_ids(qwen: Tokenizer, qwen_json: str) -> None:
    bpe = byte_level_bpe(qwen_json)
    ids = bpe.encode("a<|im_end|>b")
    assert qwen.token_to_id("<|im_end|>") in ids
    # NFC would fold ">" and the combining solidus into one character; the token comes first
    assert bpe.encode("<|im_end|>\u0338")[0] == qwen.token_to_id("<|im_end|>")


def test_both_backends_encode_requests_the_same(qwen: Tokenizer) -> None:
    hf = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    rng = random.Random(3)
    requests = [
        (random_text(qwen, rng, 2, 30), [random_text(qwen, rng, 0, 300) for _ in range(8)])
        for _ in range(40)
    ]
    for limit in (192, 8192):  # 192: most documents are cut
        fast = Qwen3RerankerEncoder(hf, limit, DEFAULT_INSTRUCTION, "tiktoken")
        own = Qwen3RerankerEncoder(hf, limit, DEFAULT_INSTRUCTION, "huggingface")
        assert (fast.backend, own.backend) == ("tiktoken", "huggingface")
        for query, docs in requests:
            for instruction in (None, "Find the passage 📄"):
                assert fast.encode(query, docs, instruction) == own.encode(query, docs, instruction)


def with_spec(qwen_json: str, change: Any) -> str:
    spec = json.loads(qwen_json)
    change(spec)
    return json.dumps(spec)


def _merges_swapped(spec: dict[str, Any]) -> None:
    merges = spec["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]


UNSUPPORTED = {
    "normalizer": (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC'"),
    "dropout": (lambda s: s["model"].update(dropout=0.1), "dropout"),
    "inverted split": (
        lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(invert=True),
        "isolating regex split",
    ),
    "byte-level regex": (
        lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(use_regex=True),
        "plain byte-level map",
    ),
    "stripped added token": (
        lambda s: s["added_tokens"][0].update(lstrip=True),
        "stripping rules",
    ),
    "merges out of order": (_merges_swapped, "order of the ids"),
    "word piece": (lambda s: s["model"].update(type="WordPiece"), "only BPE"),
}


@pytest.mark.parametrize("case", UNSUPPORTED, ids=list(UNSUPPORTED))
def test_a_tokenizer_outside_the_recipe_is_refused_with_its_reason(
    qwen_json: str, case: str
) -> None:
    change, reason = UNSUPPORTED[case]
    with pytest.raises(UnsupportedTokenizer, match=reason):
        byte_level_bpe(with_spec(qwen_json, change))


def test_the_start_check_catches_different_ids(qwen_json: str) -> None:
    bpe = byte_level_bpe(qwen_json)
    with pytest.raises(UnsupportedTokenizer, match="different ids"):
        bpe.check_against(lambda text: [0])


def test_auto_falls_back_to_the_models_tokenizer_and_says_why(
    qwen_json: str, caplog: pytest.LogCaptureFixture
) -> None:
    odd = Tokenizer.from_str(with_spec(qwen_json, lambda s: s.update(normalizer={"type": "NFKC"})))
    with caplog.at_level(logging.INFO, logger="consumer.runtime.prompt"):
        assert fast_bpe_for(odd, "auto") is None
    assert "not tiktoken: normalizer 'NFKC'" in caplog.text
    assert fast_bpe_for(odd, "huggingface") is None
    with pytest.raises(UnsupportedTokenizer):
        fast_bpe_for(odd, "tiktoken")
    with pytest.raises(ValueError, match="tokenizer backend 'fast'"):
        fast_bpe_for(odd, "fast")


def test_the_loader_refuses_tiktoken_for_a_tokenizer_it_cannot_reproduce(
    tiny_causal_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_causal_dir, folder)
    spec = folder / "tokenizer.json"
    spec.write_text(with_spec(spec.read_text(), lambda s: s["model"].update(dropout=0.1)))
    # transformers rebuilds a Qwen2Tokenizer's pipeline from its vocabulary; the generic
    # class loads tokenizer.json as written
    config = folder / "tokenizer_config.json"
    config.write_text(
        with_spec(config.read_text(), lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast"))
    )
    with pytest.raises(ModelLoadError, match=r"cannot tokenize with tiktoken: .*dropout"):
        load_model(ModelOptions(model=str(folder), tokenizer_backend="tiktoken"))
    loaded = load_model(ModelOptions(model=str(folder)))
    assert getattr(loaded.encoder, "backend", None) == "huggingface"


def test_the_loader_picks_tiktoken_for_the_qwen3_tokenizer(tiny_causal_dir: Path) -> None:
    loaded = load_model(ModelOptions(model=str(tiny_causal_dir)))
    assert getattr(loaded.encoder, "backend", None) == "tiktoken"


def test_the_setting_offers_exactly_the_encoders_backends() -> None:
    from typing import get_args

    from consumer.settings import TokenizerBackend

    assert get_args(TokenizerBackend) == TOKENIZER_BACKENDS


def test_split_runs_keeps_order_and_balances_the_text() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        texts = ["x" * rng.randint(0, 3000) for _ in range(rng.randint(0, 12))]
        most = rng.randint(1, 5)
        runs = split_runs(texts, most, 2000)
        assert [t for run in runs for t in run] == texts
        assert 1 <= len(runs) <= most and all(runs[1:])
        if sum(map(len, texts)) < 4000:  # not enough for two runs of 2,000
            assert len(runs) == 1
    even = ["y" * 1000] * 8
    assert [len(run) for run in split_runs(even, 4, 2000)] == [2, 2, 2, 2]


def test_a_long_request_split_over_helper_threads_keeps_its_ids(
    qwen: Tokenizer, qwen_json: str
) -> None:
    bpe = byte_level_bpe(qwen_json, helper_threads=3)
    rng = random.Random(11)
    docs = [" " + random_text(qwen, rng, 40, 480) for _ in range(8)]
    assert len(split_runs(docs, 4, MIN_CHARS_PER_THREAD)) == 4
    expected = [qwen.encode(d, add_special_tokens=False).ids for d in docs]
    for _ in range(20):
        assert bpe.encode_many(docs) == expected


def test_concurrent_long_requests_share_the_helpers_and_keep_their_ids(
    qwen: Tokenizer, qwen_json: str
) -> None:
    bpe = byte_level_bpe(qwen_json, helper_threads=2)
    rng = random.Random(13)
    requests = [[" " + random_text(qwen, rng, 200, 480) for _ in range(6)] for _ in range(4)]
    expected = [[qwen.encode(d, add_special_tokens=False).ids for d in docs] for docs in requests]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda k: [bpe.encode_many(requests[k % 4]) for _ in range(10)], range(8))
        )
    assert all(got == [expected[k % 4]] * 10 for k, got in enumerate(results))


def test_usable_cpus_follow_the_affinity_mask_and_the_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's CPU limit, not the host's count, sizes the helper threads."""
    from consumer.runtime import bpe

    monkeypatch.setattr(bpe.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    limit = tmp_path / "cpu.max"
    assert bpe.usable_cpus(str(tmp_path / "absent")) == 16  # no cgroup v2 here
    limit.write_text("max 100000\n")
    assert bpe.usable_cpus(str(limit)) == 16  # no quota
    limit.write_text("150000 100000\n")
    assert bpe.usable_cpus(str(limit)) == 2  # 1.5 CPUs: two threads can share them
    limit.write_text("50000 100000\n")
    assert bpe.usable_cpus(str(limit)) == 1
    monkeypatch.setattr(bpe.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    limit.write_text("max 100000\n")
    assert bpe.usable_cpus(str(limit)) == 1  # pinned to one CPU


LONG_PARTS = [
    "Kafka keeps one key's records in one partition. ",
    "日本語のテキスト、",
    "a😀b 🧑\u200d🚀 ",
    "𠜎𠜱𡿺",
    "<|im_end|>",
    "\n\n  tabs\tand  spaces ",
    "e\u0301 combining ",
    "Ω≈ç√∫ ",
]


def long_documents(qwen: Tokenizer) -> list[str]:
    """Documents of many windows: mixed scripts, characters cut over tokens, an added
    token, text NFC would change, and the bench's decoded random vocabulary."""
    rng = random.Random(5)
    mixed = [
        "".join(rng.choice(LONG_PARTS) for _ in range(rng.randint(20, 120))) for _ in range(30)
    ]
    return mixed + [random_text(qwen, rng, 300, 900) for _ in range(10)]


def test_windows_are_the_same_from_either_backend(qwen: Tokenizer) -> None:
    hf = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    documents = long_documents(qwen)
    for limit in (96, 160):
        fast = Qwen3RerankerEncoder(hf, limit, DEFAULT_INSTRUCTION, "tiktoken")
        own = Qwen3RerankerEncoder(hf, limit, DEFAULT_INSTRUCTION, "huggingface")
        got = fast.encode_windows("which partition?", documents, None, 16, 64)
        assert got == own.encode_windows("which partition?", documents, None, 16, 64)
        assert sum(p.window is not None and p.window.count > 3 for p in got) > 100


def test_tiktoken_windows_need_no_second_tokenization(qwen: Tokenizer) -> None:
    hf = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    fast = Qwen3RerankerEncoder(hf, 96, DEFAULT_INSTRUCTION, "tiktoken")
    calls: list[str] = []

    class Watched:  # the encoder's own tokenizer, every call noted
        def __init__(self, inner: Tokenizer) -> None:
            self._inner = inner

        def encode(self, text: str, **kwargs: Any) -> Any:
            calls.append(text)
            return self._inner.encode(text, **kwargs)

    fast._tok = Watched(fast._tok)  # type: ignore[assignment]
    documents = [d for d in long_documents(qwen) if "e\u0301" not in d]
    pairs = fast.encode_windows("which partition?", documents, None, 16, 64)
    assert len(pairs) > 5 * len(documents)  # split: many windows each
    assert calls == []


def test_a_token_holding_part_of_a_character_covers_all_of_it() -> None:
    # " a😀b": " a" (2 bytes), the emoji's 4 bytes cut in two, "b"
    spans = ByteSpans(" a😀b", [2, 2, 2, 1])
    assert [spans.span(k, k + 1) for k in range(4)] == [(0, 2), (2, 3), (2, 3), (3, 4)]
    assert spans.span(1, 4) == (2, 4)
    assert ByteSpans(" ab", [2, 1]).span(1, 2) == (2, 3)  # ASCII: bytes are characters
