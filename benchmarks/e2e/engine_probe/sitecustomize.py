"""A diagnostic, loaded only when this folder is on PYTHONPATH (e2e_bench --engine-probe):
writes, for every request the worker's engine scores, where its time went inside the
engine, one JSON line each, to the file named by RERANK_ENGINE_PROBE.

It wraps engine methods that the code before and after the latency-aware batching both
have (``Engine.score`` and ``_open``, ``BatchQueue.cut``/``offer``/``take``,
``InferenceLoop._deliver``), so one harness measures both sides the same way. The stages
of a request, in milliseconds (for a request split over batches, its last batch):

* ``tokenize``: ``score()`` called -> its pairs queued;
* ``wait``: queued -> cut into a batch by the batch former;
* ``form``: cut -> prepared and handed over (the scorer's ``prepare``);
* ``handoff``: handed over -> taken by the inference thread;
* ``behind``: taken -> the batch's model time starts (its launch, then the batches ahead
  of it on the device);
* ``model``: the batch's own model time (what the worker's metrics count);
* ``to_loop``: results read -> the request resolved on the event loop;
* ``resume``: resolved -> ``score()`` returns.

Each line also has ``key`` (the request's query and documents, hashed as the e2e bench
hashes what it sends: the bench joins the lines to its own timings by it), ``t`` (Unix
time of the call), ``pairs`` (the last batch's pairs) and ``batches``.
"""

import atexit
import contextvars
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

_PATH = os.environ.get("RERANK_ENGINE_PROBE", "")
_FLUSH_S = 0.5


def request_key(query: str, documents: "list[str] | tuple[str, ...]") -> str:
    """What the bench and the probe both call a request (its text, hashed)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(query.encode())
    for document in documents:
        digest.update(b"\x1e" + document.encode())
    return digest.hexdigest()


def _install(path: str) -> None:
    from consumer.engine import engine as engine_module
    from consumer.engine import handoff, inference

    out = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed at exit
    lock = threading.Lock()
    current: contextvars.ContextVar[object] = contextvars.ContextVar("rerank_probe_pending")
    # per request (by id of its PendingRequest): when its pairs reached each step
    cut_at: dict[int, float] = {}
    offered_at: dict[int, float] = {}
    taken_at: dict[int, float] = {}
    model_from: dict[int, float] = {}
    collected_at: dict[int, float] = {}

    def stamp(table: dict[int, float], tickets: Iterable[Any], when: float) -> None:
        for ticket in tickets:
            table[id(ticket.request)] = when

    original_cut = handoff.BatchQueue.cut

    def cut(self):
        formed = original_cut(self)
        if formed is not None and formed.items:
            stamp(cut_at, formed.items, time.perf_counter())
        return formed

    original_offer = handoff.BatchQueue.offer

    def offer(self, batch):
        stamp(offered_at, batch.tickets, time.perf_counter())
        return original_offer(self, batch)

    original_take = handoff.BatchQueue.take

    def take(self, device_done):
        batch = original_take(self, device_done)
        if batch is not None:
            stamp(taken_at, batch.tickets, time.perf_counter())
        return batch

    original_deliver = inference.InferenceLoop._deliver

    def deliver(self, tickets, logits, scores, started):
        now = time.perf_counter()
        for ticket in tickets:
            model_from[id(ticket.request)] = started
            collected_at[id(ticket.request)] = now
        return original_deliver(self, tickets, logits, scores, started)

    original_open = engine_module.Engine._open

    def open_(self, pairs, deadline):
        pending = original_open(self, pairs, deadline)
        current.set(pending)
        return pending

    original_score = engine_module.Engine.score

    async def score(self, request):
        called, wall = time.perf_counter(), time.time()
        current.set(None)
        try:
            result = await original_score(self, request)
        except BaseException:
            _forget(current.get())
            raise
        returned = time.perf_counter()
        pending = current.get()
        if pending is not None and result.batches:
            record = _record(pending, called, returned)
            if record is not None:
                record["key"] = request_key(request.query, request.documents)
                record["t"] = round(wall, 4)
                record["pairs"] = result.batches[-1].pairs
                record["batches"] = len(result.batches)
                line = json.dumps(record, separators=(",", ":"))
                with lock:
                    out.write(line + "\n")
        _forget(pending)
        return result

    def _record(pending, called: float, returned: float):
        key = id(pending)
        points = [
            called,
            pending.enqueued,
            cut_at.get(key),
            offered_at.get(key),
            taken_at.get(key),
            model_from.get(key),
            collected_at.get(key),
            pending.finished,
            returned,
        ]
        if any(p is None for p in points):
            return None
        names = ("tokenize", "wait", "form", "handoff", "behind", "model", "to_loop", "resume")
        return {
            name: round((later - earlier) * 1000, 3)
            for name, earlier, later in zip(names, points, points[1:], strict=False)
        }

    def _forget(pending: object) -> None:
        if pending is None:
            return
        key = id(pending)
        for table in (cut_at, offered_at, taken_at, model_from, collected_at):
            table.pop(key, None)

    def flush_now() -> None:
        with lock:
            out.flush()

    def flush_often() -> None:
        while True:
            time.sleep(_FLUSH_S)
            flush_now()

    for owner, name, wrapper in (
        (handoff.BatchQueue, "cut", cut),
        (handoff.BatchQueue, "offer", offer),
        (handoff.BatchQueue, "take", take),
        (inference.InferenceLoop, "_deliver", deliver),
        (engine_module.Engine, "_open", open_),
        (engine_module.Engine, "score", score),
    ):
        setattr(owner, name, wrapper)
    atexit.register(flush_now)
    threading.Thread(target=flush_often, name="engine-probe-flush", daemon=True).start()


if _PATH:
    _install(_PATH)
