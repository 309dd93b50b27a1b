"""The packed forward's own math on the CPU: layout, shared heads, rotary.

FlashAttention itself only runs on CUDA; here a plain SDPA stand-in with the same
contract (bottom-right causal per segment, grouped-query heads) takes its place. The
kernel is checked against the model card on a GPU by ``python -m benchmarks.gpu_check``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from varlen_reference import piecewise_causal_attention, segment_causal_attention

from consumer.runtime.last_token import LastTokenScorer, stream_tokens
from consumer.runtime.loader import LoadedModel, load_model
from consumer.runtime.options import ModelOptions
from consumer.runtime.prompt import EncodedPair
from consumer.runtime.qwen3.forward import PackedQwen3
from consumer.runtime.qwen3.graphs import (
    DEFAULT_TOKENS,
    PackedGraphs,
    lay_out,
    make_buckets,
    token_sizes_up_to,
)
from consumer.runtime.qwen3.layout import PackedInputs, pack

TOL = 1e-5
REQUESTS = [
    ("What is the capital of China?", ["Beijing is.", "Gravity " * 30, "x"], None),
    ("北京有什么好吃的？", ["北京烤鸭是北京最有名的菜。" * 4, "Peking duck 🦆🔥"], "Chinese food"),
    ("lonely query", ["a single document"], None),
]


@pytest.fixture(scope="module")
def causal(tiny_causal_dir: Path) -> LoadedModel:
    return load_model(ModelOptions(model=str(tiny_causal_dir), max_pair_tokens=96))


# the two attention contracts: keys gathered first, or read from the stream in pieces
KEYS = ["gathered", "pieces"]


def packed_model(base: object, keys: str, **options: object) -> PackedQwen3:
    if keys == "pieces":
        options["piecewise_attention"] = piecewise_causal_attention
    else:
        options["attention"] = segment_causal_attention
    return PackedQwen3(base, "cpu", **options)  # type: ignore[arg-type]


def scorer_of(loaded: LoadedModel) -> LastTokenScorer:
    assert isinstance(loaded.scorer, LastTokenScorer)
    return loaded.scorer


def encoded(loaded: LoadedModel) -> list[EncodedPair]:
    return [p for q, docs, i in REQUESTS for p in loaded.encoder.encode(q, docs, i)]


def ids(pairs: list[EncodedPair]) -> list[list[int]]:
    out = []
    for pair in pairs:
        assert isinstance(pair.payload, list)
        out.append(pair.payload)
    return out


@pytest.mark.parametrize("keys", KEYS)
def test_packed_forward_matches_padded_path(causal: LoadedModel, keys: str) -> None:
    scorer = scorer_of(causal)
    seqs = ids(encoded(causal))
    padded = scorer.last_hidden(seqs)
    packed = packed_model(scorer._base, keys)
    assert torch.allclose(packed.last_hidden(seqs), padded, atol=TOL)
    one = packed.last_hidden(seqs[:1])
    assert one.shape[0] == 1 and torch.allclose(one, padded[:1], atol=TOL)


@pytest.mark.parametrize("keys", KEYS)
def test_shared_heads_compute_what_full_sequences_do(causal: LoadedModel, keys: str) -> None:
    """Each request's template+instruction+query runs once; scores are unchanged."""
    scorer = scorer_of(causal)
    pairs = encoded(causal)
    assert all(p.shared_prefix > 0 for p in pairs)
    # interleave the requests: grouping must not depend on the pairs being adjacent
    order = [0, 3, 5, 1, 4, 2]
    pairs = [pairs[i] for i in order]
    seqs = ids(pairs)
    packed = packed_model(scorer._base, keys)
    inputs = packed.prepare(seqs, [p.shared_prefix for p in pairs])
    assert inputs.shared
    assert inputs.ids.numel() < sum(len(s) for s in seqs)
    padded = scorer.last_hidden(seqs)
    assert torch.allclose(packed.last_hidden_prepared(inputs), padded, atol=TOL)


