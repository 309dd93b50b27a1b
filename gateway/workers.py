"""Whether any worker is there: the gateway watches the workers' consumer group.

With no member in the group, a request would sit in the topic until its timeout; the
gateway answers 503 at once instead. When the group cannot be read (a missing Describe
ACL, a broker away) nothing is known and calls go through as usual.
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
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap_servers, client_id="rerank-gateway", **client_kwargs
        )
        self._task: asyncio.Task[None] | None = None
        self.members: int | None = None  # None: not known (yet)

    @property
    def none_there(self) -> bool:
        """True only when the group was read and had no member."""
        return self.members == 0

    async def start(self) -> None:
        """Start watching (a failing first look is not an error: it only leaves it unknown)."""
        await self._admin.start()
        await self.look()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching and close the admin client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._admin.close()

    async def look(self) -> None:
        """Read the group's member count now."""
        try:
            async with asyncio.timeout(_DESCRIBE_TIMEOUT_S):
                responses = await self._admin.describe_consumer_groups([self._group_id])
            self.members = _member_count(responses, self._group_id)
        except (KafkaError, TimeoutError, OSError) as error:
            log.debug("could not describe the workers' group", extra={"error": repr(error)})
            self.members = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            before = self.members
            await self.look()
            if self.members != before and (self.members == 0 or before == 0):
                log.warning(
                    "workers' group changed",
                    extra={"group_id": self._group_id, "members": self.members},
                )


def _member_count(responses: list[Any], group_id: str) -> int | None:
    for response in responses:
        for group in response.groups:
            error_code, gid = group[0], group[1]
            if gid != group_id:
                continue
            return None if error_code != 0 else len(group[_MEMBERS])
    return None
