"""Byte-level BPE through tiktoken, giving the same ids as the model's own tokenizer.

Qwen2/Qwen3 tokenizers are byte-level BPE: an NFC normalizer, one pre-tokenizing regex,
byte-to-unicode mapping, and merges whose order is the rank of the token they make.
tiktoken runs exactly that recipe faster than the Hugging Face tokenizer and releases the
GIL while it works, so a long request's documents are split over a few threads. On a
16-core H200 host (``python -m benchmarks.lone_path``, docs/benchmarks.md) an
8-document request took 1.1 ms against 2.6, and a 4-thread pool encoded 4.7 M tokens/s
against 2.8 M.

:func:`byte_level_bpe` reads a tokenizer's JSON and builds the tiktoken equivalent, or
says why it cannot (:class:`UnsupportedTokenizer`): any normalizer, pre-tokenizer or
model option outside that recipe. Before it is used, :meth:`ByteLevelBpe.check_against`
compares both on a sample of hard strings, and the unit tests compare them on tens of
thousands more.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def usable_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process can keep busy: its affinity mask (a container's cpuset, taskset),
    cut to its cgroup's CPU quota when it has one (a Kubernetes CPU limit), at least 1.

    ``os.cpu_count()`` counts the host's CPUs whatever the container may use.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        cpus = os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))  # rounded up
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, cpus)


# Threads that help the calling one with a long request (none with one usable CPU).
HELPER_THREADS = max(0, min(3, usable_cpus() - 1))
# Characters of text worth handing to another thread: about 0.3 ms of tiktoken's work,
# a few times what the hand-over costs.
MIN_CHARS_PER_THREAD = 2000

# Strings that exercise the pre-tokenizer's corners: contractions in any case, digit
# runs, whitespace before and after newlines, combining marks that NFC composes, a
# special token with a combining mark after it, emoji sequences and CJK.
CHECK_STRINGS = (
    " The quick brown fox jumps over the lazy dog.",
    "I'M here, we'RE there; THEY'LL go. It's 12345 o'clock!",
    "  \n\n  indented\r\n\ttabbed   \n",
    "e\u0301 vs \u00e9, A\u030a, \ufb01, \u2460\u00b2",
    "<|im_end|>\u0338 a<|im_start|>b <|endoftext|>",
    "\U0001f642\U0001f44d\U0001f3fd\u200d \u4e2d\u6587\u65e5\u672c\u8a9e\ud55c\uad6d\uc5b4",
    "x" * 300 + " " + "1234567890" * 20,
    "\u00a0\u3000\u2028 mixed\u000bspaces\u000c",
)


class UnsupportedTokenizer(ValueError):
    """The tokenizer is not a byte-level BPE that tiktoken reproduces."""


def _bytes_of_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class ByteLevelBpe:
    """Encodes text to the ids of a byte-level BPE tokenizer, added tokens included.

    Added tokens (``<|im_end|>`` and the like) are cut out of the text first and mapped
    to their ids, as the Hugging Face tokenizer does; each piece between them is NFC
    normalized (when the tokenizer normalizes) and encoded by tiktoken.
    """

    def __init__(
        self,
        pattern: str,
        ranks: dict[bytes, int],
        added: dict[str, int],
        normalize: bool,
        helper_threads: int = HELPER_THREADS,
    ) -> None:
        import tiktoken

        self._encoding = tiktoken.Encoding(
            "byte-level-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )
        self._encode_ordinary: Callable[[str], list[int]] = self._encoding.encode_ordinary
        self._added = added
        longest_first = sorted(added, key=len, reverse=True)
        self._added_pattern = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if added else None
        )
        self._normalize = normalize
        self._token_bytes = _token_byte_lengths(ranks, added)
        self._helper_threads = helper_threads
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None
        self._helpers_lock = threading.Lock()
        self._helpers_busy = False

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no special tokens added around it)."""
        if self._added_pattern is None:
            return self._encode_piece(text)
        ids: list[int] = []
        for i, piece in enumerate(self._added_pattern.split(text)):
            if i % 2:  # the split keeps the matched added tokens at odd positions
                ids.append(self._added[piece])
            elif piece:
                ids.extend(self._encode_piece(piece))
        return ids

    def token_bytes(self, text: str, ids: Sequence[int]) -> list[int] | None:
        """Each token's length in bytes, ``ids`` being :meth:`encode`'s of ``text``; None
        when those bytes are not ``text``'s own (normalizing changed it)."""
        if self._normalize and not unicodedata.is_normalized("NFC", text):
            return None
        return [self._token_bytes[i] for i in ids]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text, in order.

        Texts long enough together are cut into runs, and all but the first run are
        encoded on helper threads while this thread encodes the first (when no other
        call has the helpers).
        """
        runs = split_runs(texts, self._helper_threads + 1, MIN_CHARS_PER_THREAD)
        if len(runs) == 1 or not self._claim_helpers():
            return self._encode_run(texts)
        try:
            helpers = self._helper_pool()
            futures = [helpers.submit(self._encode_run, run) for run in runs[1:]]
            ids = self._encode_run(runs[0])
            for future in futures:
                ids.extend(future.result())
            return ids
        finally:
            self._helpers_busy = False

    def _encode_run(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def _claim_helpers(self) -> bool:
        """Whether the helpers are free, taking them if so.

        One request at a time: under load every calling thread is busy with a request
        of its own, and splitting them all would only add hand-overs.
        """
        with self._helpers_lock:
            if self._helpers_busy:
                return False
            self._helpers_busy = True
            return True

    def _helper_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._helpers_lock:  # made on first use: most encoders never need one
            if self._helpers is None:
                self._helpers = concurrent.futures.ThreadPoolExecutor(
                    self._helper_threads, thread_name_prefix="bpe-helper"
                )
            return self._helpers

    def _encode_piece(self, text: str) -> list[int]:
        if self._normalize and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self._encode_ordinary(text)

    def check_against(
        self, reference: Callable[[str], Sequence[int]], strings: Iterable[str] = CHECK_STRINGS
    ) -> None:
        """Raise :class:`UnsupportedTokenizer` if any string's ids differ from ``reference``'s."""
        for text in strings:
            expected = list(reference(text))
            got = self.encode(text)
            if got != expected:
                raise UnsupportedTokenizer(
                    f"tiktoken gives different ids for {text[:40]!r}: {got[:8]} against "
                    f"{expected[:8]}"
                )


def split_runs(texts: Sequence[str], most: int, min_chars: int) -> list[Sequence[str]]:
    """``texts`` cut into at most ``most`` consecutive runs of about equal length, each
    of at least about ``min_chars`` characters (one run when they are short)."""
    total = sum(map(len, texts))
    count = max(1, min(most, len(texts), total // max(1, min_chars)))
    if count == 1:
        return [texts]
    runs: list[Sequence[str]] = []
    start, length = 0, 0
    for i, text in enumerate(texts):
        length += len(text)
        # close a run once it holds its share, leaving a text for each run still to come
        if (
            length * count >= total * (len(runs) + 1)
            and len(texts) - i - 1 >= count - len(runs) - 1
        ):
            runs.append(texts[start : i + 1])
            start = i + 1
            if len(runs) == count - 1:
                break
    runs.append(texts[start:])
    return [run for run in runs if run]


def byte_level_bpe(tokenizer_json: str, helper_threads: int = HELPER_THREADS) -> ByteLevelBpe:
    """The tiktoken equivalent of a Hugging Face ``tokenizer.json`` (see module doc).

    Raises :class:`UnsupportedTokenizer` (with the reason) for anything else, and
    ImportError when tiktoken is not installed.
    """
    spec = json.loads(tokenizer_json)
    normalize = _nfc_or_nothing(spec.get("normalizer"))
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    ranks = _ranks(spec.get("model") or {})
    added = _added_tokens(spec.get("added_tokens") or [])
    return ByteLevelBpe(pattern, ranks, added, normalize, helper_threads)


def _token_byte_lengths(ranks: dict[bytes, int], added: dict[str, int]) -> list[int]:
    """Each id's length in bytes (an added token's: its text's)."""
    lengths = [0] * (1 + max([*ranks.values(), *added.values()], default=-1))
    for token, i in ranks.items():
        lengths[i] = len(token)
    for text, i in added.items():
        lengths[i] = len(text.encode())
    return lengths


