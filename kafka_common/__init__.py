"""Kafka plumbing shared by the SDK, the worker and the gateway.

The connection's security options (:mod:`kafka_common.security`) and their command-line
flags (:mod:`kafka_common.cli_args`), the check that tells why a broker cannot be reached
(:mod:`kafka_common.connect_check`), and the trace context and messaging attribute names
of rerank records (:mod:`kafka_common.tracing`). Nothing here knows the rerank contract.
"""