@pytest.mark.parametrize("keys", KEYS)
def test_template_and_instruction_shared_across_requests(causal: LoadedModel, keys: str) -> None:
    """With cut points, requests of the same instruction share the template+instruction
    stretch once, each request its query once; scores are unchanged."""
    scorer = scorer_of(causal)
    pairs = encoded(causal)
    first, chinese, lonely = pairs[0], pairs[3], pairs[5]
    # the two requests with the default instruction agree up to their common prefix
    assert first.common_prefix == lonely.common_prefix > 0
    assert ids([first])[0][: first.common_prefix] == ids([lonely])[0][: lonely.common_prefix]
    assert 0 < first.common_prefix < first.shared_prefix
    assert chinese.common_prefix < chinese.shared_prefix  # a custom instruction
    order = [0, 3, 5, 1, 4, 2]
    pairs = [pairs[i] for i in order]
    seqs = ids(pairs)
    packed = packed_model(scorer._base, keys)
    per_request = packed.prepare(seqs, [p.shared_prefix for p in pairs])
    inputs = packed.prepare(seqs, [p.share_points for p in pairs])
    # the default instruction's template + instruction is in the stream once, not twice
    assert inputs.ids.numel() == per_request.ids.numel() - first.common_prefix
    padded = scorer.last_hidden(seqs)
    assert torch.allclose(packed.last_hidden_prepared(inputs), padded, atol=TOL)


def test_pack_layout_with_two_cut_points() -> None:
    """Two requests share [1, 2, 3]; each its own next stretch; the tails hang below."""
    inputs = pack(
        [[1, 2, 3, 10, 11, 7], [1, 2, 3, 20, 8], [1, 2, 3, 10, 11, 9, 9]],
        [(3, 5), (3, 4), (3, 5)],
    )
    # [1 2 3] once, then request A's [10 11] and its tails, then B (alone below [1 2 3])
    assert inputs.ids.tolist() == [1, 2, 3, 10, 11, 7, 9, 9, 20, 8]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 3, 4]
    assert inputs.cu_q.tolist() == [0, 3, 5, 6, 8, 10]
    assert inputs.kv_index is not None
    assert inputs.kv_index.tolist() == [
        0, 1, 2,  # [1 2 3] sees itself
        0, 1, 2, 3, 4,  # [10 11] sees [1 2 3] and itself
        0, 1, 2, 3, 4, 5,  # tail [7]
        0, 1, 2, 3, 4, 6, 7,  # tail [9 9]
        0, 1, 2, 8, 9,  # B's [20 8]: below [1 2 3] it is alone, so all its own
    ]  # fmt: skip
    assert inputs.last.tolist() == [5, 9, 7]
    assert inputs.last_cu_k.tolist() == [0, 6, 11, 18]
    # the same keys as stream ranges: (start, length), padded with empty pieces
    assert inputs.key_pieces.tolist() == [
        [[0, 3], [0, 0], [0, 0]],
        [[0, 3], [3, 2], [0, 0]],
        [[0, 3], [3, 2], [5, 1]],
        [[0, 3], [3, 2], [6, 2]],
        [[0, 3], [8, 2], [0, 0]],
    ]
    assert inputs.last_key_pieces.tolist() == [
        [[0, 3], [3, 2], [5, 1]],
        [[0, 3], [8, 2], [0, 0]],
        [[0, 3], [3, 2], [6, 2]],
    ]


def test_pack_refuses_more_cut_points_than_key_pieces() -> None:
    with pytest.raises(ValueError, match="at most 2 cut points"):
        pack([[1, 2, 3, 4, 5]], [(1, 2, 3)])


def test_cut_points_that_all_members_agree_on_make_one_segment() -> None:
    """A group that agrees through the next cut point too gets one segment, not a chain."""
    inputs = pack([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]], [(2, 4), (2, 4)])
    assert inputs.cu_q.tolist() == [0, 4, 5, 6]  # [1 2 3 4], then the two tails
    assert inputs.ids.tolist() == [1, 2, 3, 4, 5, 6]


