"""Prompt building and tokenization: (query, documents) -> token ids per pair.

Pure CPU work, no torch. Encoders are safe to call from several threads at once:
each owns a private copy of the Rust tokenizer whose settings never change after
construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class PromptTooLong(ValueError):
    """The fixed part of a prompt (template + instruction + query) leaves no room for a document."""


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized (query, document) pair.

    ``payload`` is scorer-specific (a ``list[int]`` of prompt ids for the Qwen3
    cross-encoders); ``tokens`` is its token cost; ``truncated`` says whether the
    document was cut to fit the pair limit.
    """

    payload: object
    tokens: int
    truncated: bool


class PromptEncoder(Protocol):
    """Turns one request into one :class:`EncodedPair` per document, in order."""

    def encode(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]: ...
