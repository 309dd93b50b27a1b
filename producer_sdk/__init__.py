"""Client SDK of the Kafka rerank service.

::

    from producer_sdk import RerankClient

    async with RerankClient(bootstrap_servers="kafka:9092") as client:
        result = await client.rerank("what is kafka?", ["a distributed log", "a novelist"])
        for item in result:
            print(item.index, item.score)
"""

from kafka_common.security import KafkaSecurity
from producer_sdk.client import ClientStats, RerankClient
from producer_sdk.errors import (
    ClientClosed,
    ClientStartError,
    DeliveryError,
    InvalidArgument,
    MalformedReply,
    RerankError,
    RerankErrorReply,
    RerankTimeout,
)
from producer_sdk.result import DocumentWindow, RankedDocument, RerankResult, Timing, Usage
from producer_sdk.retry import NO_RETRY, RetryPolicy
from producer_sdk.sync_client import SyncRerankClient

__all__ = [
    "NO_RETRY",
    "ClientClosed",
    "ClientStartError",
    "ClientStats",
    "DeliveryError",
    "DocumentWindow",
    "InvalidArgument",
    "KafkaSecurity",
    "MalformedReply",
    "RankedDocument",
    "RerankClient",
    "RerankError",
    "RerankErrorReply",
    "RerankResult",
    "RerankTimeout",
    "RetryPolicy",
    "SyncRerankClient",
    "Timing",
    "Usage",
]