def test_pack_layout_with_a_shared_head() -> None:
    inputs = pack([[5, 6, 7, 8], [5, 6, 9], [1, 2]], [2, 2, 0])
    assert inputs.ids.tolist() == [5, 6, 7, 8, 9, 1, 2]  # head 5 6 once, then the tails
    assert inputs.positions.tolist() == [0, 1, 2, 3, 2, 0, 1]  # tails continue the head
    assert inputs.cu_q.tolist() == [0, 2, 4, 5, 7]
    assert inputs.cu_k.tolist() == [0, 2, 6, 9, 11]  # head, head+tail, head+tail, solo
    assert inputs.kv_index is not None
    assert inputs.kv_index.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 6]
    assert inputs.last.tolist() == [3, 4, 6]
    assert (inputs.max_q, inputs.max_k) == (2, 4)
    assert inputs.cu_q.dtype == inputs.cu_k.dtype == torch.int32
    # the last layer: one query per pair, its keys = its head and its own tail
    assert inputs.last_cu_q.tolist() == [0, 1, 2, 3]
    assert inputs.last_cu_k.tolist() == [0, 4, 7, 9]
    assert inputs.last_kv_index is not None
    assert inputs.last_kv_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6]


def test_last_layer_keys_follow_pair_order_not_stream_order() -> None:
    """Pairs 0 and 2 share a head, so the stream holds pair 1 last; the last layer's
    rows and keys must still come in the batch's pair order."""
    inputs = pack([[1, 2, 3], [7, 8], [1, 2, 4]], [2, 0, 2])
    assert inputs.ids.tolist() == [1, 2, 3, 4, 7, 8]
    assert inputs.last.tolist() == [2, 5, 3]
    assert inputs.last_cu_k.tolist() == [0, 3, 5, 8]
    assert inputs.last_kv_index is not None
    assert inputs.last_kv_index.tolist() == [0, 1, 2, 4, 5, 0, 1, 3]


def test_pack_without_sharing_uses_the_stream_as_keys() -> None:
    inputs = pack([[5, 6, 7], [8], [9, 10]])
    assert inputs.ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert inputs.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert inputs.cu_q.tolist() == inputs.cu_k.tolist() == [0, 3, 4, 6]
    assert inputs.kv_index is None and not inputs.shared
    assert inputs.last.tolist() == [2, 3, 5]
    assert (inputs.max_q, inputs.max_k) == (3, 3)
    assert inputs.last_kv_index is None  # pairs in stream order: keys are the stream
    assert inputs.last_cu_k.tolist() == inputs.cu_k.tolist()


def test_pack_never_shares_a_whole_sequence() -> None:
    """A head leaves every member a token of its own; a lone pair shares nothing."""
    inputs = pack([[1, 2, 3], [1, 2, 3, 4], [7, 8]], [3, 3, 1])
    assert inputs.ids.tolist() == [1, 2, 3, 3, 4, 7, 8]  # head clipped to [1, 2]
    assert inputs.last.tolist() == [2, 4, 6]
    assert inputs.cu_k.tolist() == [0, 2, 5, 9, 11]


@pytest.mark.parametrize("keys", KEYS)
def test_bucket_layout_computes_the_same_rows(causal: LoadedModel, keys: str) -> None:
    """A batch laid out in a CUDA graph's fixed shapes (unused tokens and empty segments
    at the end) gives the same hidden states as the batch itself."""
    scorer = scorer_of(causal)
    pairs = encoded(causal)
    packed = packed_model(scorer._base, keys)
    inputs = packed.prepare(ids(pairs), [p.share_points for p in pairs])
    bucket = next(b for b in PackedGraphs().buckets if b.fits(inputs))
    laid = lay_out(inputs, bucket).inputs
    assert laid.ids.numel() == bucket.tokens
    assert laid.kv_index is not None and laid.kv_index.numel() == bucket.keys
    assert laid.last_kv_index is not None and laid.last_kv_index.numel() == bucket.keys
    assert laid.cu_q.numel() == laid.cu_k.numel() == bucket.segments + 1
    assert laid.last_cu_q.numel() == laid.last_cu_k.numel() == bucket.segments + 1
    assert laid.cu_q[-1] == inputs.ids.numel()  # trailing tokens belong to no segment
    assert laid.last_cu_q[-1] == len(pairs)  # unused pair slots are empty segments
    assert laid.key_pieces.shape[0] == laid.last_key_pieces.shape[0] == bucket.segments
    rows = packed.hidden_at(laid)
    assert torch.allclose(rows[: len(pairs)], packed.last_hidden_prepared(inputs), atol=TOL)


