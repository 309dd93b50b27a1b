"""Every error the SDK raises: one hierarchy under :class:`RerankError`.

Each class says through ``retriable`` whether sending the same request again may
succeed, so a caller decides retry vs give up without a chain of ``isinstance``
checks (the habit of aiokafka's ``errors.py``)::

    try:
        result = await client.rerank(query, documents)
    except RerankError as error:
        if not error.retriable:
            raise
        ...  # back off and try again
"""

from __future__ import annotations


class RerankError(Exception):
    """Base class of every error raised by the SDK."""

    retriable: bool = False


class InvalidArgument(RerankError, ValueError):
    """An argument of a call is wrong; raised before anything is sent."""


class RerankTimeout(RerankError, TimeoutError):
    """No reply came before the call's timeout; the call is forgotten."""

    retriable = True


class RerankErrorReply(RerankError):
    """The service answered the request with an error reply.

    ``code`` is one of the wire contract's codes (``invalid_request``,
    ``payload_too_large``, ``deadline_exceeded``, ``internal``); ``retriable``
    is what the service said about this particular failure.
    """

    def __init__(self, code: str, message: str, retriable: bool, request_id: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retriable = retriable
        self.request_id = request_id


class ClientClosed(RerankError):
    """The client was closed (before or while the call was waiting)."""


class ClientStartError(RerankError):
    """The client could not start: broker unreachable, missing topic, bad partition."""

    retriable = True


class DeliveryError(RerankError):
    """The request could not be written to the request topic."""

    def __init__(self, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class MalformedReply(RerankError):
    """A reply to this call arrived but does not follow the wire contract."""
