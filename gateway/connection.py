"""The gateway's SDK client, connected in the background and retried until Kafka answers.

A gateway that starts before the broker serves 503 (and reports not ready) until its
client is connected, instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gateway.settings import GatewaySettings
from producer_sdk.client import RerankClient
from producer_sdk.errors import ClientStartError

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0


class ClientHolder:
    """Holds one started :class:`RerankClient`, or None while connecting."""

    def __init__(
        self,
        settings: GatewaySettings,
        before_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_ready``: awaited once the client is connected, before it is handed out
        (the worker watch's first look, so that the first call already knows the group)."""
        self._settings = settings
        self._before_ready = before_ready
        self._client: RerankClient | None = None
        self._task: asyncio.Task[None] | None = None

    def get(self) -> RerankClient | None:
        """The connected client, or None."""
        return self._client

    def start(self) -> None:
        """Connect in the background (a client that fails to start is replaced)."""
        self._task = asyncio.create_task(self._connect())

    async def close(self) -> None:
        """Stop connecting and close the client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _connect(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while True:
            client = self._new_client()
            try:
                await client.start()
            except ClientStartError as error:
                log.warning("cannot reach Kafka yet (retrying in %.1f s): %s", backoff, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            if self._before_ready is not None:
                await self._before_ready()
            self._client = client
            log.info(
                "connected to Kafka, reading replies from partition %d", client.reply_partition
            )
            return

    def _new_client(self) -> RerankClient:
        settings = self._settings
        return RerankClient(
            settings.bootstrap_servers,
            request_topic=settings.request_topic,
            reply_topic=settings.reply_topic,
            security=settings.security,
            default_timeout=settings.timeout_s,
            # replies of exactly-once workers count once their transaction commits (one
            # that is aborted later is never answered from); at-least-once replies are
            # committed at once, so reading committed costs them nothing
            read_committed=True,
        )
