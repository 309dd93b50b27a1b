"""A worker process for the chaos tests: ``python chaos_worker.py [flags]``.

It is the real service, as ``python -m consumer`` runs it (settings from flags and
``RERANK_*`` variables, logging, the HTTP side-port, signals, draining, stepping aside,
exit codes), with one stand-in: a GPU-less engine, so that several workers fit on a
2-core CI machine. The engine scores deterministically after ``CHAOS_DELAY_S`` seconds,
fails for good after ``CHAOS_FAIL_AFTER`` requests (unset: never), and kills the process
on the query ``__kill_process__`` (a crash in native code).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import zlib
from typing import Any

from consumer.app import Parts, main, make_kafka_worker
from consumer.engine.api import EngineFailed, ScoreRequest, ScoreResult

KILL_QUERY = "__kill_process__"
MODEL_NAME = "chaos-fake-model"


def chaos_logit(query: str, document: str) -> float:
    """The stand-in model's relevance logit of one pair, in [-5, 5]."""
    return (zlib.crc32(f"{query}\x00{document}".encode()) % 10_001) / 1000.0 - 5.0


class ChaosEngine:
    """A :class:`consumer.engine.api.RerankEngine` without a model."""

    def __init__(self, delay_s: float, fail_after: int | None) -> None:
        self._delay_s = delay_s
        self._fail_after = fail_after
        self._scored = 0
        self._in_flight = 0
        self._started = False
        self.failure: str | None = None

    @property
    def model_name(self) -> str:
        return MODEL_NAME

    @property
    def ready(self) -> bool:
        return self._started and self.failure is None

    @property
    def in_flight_pairs(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if request.query == KILL_QUERY:
            os._exit(70)
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self._fail_after is not None and self._scored >= self._fail_after:
            self.failure = "the model failed its check batch (chaos)"
            raise EngineFailed(self.failure)
        self._in_flight += len(request.documents)
        try:
            await asyncio.sleep(self._delay_s)
        finally:
            self._in_flight -= len(request.documents)
        self._scored += 1
        logits = tuple(chaos_logit(request.query, d) for d in request.documents)
        return ScoreResult(
            logits=logits,
            scores=tuple(1.0 / (1.0 + math.exp(-x)) for x in logits),
            prompt_tokens=sum(len(d) for d in request.documents),
            truncated=tuple(False for _ in request.documents),
            queue_ms=0.0,
            inference_ms=self._delay_s * 1000.0,
        )


class _Model:
    name = MODEL_NAME
    device = "cpu"


def chaos_parts() -> Parts:
    """The real service's parts, with the chaos engine in place of the model's."""
    delay_s = float(os.environ.get("CHAOS_DELAY_S", "0.01"))
    fail_after = os.environ.get("CHAOS_FAIL_AFTER")

    def load(_settings: Any) -> Any:
        return _Model()

    def engine(*_args: Any) -> Any:
        return ChaosEngine(delay_s, int(fail_after) if fail_after else None)

    return Parts(load_model=load, make_engine=engine, make_worker=make_kafka_worker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], chaos_parts()))
