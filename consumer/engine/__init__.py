"""The scoring engine: requests in, scores out, pairs of many requests batched on one model.

api (what the service sees) -> engine (the event-loop side: score, close, readiness) ->
former (batch former thread, over the token-budget batcher) -> inference (inference
thread: launch/collect pipeline, out-of-memory policy) -> the runtime's scorer.

Imports the model runtime's interfaces (:mod:`consumer.runtime.scorer`,
:mod:`consumer.runtime.prompt`), never torch or the Kafka service.
"""