def _nfc_or_nothing(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None:
        return False
    if normalizer.get("type") == "NFC":
        return True
    raise UnsupportedTokenizer(f"normalizer {normalizer.get('type')!r} (only NFC or none)")


def _split_pattern(pre_tokenizer: dict[str, Any] | None) -> str:
    """The regex of a Sequence[Split(regex, Isolated), ByteLevel(use_regex=False)]."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or []
    if (pre_tokenizer or {}).get("type") != "Sequence" or len(steps) != 2:
        raise UnsupportedTokenizer("pre-tokenizer is not a regex split then byte-level")
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or regex is None
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        raise UnsupportedTokenizer("pre-tokenizer's first step is not an isolating regex split")
    if (
        byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex")
        or byte_level.get("add_prefix_space")
    ):
        raise UnsupportedTokenizer("pre-tokenizer's second step is not a plain byte-level map")
    return str(regex)


def _ranks(model: dict[str, Any]) -> dict[bytes, int]:
    """Each token's bytes and id, when merge order is the order of the ids they make.

    tiktoken merges the adjacent pair whose joined token has the lowest id; the Hugging
    Face BPE merges the pair listed first. They agree when the merges list is sorted by
    the ids of the tokens it makes.
    """
    if model.get("type") != "BPE":
        raise UnsupportedTokenizer(f"model {model.get('type')!r} (only BPE)")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise UnsupportedTokenizer(f"BPE option {option}={model[option]!r}")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        raise UnsupportedTokenizer("BPE with byte_fallback or ignore_merges")
    vocab: dict[str, int] = model.get("vocab") or {}
    alphabet = _bytes_of_unicode()
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()}
    except KeyError as exc:
        raise UnsupportedTokenizer(f"a vocabulary token outside the byte alphabet: {exc}") from None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        raise UnsupportedTokenizer("the vocabulary does not hold each byte once")
    made = [vocab.get("".join(_merge_parts(m)), -1) for m in model.get("merges") or []]
    if -1 in made or made != sorted(made):
        raise UnsupportedTokenizer("merges are not in the order of the ids they make")
    return ranks


def _merge_parts(merge: str | list[str]) -> list[str]:
    """A merge as its two parts (tokenizer.json writes "a b" or ["a", "b"])."""
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _added_tokens(added: list[dict[str, Any]]) -> dict[str, int]:
    """Added tokens, matched as plain strings in the raw text."""
    tokens = {}
    for token in added:
        if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
            raise UnsupportedTokenizer(f"added token {token.get('content')!r} with stripping rules")
        tokens[str(token["content"])] = int(token["id"])
    return tokens
