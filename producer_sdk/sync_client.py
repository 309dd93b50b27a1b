"""A blocking rerank client for code without an event loop.

It runs a :class:`~producer_sdk.client.RerankClient` on its own event loop in a
background thread; calls from any thread block until their reply (or error) comes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from producer_sdk.client import RerankClient
from producer_sdk.errors import ClientClosed
from producer_sdk.result import RerankResult
from producer_sdk.retry import RetryPolicy
from producer_sdk.tracing import in_callers_context

T = TypeVar("T")


class SyncRerankClient:
    """Blocking twin of :class:`RerankClient`; takes the same arguments.

    ::

        with SyncRerankClient(bootstrap_servers="kafka:9092") as client:
            result = client.rerank("what is kafka?", ["a log", "a novelist"])

    It is safe to call :meth:`rerank` from many threads at once; the calls share one
    Kafka producer and one reply reader. :meth:`submit` returns a
    :class:`concurrent.futures.Future` instead of blocking.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Built here: the constructor checks arguments and touches no event loop.
        self._client = RerankClient(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rerank-client-loop", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._run(self._client.start())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def client(self) -> RerankClient:
        """The asyncio client underneath (its ``stats``, ``reply_partition``, ...)."""
        return self._client

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str | None = None,
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
        timeout: float | None = None,
        truncate: bool = True,
        retry: RetryPolicy | None = None,
        split_long_documents: bool | None = None,
    ) -> RerankResult:
        """Blocks until the ranking comes; arguments and errors as :meth:`RerankClient.rerank`."""
        return self.submit(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            return_documents=return_documents,
            raw_scores=raw_scores,
            timeout=timeout,
            truncate=truncate,
            retry=retry,
            split_long_documents=split_long_documents,
        ).result()

    def submit(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str | None = None,
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
        timeout: float | None = None,
        truncate: bool = True,
        retry: RetryPolicy | None = None,
        split_long_documents: bool | None = None,
    ) -> concurrent.futures.Future[RerankResult]:
        """Starts a call and returns at once; the future holds the result or the error.

        The call runs in the calling thread's OpenTelemetry context (its current span is
        the parent of the call's span when tracing is on)."""
        with self._lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            return asyncio.run_coroutine_threadsafe(
                in_callers_context(
                    self._client.rerank(
                        query,
                        documents,
                        instruction=instruction,
                        top_n=top_n,
                        return_documents=return_documents,
                        raw_scores=raw_scores,
                        timeout=timeout,
                        truncate=truncate,
                        retry=retry,
                        split_long_documents=split_long_documents,
                    )
                ),
                self._loop,
            )

    def close(self) -> None:
        """Fails waiting calls with :class:`ClientClosed`, disconnects, ends the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
