"""Pydantic v2 schemas for everything that crosses Redis.

* ``TicketEvent``      producer -> Celery queue -> worker
* ``RoutedResult``     worker -> results stream -> consumers
* ``DeadLetterEntry``  worker -> dead-letter stream -> operators

Sizes are bytes of UTF-8, times are milliseconds (``*_ms``) unless a name says otherwise.
The ticket's text limit is configurable per process: validate with
``TicketEvent.model_validate(data, context={"max_ticket_bytes": n})`` (default 8 KiB).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from models.errors import Failure
from models.keys import DEAD_LETTER_EXCERPT_CHARS, DEAD_LETTER_TICKET_BYTES, DEFAULT_MAX_TICKET_BYTES

MAX_METADATA_ITEMS = 32
MAX_METADATA_VALUE_CHARS = 1024


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class TicketEvent(BaseModel):
    """One support ticket to route.

    ``ticket_id`` is the caller's id and the idempotency key: the producer enqueues one id once
    per dedupe window, and the worker publishes one result per (ticket_id, model sha256).
    ``text`` must be non-blank and at most ``max_ticket_bytes`` of UTF-8 (validation context,
    default 8 KiB). ``enqueued_at`` is stamped by the producer and yields the queue-wait timing.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    ticket_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\s\x00-\x1f]+$")
    text: str
    subject: str | None = Field(default=None, max_length=1024)
    created_at: datetime | None = None
    source: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] = Field(default_factory=dict)
    enqueued_at: datetime | None = None

    @field_validator("text")
    @classmethod
    def _text_size(cls, text: str, info: ValidationInfo) -> str:
        limit = DEFAULT_MAX_TICKET_BYTES
        if info.context and "max_ticket_bytes" in info.context:
            limit = int(info.context["max_ticket_bytes"])
        if not text.strip():
            raise ValueError("ticket text is empty")
        size = len(text.encode("utf-8"))
        if size > limit:
            raise ValueError(f"ticket text is {size} bytes of UTF-8, over the {limit}-byte limit")
        return text

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, metadata: dict[str, str]) -> dict[str, str]:
        if len(metadata) > MAX_METADATA_ITEMS:
            raise ValueError(f"metadata has {len(metadata)} items, over {MAX_METADATA_ITEMS}")
        for key, value in metadata.items():
            if len(key) > 64 or len(value) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"metadata item {key[:64]!r} is too long")
        return metadata


