"""The producer library: validate, dedupe, enqueue; read results.

Tickets go to the Celery queue ``keys.ROUTE_QUEUE`` by task name, so a producer never imports
worker code (or llama.cpp). Dedupe: the first ``submit`` of a ticket_id within
``dedupe_window_s`` claims ``keys.dedupe_key(ticket_id)`` with ``SET NX EX``, storing its task
id; later submits in the window return that task id with ``duplicate=True``. If publishing fails
the claim is released, so a retry can enqueue it: nothing is lost and nothing doubles.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from pydantic import ValidationError

from models import keys
from models.errors import TicketRejected, TransientError
from models.schemas import DeadLetterEntry, RoutedResult, TicketEvent
from producer.settings import ProducerSettings


@dataclass(frozen=True)
class Receipt:
    """What ``submit`` did with one ticket: its Celery ``task_id``; ``duplicate`` when it had
    already been enqueued within the dedupe window (``task_id`` is then the first one's)."""

    ticket_id: str
    task_id: str
    duplicate: bool


@dataclass(frozen=True)
class StreamEntry:
    """One entry read from the results or dead-letter stream."""

    stream: str
    entry_id: str
    document: dict[str, Any]


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Producer:
    """Enqueue tickets and read what the fleet publishes.

    Raises ``TicketRejected`` for invalid tickets (nothing is enqueued) and ``TransientError``
    when Redis cannot be reached (nothing is half-enqueued).
    """

    def __init__(self, settings: ProducerSettings | None = None):
        self.settings = settings or ProducerSettings()
        self.redis = self.settings.redis_client(
            socket_timeout=self.settings.redis_timeout_s,
            socket_connect_timeout=self.settings.redis_timeout_s)
        self.celery = Celery("thinfleet-producer", broker=self.settings.broker_url())
        self.celery.conf.update(broker_use_ssl=self.settings.broker_use_ssl(),
                                task_serializer="json", accept_content=["json"],
                                task_default_queue=keys.ROUTE_QUEUE,
                                broker_connection_timeout=self.settings.redis_timeout_s,
                                broker_connection_max_retries=1)

    # ---- enqueue -------------------------------------------------------------------------------
    def validate(self, ticket: TicketEvent | Mapping[str, Any]) -> TicketEvent:
        """Validate against the contract and this producer's size limit; raise ``TicketRejected``."""
        data = ticket.model_dump() if isinstance(ticket, TicketEvent) else dict(ticket)
        try:
            return TicketEvent.model_validate(
                data, context={"max_ticket_bytes": self.settings.max_ticket_bytes})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'ticket'}: {e['msg']}"
                                 for e in exc.errors())
            raise TicketRejected(f"invalid ticket: {problems}") from exc

    def submit(self, ticket: TicketEvent | Mapping[str, Any]) -> Receipt:
        """Validate, dedupe and enqueue one ticket; returns its ``Receipt``."""
        event = self.validate(ticket)
        task_id = str(uuid.uuid4())
        dedupe = keys.dedupe_key(event.ticket_id)
        try:
            if not self.redis.set(dedupe, task_id, nx=True, ex=self.settings.dedupe_window_s):
                first = self.redis.get(dedupe)
                return Receipt(event.ticket_id, _decode(first) if first else "", True)
            payload = event.model_copy(update={"enqueued_at": datetime.now(UTC)})
            try:
                self.celery.send_task(keys.ROUTE_TASK, args=[payload.model_dump(mode="json")],
                                      task_id=task_id, queue=keys.ROUTE_QUEUE)
            except Exception:
                self.redis.delete(dedupe)
                raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise TransientError(f"cannot reach Redis at {self._where()}: {exc}") from exc
        return Receipt(event.ticket_id, task_id, False)

    def submit_many(self, tickets: Iterable[TicketEvent | Mapping[str, Any]]) -> list[Receipt]:
        """``submit`` each ticket in order; stops at the first invalid one (``TicketRejected``)."""
        return [self.submit(ticket) for ticket in tickets]

    def queue_depth(self) -> int:
        """Tickets waiting in the queue (``LLEN``; excludes ones prefetched or running, which
        kombu keeps in its ``unacked`` hash)."""
        return int(self.redis.llen(keys.ROUTE_QUEUE))

    def wait_for_queue_below(self, limit: int, timeout_s: float | None = None) -> float:
        """Block while the queue is deeper than ``limit`` (backpressure); returns seconds waited."""
        started = time.monotonic()
        while self.queue_depth() > limit:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TransientError(f"queue stayed above {limit} for {timeout_s}s")
            time.sleep(self.settings.backpressure_poll_s)
        return time.monotonic() - started

    # ---- results -------------------------------------------------------------------------------
    def read(self, streams: Mapping[str, str], block_ms: int | None = None, count: int = 100
             ) -> list[StreamEntry]:
        """``XREAD`` from ``{stream: last_id}``; returns parsed entries (JSON under ``json``)."""
        raw: Any = self.redis.xread(dict(streams), count=count, block=block_ms)  # type: ignore[arg-type]
        out = []
        for stream, entries in raw or []:
            for entry_id, fields in entries:
                body = fields.get(keys.STREAM_FIELD.encode()) or fields.get(keys.STREAM_FIELD)
                out.append(StreamEntry(_decode(stream), _decode(entry_id), json.loads(body)))
        return out

    def follow(self, stream: str = keys.RESULTS_STREAM, start_id: str = "0-0",
               block_ms: int = 5000, stop_when_idle: bool = False) -> Iterator[StreamEntry]:
        """Yield entries of ``stream`` from ``start_id`` on, blocking for new ones.

        With ``stop_when_idle`` the generator ends after one empty ``block_ms`` wait.
        """
        last = start_id
        while True:
            batch = self.read({stream: last}, block_ms=block_ms)
            if not batch and stop_when_idle:
                return
            for entry in batch:
                last = entry.entry_id
                yield entry

    def stream_tail_ids(self) -> dict[str, str]:
        """The current last id of the results and dead-letter streams (``0-0`` if empty)."""
        ids = {}
        for stream in (keys.RESULTS_STREAM, keys.DEAD_LETTER_STREAM):
            last = self.redis.xrevrange(stream, count=1)
            ids[stream] = _decode(last[0][0]) if last else "0-0"
        return ids

    def route(self, ticket: TicketEvent | Mapping[str, Any], timeout_s: float = 60.0
              ) -> RoutedResult | DeadLetterEntry:
        """Submit a ticket and wait for its result (or dead-letter entry): the synchronous
        ``/classify_ticket`` experience on top of the queue.

        Raises ``TimeoutError`` if nothing arrives within ``timeout_s``.
        """
        positions = self.stream_tail_ids()
        receipt = self.submit(ticket)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            for entry in self.read(positions, block_ms=max(1, int(min(left, 1.0) * 1000))):
                positions[entry.stream] = entry.entry_id
                if entry.document.get("ticket_id") == receipt.ticket_id:
                    if entry.stream == keys.RESULTS_STREAM:
                        return RoutedResult.model_validate(entry.document)
                    return DeadLetterEntry.model_validate(entry.document)
        raise TimeoutError(f"no result for ticket {receipt.ticket_id} within {timeout_s}s")

    def _where(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