@pytest.mark.parametrize("share", [False, True])
def test_bucket_layout_is_one_block_holding_every_padded_tensor(share: bool) -> None:
    """lay_out writes every input into one block of bytes: each tensor's values, then
    its padding (unused tokens 0, empty segments repeating the last bound, keys of the
    stream itself when nothing is gathered)."""
    seqs = [[5, 6, 7], [5, 6, 8, 9], [4, 4]]
    inputs = pack(seqs, [2, 2, 0] if share else None)
    bucket = make_buckets([512])[0]
    laid = lay_out(inputs, bucket)
    views = laid.inputs
    assert laid.count == 3 and laid.block.dtype == torch.uint8
    for name, view in zip(PackedInputs.TENSORS, views.tensors(), strict=True):
        assert view is not None
        assert view.untyped_storage().data_ptr() == laid.block.untyped_storage().data_ptr(), name
    tokens = inputs.ids.numel()
    stream = torch.arange(tokens)

    def padded(t: torch.Tensor | None, size: int, fill: int) -> list[int]:
        values = (stream if t is None else t).tolist()
        return values + [fill] * (size - len(values))

    bounds = bucket.segments + 1
    assert views.ids.tolist() == padded(inputs.ids, bucket.tokens, 0)
    assert views.positions.tolist() == padded(inputs.positions, bucket.tokens, 0)
    assert views.cu_q.tolist() == padded(inputs.cu_q, bounds, tokens)
    assert views.cu_k.tolist() == padded(inputs.cu_k, bounds, int(inputs.cu_k[-1]))
    assert views.kv_index is not None and views.last_kv_index is not None
    assert views.kv_index.tolist() == padded(inputs.kv_index, bucket.keys, 0)
    assert views.last.tolist() == padded(inputs.last, bucket.segments, 0)
    assert views.last_cu_q.tolist() == padded(inputs.last_cu_q, bounds, 3)
    assert views.last_cu_k.tolist() == padded(inputs.last_cu_k, bounds, int(inputs.last_cu_k[-1]))
    assert views.last_kv_index.tolist() == padded(inputs.last_kv_index, bucket.keys, 0)
    for name in ("key_pieces", "last_key_pieces"):
        given, view = getattr(inputs, name), getattr(views, name)
        assert view.shape == (bucket.segments, *given.shape[1:])
        assert torch.equal(view[: given.shape[0]], given)
        assert not view[given.shape[0] :].any()  # empty pieces
    assert inputs.shared == share


