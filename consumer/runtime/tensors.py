"""Host tensor helpers shared by the scorers: right padding, pinned memory, uploads."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) as right-padded int64 CPU tensors."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    return ids, mask.long()


def pinned(t: torch.Tensor, device: str) -> torch.Tensor:
    """Page-locked copy for an asynchronous host-to-GPU copy; unchanged for a CPU device."""
    return t.pin_memory() if device.startswith("cuda") else t


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """Copy to the device (asynchronously when ``t`` is pinned)."""
    return t.to(device, non_blocking=True)
