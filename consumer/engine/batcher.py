"""Token-budget micro-batch formation (pure Python, no torch, no threads).

Pairs from every request in flight share one queue. A batch is cut from a
length-sorted window of the oldest pending pairs and is bounded by its padded token
cost (``max_batch_tokens``) and by ``max_batch_pairs``:

* The batch always contains the oldest live pair (the *anchor*) plus the pairs of
  the window closest to it in length. So no pair can be starved by a stream of
  shorter ones: the oldest pair is served by the very next batch, and a pair with
  ``k`` live pairs ahead of it is served within ``k + 1`` batches.
* Growth stops like text-embeddings-inference's queue: a pair joins only if the
  batch's cost *with* it stays within the budget (for the default cost,
  ``max_len * (n + 1) > max_batch_tokens`` stops the batch). A single pair over the
  budget still goes alone, so nothing waits forever.
* Pairs whose deadline has passed are taken out (those met while filling the window)
  and returned separately, so they never reach the model.

The cost function is injected (the scorer knows whether it pads or packs); it must
be monotone: adding a pair never makes a batch cheaper.

Quick batches. A scorer may issue batches up to some cost far more cheaply than bigger
ones (a CUDA graph replays a whole forward at once; above it every layer is issued from
Python, which can take longer than the device work of a mid-sized batch). While the queue
holds less than ``quick_backlog`` such batches' worth of tokens, batches are cut no bigger
than ``quick_batch_cost``: under a moderate load every batch is quick, and a batch just
over the quick size, slow to issue, never makes the next one bigger still. A larger
backlog gets the full budget, whose batches use the device best.

Length order only pays when rows are padded. For a packed (padding-free) scorer the
batcher takes pairs in arrival order instead (``by_length=False``): the pairs of one
request then stay together, so their shared prefix is computed once, and requests are
served first come, first served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

DEFAULT_MAX_BATCH_TOKENS = 65536
DEFAULT_MAX_BATCH_PAIRS = 512
# Enough pairs to find close length neighbours; bounds the sort done per batch.
DEFAULT_WINDOW_PAIRS = 4096
# Queued tokens, in quick batches, above which batches take the full budget again.
DEFAULT_QUICK_BACKLOG = 4.0


class BatchItem(Protocol):
    """What the batcher reads from a queued pair."""

    @property
    def tokens(self) -> int:
        """Prompt tokens of the pair."""
        ...

    @property
    def deadline(self) -> float | None:
        """Absolute Unix time after which the pair is worthless, or None."""
        ...


ItemT = TypeVar("ItemT", bound=BatchItem)

CostFunction = Callable[[Sequence[ItemT]], int]


def longest_times_count(items: Sequence[BatchItem]) -> int:
    """Padded cost of a batch: every row is padded to the longest pair."""
    if not items:
        return 0
    return max(item.tokens for item in items) * len(items)


@dataclass(frozen=True)
class FormedBatch(Generic[ItemT]):
    """The outcome of one :meth:`TokenBudgetBatcher.next_batch` call.

    ``items`` are sorted by length (shortest first), or in arrival order when the
    batcher does not order by length; ``expired`` were removed from
    the queue because their deadline passed; ``cost`` is the batch's cost.
    """

    items: list[ItemT]
    expired: list[ItemT]
    cost: int


class TokenBudgetBatcher(Generic[ItemT]):
    """Queue of pending pairs that cuts token-budget batches. Not thread-safe.

    Args:
        max_batch_tokens: budget of one batch, in cost units (padded tokens by default).
        max_batch_pairs: most pairs in one batch.
        cost: cost of a candidate batch; must be monotone. Default: longest * count.
        window_pairs: how many of the oldest pending pairs are considered per batch.
        by_length: batch pairs of close lengths (padded scorers); False: oldest first.
        quick_backlog: below this many quick batches' worth of queued tokens, cut quick
            batches (see the module's doc); 0: always the full budget.

    :attr:`quick_batch_cost` (0: none) is the scorer's, set once it is known.
    """

    def __init__(
        self,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
        cost: CostFunction[ItemT] | None = None,
        window_pairs: int = DEFAULT_WINDOW_PAIRS,
        by_length: bool = True,
        quick_backlog: float = DEFAULT_QUICK_BACKLOG,
    ) -> None:
        if max_batch_pairs < 1:
            raise ValueError("max_batch_pairs must be at least 1")
        if window_pairs < 1:
            raise ValueError("window_pairs must be at least 1")
        if quick_backlog < 0:
            raise ValueError("quick_backlog must not be negative")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self._cost: CostFunction[ItemT] = cost if cost is not None else longest_times_count
        self._window_pairs = max(window_pairs, max_batch_pairs)
        self.by_length = by_length
        self.quick_backlog = quick_backlog
        self.quick_batch_cost = 0
        # A dict keeps insertion order (= age) and removes in O(1).
        self._pending: dict[ItemT, None] = {}
        self._pending_tokens = 0

    @property
    def max_batch_tokens(self) -> int:
        """Current budget of one batch (lowered by the engine after an out-of-memory)."""
        return self._max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        self._max_batch_tokens = value

    def batch_budget(self) -> int:
        """The budget of the next batch: the quick size under a small backlog, else full."""
        quick = self.quick_batch_cost
        if 0 < quick < self._max_batch_tokens and (
            self._pending_tokens <= quick * self.quick_backlog
        ):
            return quick
        return self._max_batch_tokens

    def past_quick_backlog(self) -> bool:
        """True when the scorer has a quick size and the queue holds more than the quick
        backlog, so the next batch gets the full budget."""
        quick = self.quick_batch_cost
        return 0 < quick < self._max_batch_tokens and self.batch_budget() != quick

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending_tokens(self) -> int:
        """Sum of the real tokens of all pending pairs."""
        return self._pending_tokens

    def oldest(self) -> ItemT | None:
        """The pair waiting longest, or None when the queue is empty."""
        return next(iter(self._pending), None)

    def add(self, item: ItemT) -> None:
        """Queue one pair (newest)."""
        if item in self._pending:
            raise ValueError("pair is already queued")
        self._pending[item] = None
        self._pending_tokens += item.tokens

    def add_many(self, items: Iterable[ItemT]) -> None:
        """Queue pairs in the given order."""
        for item in items:
            self.add(item)

    def remove(self, item: ItemT) -> bool:
        """Take a pair out of the queue (its caller went away); False if it wasn't queued."""
        if item not in self._pending:
            return False
        del self._pending[item]
        self._pending_tokens -= item.tokens
        return True

    def drain(self) -> list[ItemT]:
        """Remove and return every pending pair, oldest first."""
        items = list(self._pending)
        self._pending.clear()
        self._pending_tokens = 0
        return items

    def would_fill_batch(self) -> bool:
        """True when the queue holds at least one full batch (no point waiting for more)."""
        return (
            len(self._pending) >= self.max_batch_pairs
            or self._pending_tokens >= self.batch_budget()
        )

    def next_batch(self, now: float) -> FormedBatch[ItemT]:
        """Cut the next batch; ``now`` is the current Unix time (for deadlines)."""
        window, expired = self._scan_window(now)
        for item in expired:
            self.remove(item)
        if not window:
            return FormedBatch([], expired, 0)
        if self.by_length:
            by_length = sorted(window, key=_tokens)  # stable: equal lengths stay oldest first
            growth = _nearest_first(by_length, anchor=window[0])
        else:
            growth = window
        size, cost = self._largest_affordable(growth, self.batch_budget())
        batch = sorted(growth[:size], key=_tokens) if self.by_length else growth[:size]
        for item in batch:
            self.remove(item)
        return FormedBatch(batch, expired, cost)

    def _scan_window(self, now: float) -> tuple[list[ItemT], list[ItemT]]:
        """The oldest live pairs (up to the window size) and the expired pairs seen."""
        window: list[ItemT] = []
        expired: list[ItemT] = []
        for item in self._pending:
            deadline = item.deadline
            if deadline is not None and deadline <= now:
                expired.append(item)
                continue
            window.append(item)
            if len(window) >= self._window_pairs:
                break
        return window, expired

    def _largest_affordable(self, growth: list[ItemT], budget: int) -> tuple[int, int]:
        """Largest prefix of ``growth`` within ``budget`` (at least 1), and its cost.

        Binary search is valid because the cost is monotone; it finds the same size
        as adding pairs one by one until the next one would break the budget.
        """
        low, high = 1, min(len(growth), self.max_batch_pairs)
        low_cost = self._cost(growth[:1])
        while low < high:
            mid = (low + high + 1) // 2
            mid_cost = self._cost(growth[:mid])
            if mid_cost <= budget:
                low, low_cost = mid, mid_cost
            else:
                high = mid - 1
        return low, low_cost


def _tokens(item: BatchItem) -> int:
    return item.tokens


def _nearest_first(by_length: list[ItemT], anchor: ItemT) -> list[ItemT]:
    """``by_length`` reordered: the anchor, then the pairs closest to it in length.

    Every prefix is a contiguous run of the length-sorted list around the anchor, so
    a batch made of a prefix has the least padding possible for its size.
    """
    position = next(i for i, item in enumerate(by_length) if item is anchor)
    target = anchor.tokens
    order = [anchor]
    below, above = position - 1, position + 1
    while below >= 0 or above < len(by_length):
        take_below = above >= len(by_length) or (
            below >= 0 and target - by_length[below].tokens <= by_length[above].tokens - target
        )
        if take_below:
            order.append(by_length[below])
            below -= 1
        else:
            order.append(by_length[above])
            above += 1
    return order
