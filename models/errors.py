"""One rooted exception tree for the whole fleet, and the one function that decides by it.

``failure_of(exc)`` is the only place that turns an exception into a decision; the worker's
task wrapper (``worker.tasks.settle_failure``) acts on what it returns:

=====================================  ==================  ===========================================
exception                              ``Failure``         what the worker does
=====================================  ==================  ===========================================
``MalformedMessage``                   ``malformed``       dead-letter now (the task message itself is
                                                           not a ticket: no args, bad JSON...)
``TicketRejected``                     ``invalid_ticket``  dead-letter now, never retried
``TransientError``, Redis and kombu    ``transient``       retry with exponential backoff; after the
connection errors, Redis refusing                          attempt cap, dead-letter with
writes (OOM, read-only replica),                           ``retryable=True``
``InferenceError``, the soft time
limit, ``OSError``, ``MemoryError``
``AttemptsExhausted``                  ``exhausted``       dead-letter (the ticket crashed or hung its
                                                           worker on every attempt)
anything else (a bug: ``TypeError``,   ``permanent``       dead-letter now with ``retryable=False``:
``KeyError``, a pydantic error...)                         the same input gives the same error
=====================================  ==================  ===========================================

``ModelUnavailable`` and ``TaxonomyError`` are raised at boot only: the worker refuses to start.
"""

from __future__ import annotations

from enum import StrEnum


class ThinfleetError(Exception):
    """Root of every error thinfleet raises on purpose."""


class TicketRejected(ThinfleetError):
    """The ticket is invalid (empty, oversized, malformed); retrying cannot help."""


class MalformedMessage(TicketRejected):
    """The task message is not a ticket at all (no arguments, extra arguments, undecodable
    bytes on the queue); it is dead-lettered with a bounded excerpt of what arrived.

    ``excerpt`` and ``size_bytes`` carry what ``worker.transport`` kept of undecodable bytes.
    """

    def __init__(self, reason: str, excerpt: str | None = None, size_bytes: int | None = None):
        super().__init__(reason)
        self.excerpt = excerpt
        self.size_bytes = size_bytes


class ModelUnavailable(ThinfleetError):
    """The model is missing, corrupt, mismatched or unreachable; the worker must not start."""


class TransientError(ThinfleetError):
    """A passing failure (Redis or S3 briefly unreachable); worth retrying with backoff."""


class InferenceError(TransientError):
    """llama.cpp failed mid-decode (no KV slot, compute error); the next attempt starts clean."""


class AttemptsExhausted(ThinfleetError):
    """A ticket's attempts ran out without one finishing (it crashed or hung its worker)."""


class TaxonomyError(ThinfleetError):
    """The taxonomy file is missing or does not validate."""


class TrainingInterrupted(ThinfleetError):
    """Training stopped before its last step (``stop_after_steps``, Ctrl-C, SIGTERM) after
    saving a checkpoint; running it again with the same recipe and data resumes it."""


class Failure(StrEnum):
    """What kind of failure an exception is; written into each dead-letter entry."""

    MALFORMED = "malformed"
    INVALID_TICKET = "invalid_ticket"
    TRANSIENT = "transient"
    EXHAUSTED = "exhausted"
    PERMANENT = "permanent"

    @property
    def retryable(self) -> bool:
        """True when the same ticket could succeed later (re-submitting it may help)."""
        return self in (Failure.TRANSIENT, Failure.EXHAUSTED)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Foreign exceptions that mean "the infrastructure, not the ticket"."""
    import redis
    from celery.exceptions import SoftTimeLimitExceeded
    from kombu.exceptions import OperationalError

    return (TransientError, redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
            redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
            redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
            OperationalError, SoftTimeLimitExceeded, OSError, MemoryError)


def is_transient(exc: BaseException) -> bool:
    """True for failures of the infrastructure (Redis, the broker, time limits), which a later
    attempt may not meet; see the module's table."""
    return isinstance(exc, _transient_types())


def failure_of(exc: BaseException) -> Failure:
    """Classify ``exc`` by the tree (the module's table). Never raises."""
    if isinstance(exc, MalformedMessage):
        return Failure.MALFORMED
    if isinstance(exc, TicketRejected):
        return Failure.INVALID_TICKET
    if isinstance(exc, AttemptsExhausted):
        return Failure.EXHAUSTED
    if is_transient(exc):
        return Failure.TRANSIENT
    return Failure.PERMANENT
