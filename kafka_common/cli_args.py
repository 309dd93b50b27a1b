"""Command-line arguments shared by ``rerank-client`` and ``rerank-gateway``: the Kafka
connection's security, with the worker's environment variables (``RERANK_*``) as defaults.
"""

from __future__ import annotations

import argparse
import os

from pydantic import SecretStr

from kafka_common.security import PROTOCOLS, SASL_MECHANISMS, KafkaSecurity

SSL_FILE_SETTINGS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the security flags, each defaulting to its ``RERANK_<FLAG>`` variable."""
    # The same settings, and environment variables, as the worker's (consumer.settings).
    security = parser.add_argument_group("security", "each flag defaults to env RERANK_<FLAG>")
    security.add_argument(
        "--security-protocol",
        type=_upper,
        default=service_env("security_protocol") or "PLAINTEXT",
        choices=PROTOCOLS,
    )
    security.add_argument(
        "--sasl-mechanism",
        type=_upper,
        default=service_env("sasl_mechanism"),
        choices=SASL_MECHANISMS,
    )
    security.add_argument("--sasl-username", default=service_env("sasl_username"))
    security.add_argument(
        "--sasl-password",
        default=service_env("sasl_password"),
        help="prefer env RERANK_SASL_PASSWORD: arguments show in the process list",
    )
    for name in SSL_FILE_SETTINGS:
        security.add_argument(f"--{name.replace('_', '-')}", default=service_env(name))
    security.add_argument("--ssl-password", default=service_env("ssl_password"))


def service_env(setting: str) -> str | None:
    """The worker's environment variable for ``setting``, or None when unset or empty."""
    # Empty means unset, as for the worker (a compose ``${X:-}`` gives an empty variable).
    return os.environ.get(f"RERANK_{setting.upper()}") or None


def _upper(value: str) -> str:
    return value.strip().upper()


def security_from_args(args: argparse.Namespace) -> KafkaSecurity:
    """The connection security the flags describe; ValueError when they do not fit.

    With SSL the files are checked and the SSL context is built here, so a missing or
    unreadable file is one line on stderr, not a traceback from inside the client.
    """
    security = KafkaSecurity(
        protocol=args.security_protocol,
        sasl_mechanism=args.sasl_mechanism,
        sasl_username=args.sasl_username,
        sasl_password=SecretStr(args.sasl_password) if args.sasl_password else None,
        ssl_cafile=args.ssl_cafile,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_password=SecretStr(args.ssl_password) if args.ssl_password else None,
    )
    if security.protocol in ("SSL", "SASL_SSL"):
        for name in SSL_FILE_SETTINGS:
            path = getattr(args, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')}: no such file: {path}")
        try:
            security.aiokafka_kwargs()
        except OSError as error:  # ssl.SSLError too: a bad PEM file or a wrong password
            raise ValueError(f"the SSL settings do not load: {error}") from None
    return security
