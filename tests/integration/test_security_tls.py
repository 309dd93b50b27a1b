"""Kafka over TLS against a real broker.

The module starts a broker of its own through ``deploy/local/kafka`` with
``KAFKA_SSL_PORT`` and ``KAFKA_SASL_SSL_PORT`` set: one PLAINTEXT listener (topics are
created there), one SSL listener and one SASL_SSL listener that knows one user under
SCRAM-SHA-512, all behind the throwaway CA the script writes to ``tls/ca.pem``. The SSL
listener asks for a client certificate (``KAFKA_SSL_CLIENT_AUTH=requested``): clients
without one get in, a certificate that is sent must come from that CA. The real worker
(``consumer.service.worker.Worker``, fake engine) and the SDK talk over the TLS listeners only.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from test_local_kafka import (
    SMALL_HEAP,
    START_TIMEOUT_S,
    assert_one_line_error,
    free_port_pair,
    kafka,
)
from test_security_sasl import (
    free_port_besides,
    rerank_through_a_worker,
    script_broker,
    start_beside_a_taken_port,
)
from worker_harness import (
    Topics,
    fake_score,
    topics_on,
)

from producer_sdk import ClientStartError, KafkaSecurity, RerankClient

pytestmark = pytest.mark.integration

USER = "rerank"
PASSWORD = f"pw-{uuid.uuid4().hex}"
# Bounds, not timings: a refused certificate is answered at once, these only stop a hang.
FAIL_WITHIN_S = 30.0
TOPIC_READY_S = 10.0


class TlsBroker:
    """Addresses of the module's broker and the CA its certificate comes from."""

    def __init__(self, plain_port: int, ssl_port: int, sasl_ssl_port: int, state: Path) -> None:
        self.plaintext = f"127.0.0.1:{plain_port}"
        self.ssl = f"127.0.0.1:{ssl_port}"
        self.sasl_ssl = f"127.0.0.1:{sasl_ssl_port}"
        self.state_dir = state
        self.tls_dir = state / "tls"
        self.ca_file = self.tls_dir / "ca.pem"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    port = free_port_pair()
    ssl_port = free_port_besides({port, port + 1})
    sasl_ssl_port = free_port_besides({port, port + 1, ssl_port})
    state_dir = tmp_path_factory.mktemp("tls-broker") / "state"
    with script_broker(
        KAFKA_PORT=str(port),
        KAFKA_SSL_PORT=str(ssl_port),
        KAFKA_SASL_SSL_PORT=str(sasl_ssl_port),
        KAFKA_SSL_CLIENT_AUTH="requested",
        KAFKA_SASL_USERS=f"{USER}:{PASSWORD}",
        KAFKA_STATE_DIR=str(state_dir),
        KAFKA_HEAP_OPTS=SMALL_HEAP,
        KAFKA_START_TIMEOUT=str(START_TIMEOUT_S),
    ) as started:
        broker = TlsBroker(port, ssl_port, sasl_ssl_port, state_dir)
        assert f"SSL {broker.ssl}" in started.stdout
        assert f"SASL_SSL {broker.sasl_ssl}" in started.stdout
        assert f"CA {broker.ca_file}," in started.stdout
        yield broker


@pytest.fixture(scope="module")
async def tls_topics(tls_broker: TlsBroker) -> AsyncIterator[Topics]:
    """Request, reply and dead-letter topics, created over the PLAINTEXT listener."""
    async with topics_on(tls_broker.plaintext, TOPIC_READY_S) as topics:
        yield topics


def tls(broker: TlsBroker) -> KafkaSecurity:
    return KafkaSecurity(protocol="SSL", ssl_cafile=str(broker.ca_file))


def mutual_tls(broker: TlsBroker, cert: Path, key: Path) -> KafkaSecurity:
    return KafkaSecurity(
        protocol="SSL",
        ssl_cafile=str(broker.ca_file),
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )


def sasl_ssl(broker: TlsBroker) -> KafkaSecurity:
    return KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=USER,
        sasl_password=SecretStr(PASSWORD),
        ssl_cafile=str(broker.ca_file),
    )


