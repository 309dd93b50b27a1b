"""Kafka connection security settings shared by the SDK and the worker service.

Secrets are held as :class:`pydantic.SecretStr`, so printing or logging a
``KafkaSecurity`` never shows a password.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How to authenticate to and encrypt the connection with the Kafka cluster."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None

    def __post_init__(self) -> None:
        for problem in self.problems():
            raise ValueError(problem)

    def problems(self) -> list[str]:
        """Every reason these settings cannot work, one line each."""
        found: list[str] = []
        if self.protocol not in PROTOCOLS:
            choices = ", ".join(PROTOCOLS)
            found.append(f"security protocol {self.protocol!r} is not one of {choices}")
        uses_sasl = self.protocol.startswith("SASL_")
        if uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                choices = ", ".join(SASL_MECHANISMS)
                found.append(f"SASL mechanism {self.sasl_mechanism!r} is not one of {choices}")
            if not self.sasl_username or self.sasl_password is None:
                found.append(f"{self.protocol} needs a SASL username and password")
        if self.ssl_keyfile and not self.ssl_certfile:
            found.append("an SSL key file needs an SSL certificate file")
        return found

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.startswith("SASL_"):
            hide_sasl_secrets_in_aiokafka_logs()
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            assert self.sasl_password is not None  # checked in problems()
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self._ssl_context()
        return kwargs

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            password = self.ssl_password.get_secret_value() if self.ssl_password else None
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
        return context


class _HideSaslAuthentication(logging.Filter):
    """Blanks the SASL authenticate request in aiokafka's DEBUG "Request to ..." lines.

    aiokafka logs every request it sends at DEBUG with all its fields, and the
    SaslAuthenticateRequest of PLAIN carries the password in clear.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_is_sasl_auth(a) for a in record.args):
            record.args = tuple(
                "SaslAuthenticateRequest(hidden)" if _is_sasl_auth(a) else a for a in record.args
            )
        return True


def _is_sasl_auth(value: object) -> bool:
    return type(value).__name__.startswith("SaslAuthenticateRequest")


_SASL_FILTER = _HideSaslAuthentication()


def hide_sasl_secrets_in_aiokafka_logs() -> None:
    """Keep SASL passwords out of aiokafka's DEBUG logs, whoever handles them.

    A filter on aiokafka's connection logger (not a handler, level or format: those stay
    the application's choice). Idempotent; called for every SASL client.
    """
    logger = logging.getLogger("aiokafka.conn")
    if _SASL_FILTER not in logger.filters:
        logger.addFilter(_SASL_FILTER)
