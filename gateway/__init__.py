"""rerank-gateway: the Kafka rerank service behind the HTTP rerank APIs callers already use.

Cohere's ``/v2/rerank`` and ``/v1/rerank``, TEI's ``/rerank`` and the wire contract's own
shape, each turned into one request through Kafka with the SDK (:mod:`producer_sdk`).
Needs the ``gateway`` extra (aiohttp, prometheus-client), not the GPU stack.
"""