@pytest.mark.parametrize("protocol", ["SSL", "SSL with a client certificate", "SASL_SSL"])
async def test_worker_answers_the_sdk_over_tls(
    protocol: str, tls_broker: TlsBroker, tls_topics: Topics
) -> None:
    if protocol == "SSL":
        bootstrap, security = tls_broker.ssl, tls(tls_broker)
    elif protocol == "SASL_SSL":
        bootstrap, security = tls_broker.sasl_ssl, sasl_ssl(tls_broker)
    else:
        tls_dir = tls_broker.tls_dir
        security = mutual_tls(tls_broker, tls_dir / "client.pem", tls_dir / "client.key")
        bootstrap = tls_broker.ssl
    query, docs, result, in_group = await rerank_through_a_worker(
        bootstrap, tls_topics, security, protocol
    )
    assert in_group
    scores = {item.index: item.score for item in result.results}
    assert scores == pytest.approx({i: fake_score(query, None, d) for i, d in enumerate(docs)})


def other_ca(folder: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate and its key, unrelated to the broker's CA."""
    ca, key = folder / "other-ca.pem", folder / "other-ca.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-noenc",
            "-keyout",
            str(key),
            "-out",
            str(ca),
            "-days",
            "1",
            "-subj",
            "/CN=not the broker's CA",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return ca, key


async def test_sdk_trusting_another_ca_fails_to_start(
    tls_broker: TlsBroker, tls_topics: Topics, tmp_path: Path
) -> None:
    client = RerankClient(
        tls_broker.ssl,
        request_topic=tls_topics.requests,
        reply_topic=tls_topics.replies,
        security=KafkaSecurity(protocol="SSL", ssl_cafile=str(other_ca(tmp_path)[0])),
        start_timeout=FAIL_WITHIN_S,
    )
    with pytest.raises(ClientStartError) as failed:
        await asyncio.wait_for(client.start(), FAIL_WITHIN_S + 5)

    message = str(failed.value)
    assert "certificate verify failed" in message.lower(), message
    assert tls_broker.ssl in message, message


async def test_sdk_with_a_client_certificate_of_another_ca_fails_to_start(
    tls_broker: TlsBroker, tls_topics: Topics, tmp_path: Path
) -> None:
    """The broker checks a client certificate it is sent against its own CA."""
    cert, key = other_ca(tmp_path)
    client = RerankClient(
        tls_broker.ssl,
        request_topic=tls_topics.requests,
        reply_topic=tls_topics.replies,
        security=mutual_tls(tls_broker, cert, key),
        start_timeout=FAIL_WITHIN_S,
    )
    with pytest.raises(ClientStartError) as failed:
        await asyncio.wait_for(client.start(), FAIL_WITHIN_S + 5)

    # The broker drops the handshake; TLS 1.3 clients only see the connection close.
    assert f"could not connect to Kafka: {tls_broker.ssl}" in str(failed.value)


def test_the_broker_keys_are_readable_by_their_owner_only(tls_broker: TlsBroker) -> None:
    tls_dir = tls_broker.state_dir / "tls"
    keys = [p for p in tls_dir.iterdir() if p.name != "ca.pem"]
    assert keys, list(tls_dir.iterdir())
    for key in keys:
        assert key.stat().st_mode & 0o077 == 0, key
    assert PASSWORD not in (tls_broker.state_dir / "broker.log").read_text()


def test_script_refuses_a_taken_ssl_port_in_one_line(tmp_path: Path) -> None:
    done, ssl_port = start_beside_a_taken_port(tmp_path, "KAFKA_SSL_PORT")
    assert_one_line_error(done, f"SSL port 127.0.0.1:{ssl_port} is already in use")
    assert not (tmp_path / "state" / "kafka.pid").exists()


def test_script_refuses_one_port_for_two_listeners_in_one_line(tmp_path: Path) -> None:
    port = free_port_pair()
    ssl_port = free_port_besides({port, port + 1})
    done = kafka(
        "start",
        KAFKA_PORT=str(port),
        KAFKA_SSL_PORT=str(ssl_port),
        KAFKA_SASL_SSL_PORT=str(ssl_port),
        KAFKA_STATE_DIR=str(tmp_path / "state"),
    )
    assert_one_line_error(done, f"SASL_SSL port {ssl_port} must differ from the SSL port")


def test_script_refuses_an_unknown_client_auth_in_one_line(tmp_path: Path) -> None:
    port = free_port_pair()
    done = kafka(
        "start",
        KAFKA_PORT=str(port),
        KAFKA_SSL_PORT=str(free_port_besides({port, port + 1})),
        KAFKA_SSL_CLIENT_AUTH="always",
        KAFKA_STATE_DIR=str(tmp_path / "state"),
    )
    assert_one_line_error(done, "KAFKA_SSL_CLIENT_AUTH must be none, requested or required")
    assert not (tmp_path / "state" / "tls").exists()
