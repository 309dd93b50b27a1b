"""The Kafka service: fetch requests, answer them through the engine, commit what is done.

worker (fetch, commit and rebalance loops) -> processing (one record to one reply) ->
delivery (produce replies and dead-letter records, with reply_router choosing where);
offsets (what may be committed), backpressure (pause/resume), codec (the wire contract),
http_server (health and metrics side-port), metrics (Prometheus).

Talks to the engine only through :mod:`consumer.engine.api`.
"""
