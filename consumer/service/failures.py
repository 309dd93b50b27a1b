"""Failures only an operator can fix: the worker stops on them with one clear line.

Each is a :class:`KafkaError`, so the service logs it as one line and exits 1
(:mod:`consumer.app`); its requests stay uncommitted for a worker that can answer them.
"""

from __future__ import annotations

from aiokafka.errors import KafkaError


class NotAuthorized(KafkaError):
    """The broker refuses this worker's principal something it needs (an ACL, a login)."""


class Unwritable(KafkaError):
    """The broker refuses a dead-letter record for good (not a size: that has a fallback)."""


class TransactionsFailing(KafkaError):
    """Transactions have failed for longer than the worker may hold their answers."""
