"""Whether any worker is there: the gateway watches the workers' consumer group.

With no member in the group, a request would sit in the topic until its timeout; the
gateway answers 503 at once instead. When the group cannot be read (a missing Describe
ACL, a broker away, or not there yet: a gateway may start before Kafka) nothing is known
and calls go through as usual; the watch keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

_DESCRIBE_TIMEOUT_S = 5.0
_MEMBERS = 5  # position of the member list in a DescribeGroups response's group entry


class WorkerWatch:
    """Counts the members of ``group_id`` every ``interval_s`` seconds."""

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        client_kwargs: dict[str, Any],
        interval_s: float,
    ) -> None:
        self._group_id = group_id
        self._interval_s = interval_s
        self._admin_kwargs = dict(
            bootstrap_servers=bootstrap_servers, client_id="rerank-gateway", **client_kwargs
        )
        self._admin: AIOKafkaAdminClient | None = None  # None: not connected (yet)
        self._task: asyncio.Task[None] | None = None
        self.members: int | None = None  # None: not known (yet)

    @property
    def none_there(self) -> bool:
        """True only when the group was read and had no member."""
        return self.members == 0

    def start(self) -> None:
        """Start watching in the background; never fails (a broker that is not there yet
        leaves the group unknown, and is tried again every interval)."""
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching and close the admin client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_admin()

    async def look(self) -> None:
        """Read the group's member count now (connecting first if need be)."""
        try:
            async with asyncio.timeout(_DESCRIBE_TIMEOUT_S):
                admin = await self._connected_admin()
                responses = await admin.describe_consumer_groups([self._group_id])
            self.members = _member_count(responses, self._group_id)
        except (KafkaError, TimeoutError, OSError) as error:
            log.debug("could not describe the workers' group", extra={"error": repr(error)})
            self.members = None

    async def _connected_admin(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            admin = AIOKafkaAdminClient(**self._admin_kwargs)
            try:
                await admin.start()
            except BaseException:
                # a client that failed to start is not used again: the next look makes one
                with contextlib.suppress(Exception):
                    await admin.close()
                raise
            self._admin = admin
        return self._admin

    async def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()

    async def _watch(self) -> None:
        while True:
            before = self.members
            await self.look()
            if self.members != before and (self.members == 0 or before == 0):
                log.warning(
                    "workers' group changed",
                    extra={"group_id": self._group_id, "members": self.members},
                )
            await asyncio.sleep(self._interval_s)


def _member_count(responses: list[Any], group_id: str) -> int | None:
    for response in responses:
        for group in response.groups:
            error_code, gid = group[0], group[1]
            if gid != group_id:
                continue
            return None if error_code != 0 else len(group[_MEMBERS])
    return None
