"""Which characters of a text a run of its tokens covers: the window a split document
reports (:class:`~consumer.runtime.prompt.Window`).

Two ways to know it. :class:`ByteSpans` works from the tokens' byte lengths alone (a
byte-level BPE's tokens are the text's UTF-8 bytes, in order), so the ids the encoder
already has are enough. :class:`OffsetSpans` takes a Hugging Face encoding's character
offsets, which costs a second tokenization of the document. Both give a token that holds
part of a character (an emoji cut over two tokens) that whole character, as the Hugging
Face tokenizer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Protocol


class TokenSpans(Protocol):
    """Character spans of runs of one text's tokens."""

    def span(self, first: int, last: int) -> tuple[int, int]:
        """The characters ``[start, end)`` that tokens ``first`` up to ``last`` (not
        included) cover."""
        ...


class ByteSpans:
    """Spans from each token's length in bytes, the tokens covering ``text`` exactly."""

    def __init__(self, text: str, token_bytes: Sequence[int]) -> None:
        self._token_ends = list(accumulate(token_bytes))  # in bytes
        self._utf8 = None if text.isascii() else text.encode()  # ASCII: bytes are characters

    def span(self, first: int, last: int) -> tuple[int, int]:
        start = self._token_ends[first - 1] if first > 0 else 0
        end = self._token_ends[last - 1]
        if self._utf8 is None:
            return start, end
        # The characters wholly before the first byte; those begun before the end (a cut
        # character decodes to one replacement character).
        before = len(self._utf8[:start].decode(errors="ignore"))
        return before, len(self._utf8[:end].decode(errors="replace"))


class OffsetSpans:
    """Spans from a tokenizer's own per-token character offsets."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        self._offsets = offsets

    def span(self, first: int, last: int) -> tuple[int, int]:
        return self._offsets[first][0], self._offsets[last - 1][1]
