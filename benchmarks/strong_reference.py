"""The strongest reference the engine bench compares with: transformers alone, done well.

What a careful user gets from transformers without this project, scoring a known set of
(query, document) pairs offline:

* the model card's prompt, tokenized up front (timed), a document cut where the prompt
  would pass ``max_tokens`` (8,192 by default, as the model card's ``max_length``);
* pairs sorted by length, cut into padded batches of at most ``budget`` tokens, so little
  padding is computed;
* bf16 on CUDA (float32 on the CPU), SDPA attention, ``torch.compile`` of the base model
  with dynamic shapes where asked (``compile``);
* only the yes/no rows of the LM head, at each pair's last token (one dot product with
  W_yes - W_no), not the whole vocabulary.

Its throughput is an upper bound for such a server: it knows every pair before it starts,
which a server taking requests as they come does not.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

from consumer.runtime.prompt import QWEN3_PREFIX, QWEN3_SUFFIX

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_BUDGET = 32768  # padded tokens a batch


def prompts(requests: list[tuple[str, list[str]]]) -> list[str]:
    """The model card's prompt of every pair, in request order."""
    return [
        f"{QWEN3_PREFIX}<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
        f"{QWEN3_SUFFIX}"
        for query, docs in requests
        for doc in docs
    ]


def length_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut so that longest x count stays within ``budget``
    (a pair longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # sorted ascending: the newest pair is the batch's longest
        if current and lengths[index] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def cut_to(ids: list[list[int]], suffix: list[int], most: int) -> list[list[int]]:
    """Prompts longer than ``most`` tokens with their document cut (the template's
    ``suffix`` kept at the end), as the model card's truncation does."""
    return [x if len(x) <= most else x[: most - len(suffix)] + suffix for x in ids]


def run(
    config: dict[str, Any],
    tokenizer_dir: Path,
    requests: list[tuple[str, list[str]]],
    device: str,
    compile_model: bool,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    max_tokens: int = 8192,
) -> dict[str, Any]:
    """Time the recipe on ``requests``' pairs (a random-weight model of ``config``'s shape)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = Qwen3Model(Qwen3Config(**dict(config, attn_implementation="sdpa")))
        yes_minus_no = torch.randn(config["hidden_size"], dtype=torch.float32)
    model = model.to(dtype).eval()
    forward = torch.compile(model, dynamic=True) if compile_model else model
    texts = prompts(requests)

    @torch.inference_mode()
    def score(ids: list[list[int]]) -> list[float]:
        longest = max(len(x) for x in ids)
        batch = torch.full((len(ids), longest), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            batch[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        hidden = forward(
            input_ids=batch.to(device), attention_mask=mask.to(device)
        ).last_hidden_state
        last = hidden[torch.arange(len(ids), device=device), mask.sum(1).to(device) - 1]
        logits: list[float] = (last.float() @ yes_minus_no).cpu().tolist()
        return logits

    warm_started = time.perf_counter()
    warm_ids = tok(texts[: min(len(texts), 64)])["input_ids"]
    for chunk in length_batches([len(x) for x in warm_ids], budget):  # compile, kernels
        score([warm_ids[i] for i in chunk])
    warm_up_s = time.perf_counter() - warm_started

    started = time.perf_counter()
    ids = cut_to(tok(texts)["input_ids"], tok(QWEN3_SUFFIX)["input_ids"], max_tokens)
    tokenized = time.perf_counter()
    batch_seconds = []
    for chunk in length_batches([len(x) for x in ids], budget):
        t0 = time.perf_counter()
        score([ids[i] for i in chunk])
        batch_seconds.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    model = forward = None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "pairs": len(texts),
        "pairs_per_s": len(texts) / seconds,
        "tokens_per_s": sum(len(x) for x in ids) / seconds,
        "tokenize_s": tokenized - started,
        "batches": len(batch_seconds),
        "batch_p50_ms": 1000 * statistics.median(batch_seconds),
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": compile_model,
        "budget_tokens": budget,
        "max_tokens": max_tokens,
        "warm_up_s": warm_up_s,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.strong_reference``: the recipe alone, one JSON line."""
    import argparse
    import json

    from benchmarks.host import positive_int
    from benchmarks.workload import CONFIGS, default_tokenizer_dir, synthetic_requests

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="0.6b", help="a config.json path, or one of: 0.6b, tiny")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--pairs", type=positive_int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", choices=("on", "off"), default="on")
    p.add_argument("--budget", type=positive_int, default=DEFAULT_BUDGET)
    args = p.parse_args(argv)
    config = json.loads(Path(CONFIGS.get(args.config, args.config)).read_text())
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    requests = synthetic_requests(tokenizer_dir, args.pairs, 8, 0)
    result = run(config, tokenizer_dir, requests, args.device, args.compile == "on", args.budget)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
