"""Prompt building and tokenization: (query, documents) -> token ids per pair.

Pure CPU work, no torch. Encoders are safe to call from several threads at once:
each owns a private copy of the Rust tokenizer whose settings are fixed at
construction, and encoding never mutates it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from tokenizers import Tokenizer

from consumer.runtime.bpe import ByteLevelBpe, UnsupportedTokenizer, byte_level_bpe
from consumer.runtime.token_spans import ByteSpans, OffsetSpans, TokenSpans

log = logging.getLogger(__name__)

# How the Qwen3 encoder turns text into ids: "tiktoken" (the same ids, faster; see
# consumer.runtime.bpe), "huggingface" (the model's own Rust tokenizer), or "auto"
# (tiktoken when it reproduces the tokenizer and is installed, else huggingface).
TOKENIZER_BACKENDS = ("auto", "tiktoken", "huggingface")

QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n"
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class PromptTooLong(ValueError):
    """The fixed part of a prompt (template + instruction + query) leaves no room for a document."""


@dataclass(frozen=True)
class Window:
    """One window of a document split to fit the model: the ``index``-th (from 0) of
    ``count``, covering characters ``start`` up to (not including) ``end`` of the
    document."""

    index: int
    count: int
    start: int
    end: int


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized (query, document) pair.

    ``payload`` is scorer-specific (a ``list[int]`` of prompt ids for the Qwen3
    cross-encoders, :class:`TextPairIds` for other cross-encoders, :class:`BiEncoderIds`
    for bi-encoders); ``tokens`` is its token cost; ``truncated`` says whether the
    document was cut to fit the pair limit; ``shared_prefix`` is how many leading ids of
    the payload are the same for every pair of the request (template, instruction and
    query), which a packed batch computes once (0: none); ``common_prefix`` is how many of
    those are the same for every request with the same instruction (template and
    instruction), which a packed batch computes once for all of them (0: none).
    ``window``: which part of its document the pair holds when the document was split
    into windows (:meth:`Qwen3RerankerEncoder.encode_windows`); None: the whole document
    (or its truncated start).
    """

    payload: object
    tokens: int
    truncated: bool
    shared_prefix: int = 0
    common_prefix: int = 0
    window: Window | None = None

    @property
    def share_points(self) -> tuple[int, int]:
        """Where a packed batch may share this pair's leading ids with other pairs."""
        return (self.common_prefix, self.shared_prefix)


class PromptEncoder(Protocol):
    """Turns one request into one :class:`EncodedPair` per document, in order.

    The encoders here also say what they cut to in ``limit_description`` (for the error
    a request with ``truncate`` false gets), such as "the limit of 8192 tokens per prompt
    (...)"; the engine does without it.
    """

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]: ...


def private_tokenizer(hf_tokenizer: Any) -> Tokenizer:
    """A private copy of a fast tokenizer's Rust backend, with no truncation or padding.

    A copy, so that settings we fix on it can never be changed under us by other code
    calling the shared Hugging Face tokenizer (which reconfigures its backend per call).
    """
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(hf_tokenizer).__name__} has no fast (Rust) tokenizer backend")
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return own


def fast_bpe_for(tokenizer: Tokenizer, backend: str) -> ByteLevelBpe | None:
    """The tiktoken encoder for ``tokenizer`` per ``backend`` (None: use the tokenizer itself).

    ``auto`` falls back to the tokenizer, with a log line saying why; ``tiktoken``
    raises :class:`UnsupportedTokenizer` (or ImportError) instead.
    """
    if backend not in TOKENIZER_BACKENDS:
        raise ValueError(f"tokenizer backend {backend!r}: use one of {TOKENIZER_BACKENDS}")
    if backend == "huggingface":
        return None
    try:
        bpe = byte_level_bpe(tokenizer.to_str())
        bpe.check_against(lambda text: tokenizer.encode(text, add_special_tokens=False).ids)
    except (UnsupportedTokenizer, ImportError) as exc:
        if backend == "tiktoken":
            raise
        log.info("tokenizing with the model's own tokenizer, not tiktoken: %s", exc)
        return None
    return bpe


