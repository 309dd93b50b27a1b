"""Callers that address a request in someone else's header convention, and what their
replies must carry so that they recognise them.

Pure functions, no Kafka client: the codec calls :func:`read_inbound` on a request's
headers and :func:`reply_extra_headers` when it builds the reply's headers.

Conventions understood besides our own (``correlation-id``, ``reply-topic``,
``reply-partition``, which win wherever both are present):

* **Spring Kafka** (``ReplyingKafkaTemplate`` with its defaults): ``kafka_correlationId``
  (any bytes; by default the 16 raw bytes of a UUID), ``kafka_replyTopic`` (UTF-8) and
  ``kafka_replyPartition`` (a 4-byte big-endian int). The reply echoes
  ``kafka_correlationId`` byte for byte, which is what the template matches replies on.
  Where the worker needs the id as text (the reply body's ``id``, the reply's key, logs)
  it uses the bytes in hex, whatever they are, so one id always has one text form.
* **CloudEvents, Kafka protocol binding, binary mode**: ``ce_specversion`` (1.0),
  ``ce_id``, ``ce_source``, ``ce_type``. ``ce_id`` is the correlation id when no other is
  given. The reply is a binary-mode CloudEvent: ``ce_specversion`` 1.0, ``ce_id`` the
  correlation id (a reply sent again after a restart is the same event, which CloudEvents
  consumers may drop as a duplicate), ``ce_source`` naming the service, ``ce_type``
  :data:`CE_TYPE_RESULT` or :data:`CE_TYPE_ERROR`, and ``content-type``. A structured-mode
  event (``content-type: application/cloudevents+json``) is refused with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from schemas.models import MAX_ID_CHARS

SPRING_CORRELATION_ID: Final = "kafka_correlationId"
SPRING_REPLY_TOPIC: Final = "kafka_replyTopic"
SPRING_REPLY_PARTITION: Final = "kafka_replyPartition"

CE_SPECVERSION: Final = "ce_specversion"
CE_ID: Final = "ce_id"
CE_SOURCE: Final = "ce_source"
CE_TYPE: Final = "ce_type"
CONTENT_TYPE: Final = "content-type"
CE_VERSION: Final = "1.0"
# The reply's attributes: the service is the source, one type for results, one for errors.
CE_SOURCE_SERVICE: Final = "urn:kafka-rerank:worker"
CE_TYPE_RESULT: Final = "kafka-rerank.result.v1"
CE_TYPE_ERROR: Final = "kafka-rerank.error.v1"
REPLY_CONTENT_TYPE: Final = "application/json"
_STRUCTURED_MODE: Final = "application/cloudevents"
_REQUIRED_CE_ATTRIBUTES: Final = (CE_ID, CE_SOURCE, CE_TYPE)

# A hex text form of at most MAX_ID_CHARS characters.
MAX_SPRING_ID_BYTES: Final = MAX_ID_CHARS // 2
_PARTITION_BYTES: Final = 4


@dataclass(frozen=True, slots=True)
class Convention:
    """What a caller's reply must carry beyond our own headers.

    ``spring_correlation``: the raw ``kafka_correlationId`` to echo (None: not sent).
    ``cloudevents``: the request was a binary-mode CloudEvent, so the reply is one too.
    """

    spring_correlation: bytes | None = None
    cloudevents: bool = False


NATIVE: Final = Convention()


@dataclass(frozen=True, slots=True)
class Inbound:
    """What a request's headers say in the other conventions.

    ``correlation_id``: the text form of ``kafka_correlationId`` (hex), usable as the
    correlation id; ``ce_id``: the CloudEvent's id, the correlation id of last resort;
    ``reply_topic`` (not yet checked as a topic name) and ``reply_partition`` from Spring's
    headers. ``error``: the first problem found (the request is then invalid), or None.
    """

    convention: Convention = NATIVE
    correlation_id: str | None = None
    ce_id: str | None = None
    reply_topic: str | None = None
    reply_partition: int | None = None
    error: str | None = None


def read_inbound(headers: Mapping[str, bytes | None]) -> Inbound:
    """Read the Spring and CloudEvents headers of a request (first occurrence of each
    name); never raises. Bad headers still give the convention, so that the error reply
    reaches its caller in the form it waits for."""
    errors: list[str] = []
    raw_id = headers.get(SPRING_CORRELATION_ID)
    spring_id = _spring_id(raw_id, errors)
    reply_topic = _text(headers, SPRING_REPLY_TOPIC, errors)
    partition = _spring_partition(headers.get(SPRING_REPLY_PARTITION), errors)
    cloudevents, ce_id = _cloudevent(headers, errors)
    echo = bytes(raw_id) if raw_id is not None else None
    return Inbound(
        convention=Convention(echo, cloudevents),
        correlation_id=spring_id,
        ce_id=ce_id,
        reply_topic=reply_topic,
        reply_partition=partition,
        error=errors[0] if errors else None,
    )


def reply_extra_headers(
    convention: Convention, correlation_id: str, *, error: bool
) -> list[tuple[str, bytes]]:
    """The headers a reply carries for ``convention`` besides our ``correlation-id``;
    ``error``: the reply is an error reply."""
    headers: list[tuple[str, bytes]] = []
    if convention.spring_correlation is not None:
        headers.append((SPRING_CORRELATION_ID, convention.spring_correlation))
    if convention.cloudevents:
        headers += [
            (CE_SPECVERSION, CE_VERSION.encode("ascii")),
            (CE_ID, correlation_id.encode("utf-8")),
            (CE_SOURCE, CE_SOURCE_SERVICE.encode("ascii")),
            (CE_TYPE, (CE_TYPE_ERROR if error else CE_TYPE_RESULT).encode("ascii")),
            (CONTENT_TYPE, REPLY_CONTENT_TYPE.encode("ascii")),
        ]
    return headers


def _spring_id(raw: bytes | None, errors: list[str]) -> str | None:
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_SPRING_ID_BYTES:
        errors.append(
            f"header '{SPRING_CORRELATION_ID}' must have 1 to {MAX_SPRING_ID_BYTES} bytes, "
            f"got {len(raw)}"
        )
        return None
    return bytes(raw).hex()


def _spring_partition(raw: bytes | None, errors: list[str]) -> int | None:
    if raw is None:
        return None
    if len(raw) != _PARTITION_BYTES:
        errors.append(
            f"header '{SPRING_REPLY_PARTITION}' must be a 4-byte big-endian integer, "
            f"got {len(raw)} bytes"
        )
        return None
    partition = int.from_bytes(raw, "big", signed=True)
    if partition < 0:
        errors.append(f"header '{SPRING_REPLY_PARTITION}' must be >= 0, got {partition}")
        return None
    return partition


def _cloudevent(headers: Mapping[str, bytes | None], errors: list[str]) -> tuple[bool, str | None]:
    """(a binary-mode CloudEvent?, its ce_id when usable as a correlation id)."""
    if headers.get(CE_SPECVERSION) is None:
        content_type = _text(headers, CONTENT_TYPE, [])
        if content_type is not None and content_type.strip().lower().startswith(_STRUCTURED_MODE):
            errors.append(
                "structured-mode CloudEvents are not supported: send the event in binary "
                "mode (ce_* headers, the rerank request as the record's value)"
            )
        return False, None
    version = _text(headers, CE_SPECVERSION, errors)
    if version is not None and version != CE_VERSION:
        errors.append(f"header '{CE_SPECVERSION}' must be {CE_VERSION!r}, got {version[:16]!r}")
    attributes = {}
    for name in _REQUIRED_CE_ATTRIBUTES:
        if not headers.get(name):
            errors.append(f"header '{name}' is required in a CloudEvent and must not be empty")
        else:
            attributes[name] = _text(headers, name, errors)
    ce_id = attributes.get(CE_ID)
    if ce_id is not None and len(ce_id) > MAX_ID_CHARS:
        errors.append(f"header '{CE_ID}' must have at most {MAX_ID_CHARS} characters")
        ce_id = None
    return True, ce_id


def _text(headers: Mapping[str, bytes | None], name: str, errors: list[str]) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        errors.append(f"header '{name}' is not valid UTF-8")
        return None
