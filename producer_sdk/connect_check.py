"""Why a Kafka client could not bootstrap, in words.

aiokafka's ``start()`` raises a bare ``KafkaConnectionError("Unable to bootstrap from
[...]")`` and only logs the cause (a refused connection, a failed SASL login) on its own
logger. :func:`bootstrap_failure` asks the bootstrap servers once more, directly, so the
error the SDK raises and the line the worker logs can name the cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaError

from producer_sdk.security import KafkaSecurity

# Asking costs one connection per server, on a path that already failed: a few will do.
_MOST_SERVERS_ASKED = 3


async def bootstrap_failure(
    bootstrap_servers: str | Sequence[str],
    security: KafkaSecurity,
    client_id: str,
    timeout_s: float = 5.0,
) -> str | None:
    """Each bootstrap server's connection error (``host:port: reason``), ``; ``-joined.

    None when every server asked connects now (the failure was passing, or not a login).
    """
    hosts = collect_hosts(bootstrap_servers, randomize=False)[:_MOST_SERVERS_ASKED]
    reasons: list[str] = []
    for host, port, _family in hosts:
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(
                    host, port, client_id=client_id, **security.aiokafka_kwargs()
                )
        except TimeoutError:
            reasons.append(f"{host}:{port}: no answer within {timeout_s:g} s")
        except (OSError, KafkaError) as exc:
            reasons.append(f"{host}:{port}: {str(exc) or type(exc).__name__}")
        else:
            conn.close()
    return "; ".join(reasons) or None
