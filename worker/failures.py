"""The failure policy: what every exception the intake, the pipeline and the publisher can meet
means for the worker, decided in one place.

=================  ==============================================================================
disposition        what the worker does
=================  ==============================================================================
per-record         this record is answered with an error result and dead-lettered; its partition
                   moves on. Anything not in the table below is per-record.
transient          retried with backoff. On a record's own reply topic the retries are bounded
                   (``reply_timeout_s``): past it the record becomes per-record
                   (``reply_to_unavailable``). On the fleet's own topics (results, DLQ) and for
                   fetches and commits it is an outage, waited out: every record waits on the same
                   broker and nothing is committed meanwhile, so nothing is lost.
                   A producer whose sequence state the broker no longer shares (an idempotent
                   producer after an outage: ``OutOfOrderSequenceNumber``) fails every later send
                   too, so it is replaced by a fresh one (``needs_new_producer``) and the records
                   are sent again.
fatal              the worker's own state only: its configuration or credentials (exit 2), or a
                   fenced producer (exactly-once: that partition is given up, the worker goes on).
=================  ==============================================================================

A dead-letter write that fails is retried a few times (transient) and then counted
(``embedfleet_dlq_write_failures_total``) and logged, never fatal. Cache (Redis) errors never reach
this table: the cache fails open by itself (``worker.cache``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from typing import Any, Final

from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    CommitFailedError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    InvalidMessageError,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaConfigurationError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    PolicyViolationError,
    ProducerClosed,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownProducerId,
    UnsupportedCodecError,
    UnsupportedForMessageFormatError,
    UnsupportedSaslMechanismError,
)

from worker.errors import ContractMismatch, WorkerError

log = logging.getLogger(__name__)


class Disposition(enum.Enum):
    PER_RECORD = "per_record"
    TRANSIENT = "transient"
    FATAL = "fatal"


PER_RECORD, TRANSIENT, FATAL = Disposition.PER_RECORD, Disposition.TRANSIENT, Disposition.FATAL


class AckTimeout(WorkerError, TimeoutError):
    """A send was not acknowledged within its bound (a reply topic that never acknowledges)."""


class SharedBatchRefused(WorkerError):
    """A record batch that carried the records of several sends was refused per record: any of
    them may be the one to blame (worker.publisher coalesces a partition's sends)."""


class WorkerFatal(WorkerError, RuntimeError):
    """The worker's own configuration or credentials are wrong: it stops (exit 2), saying why."""


# The table. An exception is classified by the first class of its MRO found here; a KafkaError
# that is not found counts as transient when aiokafka marks it retriable; anything else is
# per-record.
POLICY: Final[dict[type[BaseException], Disposition]] = {
    # fatal: the worker's own configuration and credentials
    ContractMismatch: FATAL,
    WorkerFatal: FATAL,
    AuthenticationFailedError: FATAL,
    SaslAuthenticationFailed: FATAL,
    UnsupportedSaslMechanismError: FATAL,
    IllegalSaslStateError: FATAL,
    ClusterAuthorizationFailedError: FATAL,
    GroupAuthorizationFailedError: FATAL,
    TransactionalIdAuthorizationFailed: FATAL,
    KafkaConfigurationError: FATAL,
    # fatal to one producer (exactly-once): another worker owns the partition now
    ProducerFenced: FATAL,
    InvalidProducerEpoch: FATAL,
    # per-record: what one record (or its reply topic) causes
    SharedBatchRefused: PER_RECORD,
    MessageSizeTooLargeError: PER_RECORD,
    RecordTooLargeError: PER_RECORD,
    RecordListTooLargeError: PER_RECORD,
    InvalidTimestampError: PER_RECORD,
    PolicyViolationError: PER_RECORD,
    TopicAuthorizationFailedError: PER_RECORD,  # a reply topic this worker may not write
    InvalidTopicError: PER_RECORD,
    CorruptRecordException: PER_RECORD,
    InvalidMessageError: PER_RECORD,
    UnsupportedForMessageFormatError: PER_RECORD,
    UnsupportedCodecError: PER_RECORD,
    AssertionError: PER_RECORD,  # aiokafka asserts on its arguments (e.g. neither key nor value)
    ValueError: PER_RECORD,
    UnicodeError: PER_RECORD,
    # transient: outages and slowness
    KafkaConnectionError: TRANSIENT,
    KafkaTimeoutError: TRANSIENT,
    AckTimeout: TRANSIENT,
    CommitFailedError: TRANSIENT,  # a rebalance: the next owner re-reads from the last commit
    ProducerClosed: TRANSIENT,  # a producer being replaced under a send
    # the broker lost this producer's sequence state (an outage): no fault of the record; the
    # producer is replaced (PRODUCER_STATE_LOST) and the record sent again
    OutOfOrderSequenceNumber: TRANSIENT,
    UnknownProducerId: TRANSIENT,
    InvalidProducerIdMapping: TRANSIENT,
    TimeoutError: TRANSIENT,
    ConnectionError: TRANSIENT,
    OSError: TRANSIENT,
}


def classify(exc: BaseException) -> Disposition:
    """The disposition of ``exc`` by the table above."""
    for cls in type(exc).__mro__:
        found = POLICY.get(cls)
        if found is not None:
            return found
    if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
        return TRANSIENT
    return PER_RECORD


# Errors after which a producer's every later send to the partition fails as well: aiokafka
# gives the batch up and keeps its sequence numbers, so only a new producer id gets through.
PRODUCER_STATE_LOST: Final = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerIdMapping)


def needs_new_producer(exc: BaseException | None) -> bool:
    """True when the producer that met ``exc`` must be replaced before sending again."""
    return isinstance(exc, PRODUCER_STATE_LOST)


def describe(exc: BaseException) -> str:
    """One line for logs, DLQ reasons and error results."""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


async def discard_producer(producer: Any, timeout_s: float = 5.0) -> None:
    """Stops a producer that may hold a batch nobody will ever acknowledge. ``stop()`` flushes
    first and an idempotent or transactional producer never expires a batch, so past
    ``timeout_s`` its sender task is cancelled and its connections closed (aiokafka offers no
    public way to drop a pending batch)."""
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
        return
    except Exception as exc:  # a producer that will not stop cleanly is closed by force below
        log.warning(
            "a producer did not stop within %.0fs (%s): closing it by force", timeout_s, describe(exc)
        )
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout_s)
    client = getattr(producer, "client", None)
    if client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), timeout_s)
