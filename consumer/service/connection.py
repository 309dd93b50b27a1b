"""Starting the worker's Kafka clients, and waiting for a broker that is not there yet.

A worker often starts before its broker (a whole stack coming up, a broker restart).
It keeps trying with backoff, says why in its readiness and in the log, and gives up
only after ``connect_timeout_s`` (0: never). A failure that waiting cannot fix (a
refused login, a certificate that does not verify) ends the start at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaConnectionError

from kafka_common.connect_check import diagnose_bootstrap
from kafka_common.security import KafkaSecurity

log = logging.getLogger(__name__)

# How often the same "still waiting" line is logged again.
_LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class ConnectPolicy:
    """How long and how often to try to reach the brokers.

    ``timeout_s``: give up after this long (0: keep trying for as long as the worker
    runs); backoff between attempts grows from ``first_backoff_s`` to ``max_backoff_s``.
    """

    timeout_s: float = 300.0
    first_backoff_s: float = 1.0
    max_backoff_s: float = 15.0


# Makes a fresh (producer, consumer) pair; a failed start leaves clients unusable.
ClientFactory = Callable[[], tuple[Any, Any]]


class KafkaConnector:
    """Starts the clients; :attr:`waiting_reason` says why it is still trying."""

    def __init__(
        self,
        make_clients: ClientFactory,
        bootstrap_servers: str,
        security: KafkaSecurity,
        client_id: str,
        policy: ConnectPolicy,
    ) -> None:
        self._make_clients = make_clients
        self._bootstrap_servers = bootstrap_servers
        self._security = security
        self._client_id = client_id
        self._policy = policy
        self.waiting_reason: str | None = None

    async def connect(self) -> tuple[Any, Any]:
        """Started (producer, consumer); raises KafkaConnectionError when giving up.

        Cancel the calling task to stop waiting.
        """
        started = time.monotonic()
        backoff = self._policy.first_backoff_s
        last_log = -_LOG_EVERY_S
        while True:
            producer, consumer = self._make_clients()
            try:
                await producer.start()
                await consumer.start()
            except KafkaConnectionError as exc:
                await _stop_quietly(producer, consumer)
                reason, transient = await self._diagnose(exc)
            except BaseException:
                await _stop_quietly(producer, consumer)
                raise
            else:
                if self.waiting_reason is not None:
                    log.info("connected to Kafka", extra={"waited_s": _since(started)})
                self.waiting_reason = None
                return producer, consumer
            waited = time.monotonic() - started
            limit = self._policy.timeout_s
            if not transient or (limit > 0 and waited + backoff > limit):
                after = f" after {waited:.0f} s" if transient else ""
                raise KafkaConnectionError(f"cannot connect to Kafka{after}: {reason}")
            self.waiting_reason = f"cannot connect to Kafka (retrying): {reason}"
            if waited - last_log >= _LOG_EVERY_S:
                last_log = waited
                log.warning(
                    "cannot connect to Kafka; retrying",
                    extra={"error": reason, "waited_s": round(waited, 1), "retry_in_s": backoff},
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._policy.max_backoff_s)

    async def _diagnose(self, exc: KafkaConnectionError) -> tuple[str, bool]:
        diagnosis = await diagnose_bootstrap(
            self._bootstrap_servers, self._security, self._client_id
        )
        return diagnosis.reason or str(exc), diagnosis.transient


async def _stop_quietly(*clients: Any) -> None:
    for client in clients:
        try:
            await client.stop()
        except Exception:
            log.debug("stopping a client that failed to start failed too", exc_info=True)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)