def test_batches_that_fit_no_bucket_run_without_a_graph() -> None:
    graphs = PackedGraphs(make_buckets([512]))
    small = pack([[1] * 100, [2] * 100])
    assert graphs.fit(small) is None  # nothing captured yet
    (bucket,) = graphs.buckets
    assert (bucket.tokens, bucket.max_segment, bucket.segments) == (512, 512, 512 // 64 + 8)
    assert bucket.fits(small)
    assert not bucket.fits(pack([[1] * 600]))  # more tokens than the bucket
    assert not bucket.fits(pack([[1] * 10] * 30))  # more segments than 512 // 64 + 8


def test_buckets_come_smallest_first_with_two_segment_lengths() -> None:
    buckets = make_buckets([1024, 512])
    shapes = [(b.tokens, b.max_segment) for b in buckets]
    assert shapes == [(512, 512), (1024, 512), (1024, 1024)]
    long_pair = pack([[1] * 700, [2] * 100])  # one segment longer than 512
    assert next(b for b in buckets if b.fits(long_pair)).max_segment == 1024


def test_graph_sizes_follow_the_largest_asked_for() -> None:
    assert token_sizes_up_to(8192) == DEFAULT_TOKENS
    larger = token_sizes_up_to(16384)
    assert larger[: len(DEFAULT_TOKENS)] == DEFAULT_TOKENS
    assert larger[len(DEFAULT_TOKENS) :] == tuple(range(9216, 16384 + 1, 1024))
    assert token_sizes_up_to(10000)[-2:] == (9216, 10000)  # the largest is always a bucket
    assert token_sizes_up_to(4000)[-2:] == (3840, 4000)
    assert token_sizes_up_to(512) == (512,)
    with pytest.raises(ValueError, match="at least 512"):
        token_sizes_up_to(511)


def test_pack_refuses_an_empty_sequence() -> None:
    """An empty pair would have no last token of its own (it would read its neighbour's)."""
    with pytest.raises(ValueError, match="at least one token"):
        pack([[1, 2], []])


def test_every_tensor_field_is_moved_and_pinned() -> None:
    """TENSORS lists every tensor of a batch, so moving it to the GPU misses none."""
    inputs = pack([[1, 2, 3], [1, 2, 4]], [2, 2])
    tensors = {name for name, value in vars(inputs).items() if isinstance(value, torch.Tensor)}
    assert tensors == set(PackedInputs.TENSORS)
    moved = inputs.moved("meta")
    assert all(t is None or t.device.type == "meta" for t in moved.tensors())


def test_short_pairs_below_a_clipped_stretch_keep_three_key_pieces_at_most() -> None:
    """Pairs shorter than their cut points: the shared stretch is clipped and nothing is
    shared below it, so no pair's keys need more than three pieces."""
    seqs = [[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 9]]
    inputs = pack(seqs, [(2, 3)] * 4)
    assert inputs.ids.tolist()[:2] == [1, 2]  # shared, clipped to leave [3] to the first
    for keys, seq in zip(inputs.last_key_pieces.tolist(), seqs, strict=True):
        rows = [r for start, n in keys for r in range(start, start + n)]
        assert inputs.ids[rows].tolist() == seq  # each pair's keys are exactly its ids


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [0, 3, 5, 1, 4, 2], [5, 4, 3, 2, 1, 0]])
def test_stream_tokens_is_the_packed_stream_or_more(causal: LoadedModel, order: list[int]) -> None:
    """The batcher's cost of a packed batch: never less than the stream the layout builds
    (so a batch within a graph's tokens fits it); in request order it misses only the
    template + instruction that the first and last request share without being neighbours."""
    pairs = [encoded(causal)[i] for i in order]
    stream = pack(ids(pairs), [p.share_points for p in pairs]).ids.numel()
    cost = stream_tokens(pairs)
    assert cost >= stream
    if order == sorted(order):
        assert cost == stream + pairs[0].common_prefix
    assert cost < sum(p.tokens for p in pairs)  # the heads are not counted per pair
    assert stream_tokens(pairs[:1]) == pairs[0].tokens


def test_the_packed_scorer_counts_stream_tokens(causal: LoadedModel) -> None:
    pairs = encoded(causal)
    scorer = scorer_of(causal)
    assert not scorer.traits.packed  # the tiny model on the CPU runs padded
    assert scorer.batch_cost(pairs) == max(p.tokens for p in pairs) * len(pairs)
    packed = LastTokenScorer(
        "causal-lm",
        scorer._base,
        scorer._head,
        0.0,
        0,
        "cpu",
        "float32",
        packed=packed_model(scorer._base, "pieces"),
    )
    assert packed.batch_cost(pairs) == stream_tokens(pairs)
    assert packed.traits.quick_batch_cost == 0  # no graphs captured


def test_the_packed_forward_runs_in_inference_mode_by_itself(causal: LoadedModel) -> None:
    """No autograd state whoever calls it (a decorator once slipped onto the method above)."""
    scorer = scorer_of(causal)
    pairs = encoded(causal)
    packed = packed_model(scorer._base, "pieces")
    hidden = packed.last_hidden_prepared(
        packed.prepare(ids(pairs), [p.share_points for p in pairs])
    )
    assert hidden.is_inference()
    assert packed.graph_tokens() == 0  # no graphs on the CPU
