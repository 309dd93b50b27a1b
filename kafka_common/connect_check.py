"""Why a Kafka client could not bootstrap, in words.

aiokafka's ``start()`` raises a bare ``KafkaConnectionError("Unable to bootstrap from
[...]")`` and only logs the cause (a refused connection, a failed SASL login) on its own
logger. :func:`bootstrap_failure` asks the bootstrap servers once more, directly, so the
error the SDK raises and the line the worker logs can name the cause.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError

from kafka_common.security import KafkaSecurity

# Asking costs one connection per server, on a path that already failed: a few will do.
_MOST_SERVERS_ASKED = 3


@dataclass(frozen=True)
class BootstrapDiagnosis:
    """Why bootstrapping failed (None: every server asked connects now), and whether
    waiting may help: a broker that is down or unreachable may come back; a refused
    login or a certificate that does not verify will not."""

    reason: str | None
    transient: bool


async def diagnose_bootstrap(
    bootstrap_servers: str | Sequence[str],
    security: KafkaSecurity,
    client_id: str,
    timeout_s: float = 5.0,
) -> BootstrapDiagnosis:
    """Each bootstrap server's connection error (``host:port: reason``), ``; ``-joined."""
    hosts = collect_hosts(bootstrap_servers, randomize=False)[:_MOST_SERVERS_ASKED]
    reasons: list[str] = []
    transient = True
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
            transient = transient and _may_pass(exc)
        else:
            conn.close()
    return BootstrapDiagnosis("; ".join(reasons) or None, transient)


async def bootstrap_failure(
    bootstrap_servers: str | Sequence[str],
    security: KafkaSecurity,
    client_id: str,
    timeout_s: float = 5.0,
) -> str | None:
    """Each bootstrap server's connection error (``host:port: reason``), ``; ``-joined.

    None when every server asked connects now (the failure was passing, or not a login).
    """
    diagnosis = await diagnose_bootstrap(bootstrap_servers, security, client_id, timeout_s)
    return diagnosis.reason


def _may_pass(exc: BaseException) -> bool:
    """Network trouble may pass; TLS and login failures are configuration."""
    if isinstance(exc, ssl.SSLError):
        return False
    if isinstance(exc, KafkaError):
        return isinstance(exc, KafkaConnectionError)
    return isinstance(exc, OSError)
