"""SASL passwords stay out of aiokafka's DEBUG request log once a SASL client is built."""

from __future__ import annotations

import logging

import pytest
from aiokafka.protocol.admin import SaslAuthenticateRequest_v1
from aiokafka.protocol.metadata import MetadataRequest_v0
from pydantic import SecretStr

from kafka_common.security import KafkaSecurity

PASSWORD = "never-log-this-password"


def log_request(request: object) -> None:
    """What ``aiokafka.conn.AIOKafkaConnection.send`` logs for every request."""
    logging.getLogger("aiokafka.conn").debug(
        "Request to %s:%d %d: %s", "127.0.0.1", 9092, 1, request
    )


def test_plain_login_request_is_hidden_and_other_requests_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="rerank",
        sasl_password=SecretStr(PASSWORD),
    ).aiokafka_kwargs()

    log_request(SaslAuthenticateRequest_v1(f"\0rerank\0{PASSWORD}".encode()))
    log_request(MetadataRequest_v0(["some-topic"]))

    hidden, metadata = caplog.records
    assert PASSWORD not in caplog.text
    assert "SaslAuthenticateRequest(hidden)" in hidden.getMessage()
    assert "some-topic" in metadata.getMessage()
