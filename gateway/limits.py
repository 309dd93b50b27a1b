"""What bounds the gateway under slow clients: the bodies it reads at once, by their bytes,
and the connections it keeps open.

A client that sends its body slowly holds what the gateway has read of it; hundreds of
them used to hold hundreds of megabytes. Bodies are read only within a byte budget: a
call whose body does not fit is answered 429 at once, unread, and its connection closes
(one left waiting still held most of its body in aiohttp's buffers). A connection beyond
the limit is closed as it opens.
"""

from __future__ import annotations

import asyncio
from typing import Any


class BodyBudget:
    """Bytes of request bodies being read at once, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        return self._used

    def try_reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit now (a body larger than the whole budget fits an
        empty one); False: they do not."""
        size = min(size, self._limit)
        if self._used + size > self._limit:
            return False
        self._used += size
        return True

    def release(self, size: int) -> None:
        """Give back what :meth:`try_reserve` took."""
        self._used -= min(size, self._limit)


def limit_connections(server: Any, limit: int, on_refused: Any = None) -> None:
    """Close each connection that would make ``server`` (an aiohttp web ``Server``) hold
    more than ``limit`` at once, as it opens."""
    opened = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        opened(handler, transport)
        if len(server.connections) > limit:
            handler.force_close()
            transport.close()
            if on_refused is not None:
                on_refused()

    server.connection_made = connection_made