class Qwen3RerankerEncoder:
    """The Qwen3-Reranker prompt, tokenized the way its model card does it.

    The model card tokenizes ``<Instruct>: ..\\n<Query>: ..\\n<Document>: {doc}`` without
    special tokens and concatenates the ids of PREFIX and SUFFIX around it. Here the
    middle part is split after ``<Document>:`` so the instruction+query head is tokenized
    once per request and the documents in one batch call. The split is exact: the head
    ends with ``:`` and every document part starts with the space, which the Qwen2
    pre-tokenizer always separates, so the ids equal those of the whole string.

    Only document tokens are cut to fit ``max_pair_tokens``. ``backend`` is one of
    :data:`TOKENIZER_BACKENDS`; :attr:`backend` says which one runs.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        max_pair_tokens: int,
        default_instruction: str,
        backend: str = "auto",
    ) -> None:
        self._tok = private_tokenizer(hf_tokenizer)
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets we never use
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self._bpe = fast_bpe_for(self._tok, backend)
        self.backend = "huggingface" if self._bpe is None else "tiktoken"
        self._prefix = self._ids(QWEN3_PREFIX)
        self._suffix = self._ids(QWEN3_SUFFIX)
        self.max_pair_tokens = max_pair_tokens
        self.default_instruction = default_instruction
        self._default_instruction_ids = self._ids(f"<Instruct>: {default_instruction}\n<Query>:")
        self.limit_description = (
            f"the limit of {max_pair_tokens} tokens per prompt (template, instruction, query "
            "and document)"
        )

    def _ids(self, text: str) -> list[int]:
        if self._bpe is not None:
            return self._bpe.encode(text)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _document_ids(self, documents: Sequence[str]) -> list[list[int]]:
        texts = [" " + d for d in documents]
        if self._bpe is not None:
            return self._bpe.encode_many(texts)
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        """Encode every document of one request against the query."""
        head, common, room = self._head(query, instruction)
        return [self._pair(head, common, doc, room) for doc in self._document_ids(documents)]

    def encode_windows(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None,
        overlap: int,
        max_windows: int,
    ) -> list[EncodedPair]:
        """Like :meth:`encode`, but a document too long for the pair limit becomes
        overlapping windows that fit: one pair each, in document order, every one with
        its :class:`Window`. Windows are ``room`` tokens long (the most a document may
        have in one prompt), as few as start at most ``room - overlap`` tokens apart (the
        overlap is at most half a window), spread evenly from the document's start to
        its end; a document needing more than ``max_windows`` keeps the first
        ``max_windows`` at that spacing, the last of them marked truncated. Other
        documents give one pair, as in :meth:`encode`.
        """
        if max_windows < 1 or overlap < 0:
            raise ValueError("max_windows must be at least 1 and overlap not negative")
        head, common, room = self._head(query, instruction)
        stride = room - min(overlap, room // 2)
        pairs: list[EncodedPair] = []
        for text, doc in zip(documents, self._document_ids(documents), strict=True):
            if len(doc) <= room:
                pairs.append(self._pair(head, common, doc, room))
                continue
            ids, spans = self._with_spans(" " + text, doc)
            if len(ids) <= room:  # not if tiktoken's ids are the tokenizer's, as checked
                pairs.append(self._pair(head, common, ids, room))
                continue
            count = 1 + -(-(len(ids) - room) // stride)  # windows at most stride apart
            cut = count > max_windows
            if cut:
                starts = [k * stride for k in range(max_windows)]
            else:  # spread evenly, the last one ending with the document
                starts = [k * (len(ids) - room) // (count - 1) for k in range(count)]
            for k, first in enumerate(starts):
                last = min(first + room, len(ids))
                start, end = spans.span(first, last)
                window = Window(  # less the prompt's leading space
                    index=k, count=len(starts), start=max(0, start - 1), end=max(0, end - 1)
                )
                pair = self._pair(head, common, ids[first:last], room)
                pairs.append(replace(pair, truncated=cut and k == len(starts) - 1, window=window))
        return pairs

    def _with_spans(self, text: str, ids: list[int]) -> tuple[list[int], TokenSpans]:
        """``text``'s ids and where its tokens lie: from the ids' bytes when tiktoken
        made them, else from a second tokenization that reports offsets."""
        if self._bpe is not None and (lengths := self._bpe.token_bytes(text, ids)) is not None:
            return ids, ByteSpans(text, lengths)
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, OffsetSpans(encoding.offsets)

    def _head(self, query: str, instruction: str | None) -> tuple[list[int], int, int]:
        """(template + instruction + query ids, how many of them requests with this
        instruction share, tokens left for a document); PromptTooLong if none are."""
        instruction = self.default_instruction if instruction is None else instruction
        head = self._prefix + self._ids(f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>:")
        common = len(self._prefix) + _common_length(
            head[len(self._prefix) :], self._instruction_ids(instruction)
        )
        room = self.max_pair_tokens - len(head) - len(self._suffix)
        if room < 1:
            raise PromptTooLong(
                f"instruction and query take {len(head) + len(self._suffix)} prompt tokens, "
                f"leaving no room for a document within max_pair_tokens={self.max_pair_tokens}"
            )
        return head, common, room

    def _pair(self, head: list[int], common: int, doc: list[int], room: int) -> EncodedPair:
        """One prompt: the head, the document (cut to ``room``) and the template's end."""
        cut = len(doc) > room
        ids = head + (doc[:room] if cut else doc) + self._suffix
        return EncodedPair(
            payload=ids,
            tokens=len(ids),
            truncated=cut,
            shared_prefix=len(head),
            common_prefix=common,
        )

    def _instruction_ids(self, instruction: str) -> list[int]:
        """Ids of the head up to the query, the part requests with this instruction share."""
        if instruction == self.default_instruction:
            return self._default_instruction_ids
        return self._ids(f"<Instruct>: {instruction}\n<Query>:")


