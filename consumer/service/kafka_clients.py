"""The worker's Kafka clients, configured from its :class:`WorkerConfig`."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.service.worker_config import WorkerConfig

PRODUCER_BATCH_BYTES = 256 * 1024


def make_producer(config: WorkerConfig) -> AIOKafkaProducer:
    """The reply producer: idempotent, acks from every in-sync replica."""
    return AIOKafkaProducer(
        bootstrap_servers=config.bootstrap_servers,
        client_id=f"{config.client_id}-producer",
        acks="all",
        enable_idempotence=True,
        linger_ms=config.producer_linger_ms,
        max_batch_size=PRODUCER_BATCH_BYTES,
        max_request_size=config.max_record_bytes,
        **config.security.aiokafka_kwargs(),
    )


def make_consumer(config: WorkerConfig) -> AIOKafkaConsumer:
    """The request consumer: a group member that commits by hand."""
    return AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        group_id=config.group_id,
        # Static membership: a restart within the session timeout keeps the partitions.
        group_instance_id=config.group_instance_id,
        client_id=f"{config.client_id}-consumer",
        enable_auto_commit=False,
        # A new group answers what is already waiting; deadlines drop stale requests.
        auto_offset_reset="earliest",
        # Requests of aborted transactions are never answered.
        isolation_level="read_committed",
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=config.heartbeat_interval_ms,
        max_poll_interval_ms=config.max_poll_interval_ms,
        # How long the group waits for members to finish their revoke handlers.
        rebalance_timeout_ms=config.rebalance_timeout_ms,
        **config.security.aiokafka_kwargs(),
    )


def make_offsets_reader(config: WorkerConfig) -> AIOKafkaConsumer:
    """A client that only asks partitions' end offsets: for the lag metric, and for how
    far a partition whose last owner died mid-record is worked carefully.

    Not the request consumer: the broker answers one request per connection at a time, so
    on the consumer's connection a ListOffsets request waits behind the fetch long-poll (up
    to fetch_max_wait_ms) while nothing new arrives, which is when a backlog already
    fetched into the worker shows as lag.
    """
    return AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        client_id=f"{config.client_id}-offsets",
        enable_auto_commit=False,
        # the same end as the request consumer's: the last stable offset
        isolation_level="read_committed",
        **config.security.aiokafka_kwargs(),
    )


def make_transactional_producer(config: WorkerConfig, transactional_id: str) -> AIOKafkaProducer:
    """A producer for one partition's transactions (exactly-once mode)."""
    return AIOKafkaProducer(
        bootstrap_servers=config.bootstrap_servers,
        client_id=f"{config.client_id}-txn",
        acks="all",
        enable_idempotence=True,
        transactional_id=transactional_id,
        linger_ms=config.producer_linger_ms,
        max_batch_size=PRODUCER_BATCH_BYTES,
        max_request_size=config.max_record_bytes,
        **config.security.aiokafka_kwargs(),
    )


def transactional_id(config: WorkerConfig, topic: str, partition: int) -> str:
    """The partition's transactional id: the same for every worker that owns it, so the
    current owner's producer fences every earlier one."""
    return f"{config.transactional_id_prefix}.{config.group_id}.{topic}.{partition}"
