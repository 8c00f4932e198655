"""The producer library: validate, dedupe, enqueue; read results.

Tickets go to the Celery queue ``keys.ROUTE_QUEUE`` by task name, so a producer never imports
worker code (or llama.cpp). Dedupe: the first ``submit`` of a ticket_id within
``dedupe_window_s`` claims ``keys.dedupe_key(ticket_id)`` with ``SET NX EX``, storing its task
id; later submits in the window return that task id with ``duplicate=True``. If publishing fails
the claim is released, so a retry can enqueue it: nothing is lost and nothing doubles.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from pydantic import ValidationError

from models import keys
from models.errors import TicketRejected, TransientError, is_transient
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

    @contextlib.contextmanager
    def _transient(self, doing: str) -> Iterator[None]:
        """Turn Redis and broker failures (unreachable, timing out, refusing writes at
        ``maxmemory``) into ``TransientError`` naming the server, with the cause chained."""
        try:
            yield
        except TransientError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise TransientError(f"cannot reach Redis at {self._where()} to {doing} "
                                 f"({type(exc).__name__}: {exc})") from exc

    def __init__(self, settings: ProducerSettings | None = None):
        self.settings = settings or ProducerSettings()
        self.redis = self.settings.redis_client(
            socket_timeout=self.settings.redis_timeout_s,
            socket_connect_timeout=self.settings.redis_timeout_s)
        self.celery = Celery("thinfleet-producer", broker=self.settings.broker_url())
        self.celery.conf.update(broker_use_ssl=self.settings.broker_use_ssl(),
                                task_serializer="json", accept_content=["json"],
                                task_default_queue=keys.ROUTE_QUEUE,
                                # a task-sent event per ticket: Flower shows queued tickets
                                task_send_sent_event=True,
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
        """Validate, dedupe and enqueue one ticket; returns its ``Receipt``.

        Raises ``TicketRejected`` (invalid; nothing enqueued) or ``TransientError`` (Redis or the
        broker unreachable or refusing writes; the dedupe claim is released, so nothing is
        half-enqueued and a later submit of the same ticket enqueues it).
        """
        event = self.validate(ticket)
        task_id = str(uuid.uuid4())
        dedupe = keys.dedupe_key(event.ticket_id)
        with self._transient("claim the ticket id"):
            claimed = self.redis.set(dedupe, task_id, nx=True, ex=self.settings.dedupe_window_s)
            if not claimed:
                first = self.redis.get(dedupe)
                return Receipt(event.ticket_id, _decode(first) if first else "", True)
        payload = event.model_copy(update={"enqueued_at": datetime.now(UTC)})
        try:
            with self._transient("enqueue the ticket"):
                self.celery.send_task(keys.ROUTE_TASK, args=[payload.model_dump(mode="json")],
                                      task_id=task_id, queue=keys.ROUTE_QUEUE)
        except BaseException:
            self.release_claim(event.ticket_id, task_id)
            raise
        return Receipt(event.ticket_id, task_id, False)

    def release_claim(self, ticket_id: str, task_id: str) -> bool:
        """Delete the dedupe claim of ``ticket_id`` if it still holds ``task_id`` (after a failed
        enqueue). Returns whether it was released; a Redis that is gone keeps it until the
        dedupe window ends, and ``submit`` then reports a duplicate of a task that never ran,
        which ``route`` and ``outcome`` answer with ``None``."""
        with contextlib.suppress(Exception):
            script = "if redis.call('GET', KEYS[1]) == ARGV[1] then " \
                     "return redis.call('DEL', KEYS[1]) else return 0 end"
            return bool(self.redis.eval(script, 1, keys.dedupe_key(ticket_id), task_id))
        return False

    def submit_many(self, tickets: Iterable[TicketEvent | Mapping[str, Any]]) -> list[Receipt]:
        """``submit`` each ticket in order; stops at the first invalid one (``TicketRejected``)."""
        return [self.submit(ticket) for ticket in tickets]

    def queue_depth(self) -> int:
        """Tickets waiting in the queue (``LLEN``; excludes ones prefetched or running, which
        kombu keeps in its ``unacked`` hash)."""
        with self._transient("read the queue depth"):
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
        with self._transient("read the streams"):
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
        with self._transient("read the stream tails"):
            for stream in (keys.RESULTS_STREAM, keys.DEAD_LETTER_STREAM):
                last = self.redis.xrevrange(stream, count=1)
                ids[stream] = _decode(last[0][0]) if last else "0-0"
        return ids

    def outcome(self, ticket_id: str) -> RoutedResult | DeadLetterEntry | None:
        """The newest result or dead-letter entry of ``ticket_id`` (from ``keys.outcome_key``,
        which the worker writes with the entry), or ``None`` if it has none (yet, or any more:
        the pointer expires with the result marker, or the stream trimmed the entry)."""
        with self._transient("read the ticket's outcome"):
            pointer = self.redis.get(keys.outcome_key(ticket_id))
            if not pointer:
                return None
            stream, _, entry_id = _decode(pointer).partition(" ")
            found = self.redis.xrange(stream, entry_id, entry_id)
        if not found:
            return None
        fields: Any = found[0][1]
        document = json.loads(fields.get(keys.STREAM_FIELD.encode()) or fields[keys.STREAM_FIELD])
        if stream == keys.RESULTS_STREAM:
            return RoutedResult.model_validate(document)
        return DeadLetterEntry.model_validate(document)

    def route(self, ticket: TicketEvent | Mapping[str, Any], timeout_s: float = 60.0
              ) -> RoutedResult | DeadLetterEntry:
        """Submit a ticket and wait for its result (or dead-letter entry): the synchronous
        ``/classify_ticket`` experience on top of the queue.

        A ticket id submitted before (within the dedupe window) is not routed again: its
        existing result or dead-letter entry is returned at once, or awaited if it is still in
        flight. Raises ``TimeoutError`` if nothing arrives within ``timeout_s``,
        ``TicketRejected`` and ``TransientError`` as ``submit`` does.
        """
        positions = self.stream_tail_ids()
        receipt = self.submit(ticket)
        if receipt.duplicate:
            earlier = self.outcome(receipt.ticket_id)
            if earlier is not None:
                return earlier
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