def _common_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class TextPairIds:
    """A tokenizer-native (query, document) pair for non-Qwen3 cross-encoders."""

    input_ids: list[int]
    token_type_ids: list[int]


class TextPairEncoder:
    """Cross-encoders of other families (e.g. bge-reranker): the tokenizer's own pair encoding.

    Equivalent to ``tokenizer(query, doc, truncation="only_second", max_length=...)``; the
    instruction is not part of these models' input and is ignored.
    """

    def __init__(self, hf_tokenizer: Any, max_pair_tokens: int) -> None:
        self._tok = private_tokenizer(hf_tokenizer)
        limit = getattr(hf_tokenizer, "model_max_length", max_pair_tokens) or max_pair_tokens
        self.max_pair_tokens = min(max_pair_tokens, int(limit))
        self._tok.enable_truncation(self.max_pair_tokens, strategy="only_second")
        self.limit_description = (
            f"the limit of {self.max_pair_tokens} tokens per query and document pair"
        )

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        """Encode every document of one request against the query."""
        try:
            encodings = self._tok.encode_batch([(query, d) for d in documents])
        except Exception as exc:  # the Rust tokenizer's error when the query alone is too long
            raise PromptTooLong(
                f"query leaves no room for a document within {self.max_pair_tokens} tokens ({exc})"
            ) from exc
        return [
            EncodedPair(
                payload=TextPairIds(list(e.ids), list(e.type_ids)),
                tokens=len(e.ids),
                truncated=bool(e.overflowing),
            )
            for e in encodings
        ]


@dataclass(frozen=True)
class BiEncoderIds:
    """Separately tokenized query and document for a bi-encoder."""

    query_ids: list[int]
    doc_ids: list[int]


class BiEncoderEncoder:
    """Bi-encoders (sentence-transformers style): query and document are embedded apart.

    Each text is cut to ``max_seq_tokens`` (the model's max_seq_length); the instruction
    is ignored. A pair is ``truncated`` when its document was cut, or the query was (then
    every pair of the request is).
    """

    def __init__(self, hf_tokenizer: Any, max_seq_tokens: int) -> None:
        self._tok = private_tokenizer(hf_tokenizer)
        self.max_seq_tokens = max_seq_tokens
        self._tok.enable_truncation(max_seq_tokens)
        self.limit_description = f"the limit of {max_seq_tokens} tokens per query or document"

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        """Encode the query once and every document."""
        encoded_query = self._tok.encode(query)
        q = list(encoded_query.ids)
        query_cut = bool(encoded_query.overflowing)
        return [
            EncodedPair(
                payload=BiEncoderIds(q, list(e.ids)),
                tokens=len(q) + len(e.ids),
                truncated=query_cut or bool(e.overflowing),
            )
            for e in self._tok.encode_batch(list(documents))
        ]
