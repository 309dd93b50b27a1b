"""Read torch's GPU memory counters into the ``rerank_gpu_memory_bytes`` gauge."""

from __future__ import annotations

import sys

from prometheus_client import Gauge


def refresh_gpu_memory(gauge: Gauge, device: str) -> None:
    """Set ``gauge{kind=allocated|reserved|peak_allocated}`` for a cuda ``device``.

    Does nothing for other devices, or when torch was never imported (the model is
    not loaded yet), so a scrape never pays for importing torch.
    """
    if not device.startswith("cuda"):
        return
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gauge.labels(kind="allocated").set(torch.cuda.memory_allocated(device))
    gauge.labels(kind="reserved").set(torch.cuda.memory_reserved(device))
    gauge.labels(kind="peak_allocated").set(torch.cuda.max_memory_allocated(device))