class ModelRef(BaseModel):
    """Which model produced a result: file name and the sha256 it was verified against."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Timings(BaseModel):
    """Where a ticket's time went, in milliseconds.

    ``queue_wait_ms`` runs from the producer's ``enqueued_at`` to the task's start (so it includes
    clock skew between hosts); ``prompt_eval_ms`` is the ticket's own tokens through the model;
    ``decode_ms`` is label and field decoding; ``total_ms`` is the task's wall time.
    """

    queue_wait_ms: float | None = None
    prompt_eval_ms: float
    decode_ms: float
    total_ms: float


class RoutedResult(BaseModel):
    """A routed ticket, as published on the results stream (JSON under field ``json``).

    ``label`` is always one of the taxonomy's labels. ``confidence`` in [0, 1] is the model's
    probability of that label, normalised over the label set. ``route`` is the label's route, or
    the taxonomy's ``fallback_route`` when confidence is below its threshold (``status``
    ``"fallback"``). ``fields`` holds the taxonomy's extraction fields, if it asks for any.
    ``flags`` lists why a ticket was held back regardless of confidence, e.g.
    ``injection:label_identifier`` (``worker.guard``): such a ticket has ``status: "fallback"``;
    ``injection:redacted`` beside them says that its ``label``, ``confidence`` and ``fields`` were
    read from the ticket without the flagged sentences (``InjectionGuard.screen``);
    ``injection:label_name`` that they were pooled from two readings, with and without the
    sentences (or words) naming a label, because the names had pulled the label away from the
    rest of the ticket (``guarded_route``).
    ``rejected_fields`` names the generated fields whose value repeated the prompt instead of the
    ticket (``worker.spans.echoes_prompt``); they read ``Unknown``.
    """

    ticket_id: str
    label: str
    route: str
    confidence: float = Field(ge=0.0, le=1.0)
    status: Literal["routed", "fallback"]
    fields: dict[str, str] = Field(default_factory=dict)
    flags: list[str] = Field(default_factory=list)
    rejected_fields: list[str] = Field(default_factory=list)
    taxonomy: str
    model: ModelRef
    timings: Timings
    tokens_in: int = Field(ge=0)
    tokens_out: int = Field(ge=0)
    worker: str
    attempt: int = Field(ge=1)
    routed_at: datetime = Field(default_factory=utcnow)


class DeadLetterEntry(BaseModel):
    """A ticket the fleet gave up on, with the reason (JSON under field ``json``).

    ``failure`` says what kind of failure it was (``models.errors.Failure``: ``invalid_ticket``,
    ``malformed``, ``permanent``, ``transient``, ``exhausted``) and ``retryable`` whether
    re-submitting the same ticket could succeed (``transient`` or ``exhausted``) or not.
    ``ticket`` is the event as received when it is an object of at most
    ``keys.DEAD_LETTER_TICKET_BYTES`` of clean UTF-8 JSON; anything else (oversized, not an
    object, lone surrogates, undecodable bytes) is kept as a bounded excerpt string of at most
    ``keys.DEAD_LETTER_EXCERPT_CHARS`` characters, with ``ticket_truncated`` set. ``ticket_bytes``
    is the size of what arrived, in bytes of JSON. ``worker`` is the Celery node name.
    """

    ticket_id: str | None
    task_id: str | None
    reason: str
    error_type: str
    failure: Failure = Failure.PERMANENT
    retryable: bool
    attempts: int
    ticket: dict[str, Any] | str | None
    ticket_bytes: int | None = None
    ticket_truncated: bool = False
    worker: str
    dead_lettered_at: datetime = Field(default_factory=utcnow)


def bounded_ticket(payload: Any, limit_bytes: int = DEAD_LETTER_TICKET_BYTES,
                   excerpt_chars: int = DEAD_LETTER_EXCERPT_CHARS
                   ) -> tuple[dict[str, Any] | str | None, int | None, bool]:
    """What a dead-letter entry may keep of ``payload``: ``(ticket, ticket_bytes, truncated)``.

    An object of at most ``limit_bytes`` of clean UTF-8 JSON is kept whole. Anything else is
    kept as the first ``excerpt_chars`` characters of its ASCII-escaped JSON (lone surrogates
    become ``\\udXXX``), so that a dead-letter entry always serialises and an attacker cannot
    fill Redis through the dead-letter stream. Raw ``bytes`` are decoded with
    ``backslashreplace`` first. Never raises.
    """
    size: int | None = None
    if payload is None:
        return None, None, False
    if isinstance(payload, bytes | bytearray):
        text = bytes(payload).decode("utf-8", errors="backslashreplace")
        return text[:excerpt_chars], len(payload), len(payload) > excerpt_chars
    clean: bytes | None = None
    try:
        clean = json.dumps(payload, ensure_ascii=False, default=repr).encode("utf-8")
        size = len(clean)
    except (UnicodeEncodeError, ValueError, TypeError, RecursionError):
        pass
    if clean is not None and isinstance(payload, dict) and len(clean) <= limit_bytes:
        return payload, size, False
    try:
        escaped = json.dumps(payload, ensure_ascii=True, default=repr)
    except (ValueError, TypeError, RecursionError):
        escaped = repr(payload)
    if size is None:
        size = len(escaped)
    return escaped[:excerpt_chars], size, len(escaped) > excerpt_chars
