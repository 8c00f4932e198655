"""kombu's Redis transport, hardened for a queue that anyone with broker access can write to.

Two failure modes of the stock transport lose tickets or stop the fleet:

* **Poison bytes.** kombu decodes each popped item with ``json.loads`` inside the consumer's poll
  loop; one non-JSON value pushed onto ``thinfleet.route`` raised ``JSONDecodeError`` out of the
  loop and the worker exited ("Unrecoverable error"). Here an item that is not a kombu envelope
  (bad JSON, not an object, no ``headers``/``properties``/``body``, a body that does not decode)
  becomes a well-formed task message for the routing task carrying only
  ``keys.MALFORMED_KWARG`` (reason, bounded excerpt, size): the task dead-letters it as
  ``malformed`` through the one decision point (``worker.tasks``), and the worker goes on.
* **Bookkeeping refused.** kombu pops a message (``BRPOP``, which Redis allows at
  ``maxmemory``) and only then records it in ``unacked`` (``ZADD``/``HSET``, which Redis
  refuses there). The stock transport raised and the popped ticket existed only in the
  worker's memory. Here the message is still delivered, kept in memory, and recorded by a retry
  on every restore sweep (``unacked_restore_interval``) until Redis accepts it; if it is
  requeued before that, the requeue itself is retried the same way. It is lost only if the
  worker dies before Redis accepts writes again. The retry never blocks the event loop (a
  blocking retry starved the pool's result pipe and the worker died of a torn message).
* **Ack refused.** Over ``maxmemory`` Redis refused even the ack's ``ZREM``/``HDEL`` (sent
  as a MULTI), and the stock ``ack`` raised out of the consumer: the worker died of an
  "Unrecoverable error". Here the ack is finished at the next sweep; until then the message
  stays in ``unacked`` (a redelivery finds the published marker: no second result).
* **Requeue refused.** ``Reject(requeue=True)`` restores the message with a MULTI/EXEC on Redis;
  when Redis refuses writes (``maxmemory`` under ``noeviction``) or is gone, the stock ``reject``
  raised out of the consumer. Here the message then stays in kombu's ``unacked`` hash, where
  ``visibility_timeout`` restores it once Redis accepts writes again.

Selected with Celery's ``broker_transport`` (``worker.app``); the URL stays ``redis://`` or
``rediss://``. Written against kombu 5.7's ``kombu.transport.redis``.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from models import keys
from models.errors import is_transient
from models.schemas import bounded_ticket

log = structlog.get_logger("thinfleet.transport")

_ENVELOPE_KEYS = ("body", "headers", "properties")


def envelope_problem(message: Any) -> str | None:
    """Why ``message`` (a decoded queue item) is not a kombu envelope of a JSON Celery task
    message, or ``None`` when it is one. Pure; never raises."""
    if not isinstance(message, dict):
        return f"queue item is a JSON {type(message).__name__}, not a kombu envelope"
    missing = [k for k in _ENVELOPE_KEYS if k not in message]
    if missing:
        return f"queue item lacks the kombu envelope's {', '.join(missing)}"
    headers, properties = message["headers"], message["properties"]
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        return "the envelope's headers and properties must be objects"
    if not isinstance(headers.get("task"), str) or not isinstance(headers.get("id"), str):
        return "the envelope's headers lack the task name or id (Celery protocol 2)"
    if message.get("content-type", "application/json") != "application/json":
        return f"content type {message.get('content-type')!r} is not application/json"
    body = message["body"]
    try:
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        decoded = json.loads(body)
    except (ValueError, TypeError) as exc:
        return f"the task body does not decode: {exc}"
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict)):
        return "the task body is not Celery protocol 2's [args, kwargs, embed]"
    return None


def malformed_envelope(raw: bytes | str, reason: str, queue: str) -> dict[str, Any]:
    """A kombu envelope of a routing task whose only argument is ``keys.MALFORMED_KWARG``
    (reason, a bounded excerpt of ``raw`` and its size in bytes)."""
    excerpt, size, _ = bounded_ticket(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str)
                                      else raw)
    task_id = str(uuid.uuid4())
    body = [[], {keys.MALFORMED_KWARG: {"reason": f"malformed queue item: {reason}",
                                        "excerpt": excerpt, "bytes": size}},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": keys.ROUTE_TASK, "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None,
                    "expires": None, "timelimit": [None, None], "argsrepr": "()",
                    "kwargsrepr": "{malformed}", "origin": "thinfleet.transport"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": task_id},
    }


def decode_item(item: bytes | str, queue: str) -> dict[str, Any]:
    """Decode one popped queue item: the envelope itself, or ``malformed_envelope`` for
    anything else. Never raises."""
    try:
        message = json.loads(bytes_to_str(item))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        problem = f"not JSON: {exc}"
    else:
        found = envelope_problem(message)
        if found is None:
            return message
        problem = found
    log.warning("malformed_queue_item", queue=queue, problem=problem,
                bytes=len(item) if item is not None else 0)
    return malformed_envelope(item, problem, queue)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS that survives Redis refusing writes (see the module's doc): a message
    whose ``unacked`` record was refused is delivered and recorded later; a refused requeue
    leaves a recorded message in ``unacked`` (for the visibility timeout) and an unrecorded one
    in memory (retried every sweep)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: delivered, but Redis refused the ``unacked`` record (tag -> kombu Message)
        self.unrecorded: dict[str, Any] = {}
        #: rejected with requeue before it was ever recorded (tag -> kombu Message)
        self.to_requeue: dict[str, Any] = {}
        #: acked (or rejected without requeue) while Redis refused the removal
        self.to_ack: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except Exception as exc:
            if not is_transient(exc):
                raise
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)  # local bookkeeping
            self.unrecorded[delivery_tag] = message
            log.warning("unacked_record_refused_kept_in_memory", delivery_tag=delivery_tag,
                        error=str(exc)[:300], pending=len(self.unrecorded))

    def ack(self, delivery_tag: str) -> None:
        self.unrecorded.pop(delivery_tag, None)
        try:
            super().ack(delivery_tag)
        except Exception as exc:  # noqa: BLE001 - _defer_ack re-raises non-transient errors
            self._defer_ack(delivery_tag, exc)

    def _defer_ack(self, delivery_tag: str, exc: Exception) -> None:
        """Redis refused the ack's ``ZREM``/``HDEL`` (a MULTI over ``maxmemory``): forget the
        message locally and retry the removal at each sweep. Until then it stays in
        ``unacked``; if the visibility timeout passes first it is redelivered, and the worker
        finds its published marker (no second result). Non-transient errors re-raise."""
        if not is_transient(exc):
            raise exc
        self.to_ack.add(delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)
        log.warning("ack_refused_retrying", delivery_tag=delivery_tag, error=str(exc)[:300],
                    pending=len(self.to_ack))

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self.unrecorded.pop(delivery_tag, None)
        if requeue and message is not None:
            self.to_requeue[delivery_tag] = message
            kombu_redis.virtual.QoS.ack(self, delivery_tag)  # local only; Redis never had it
            self.flush_pending()
            return
        if not requeue:
            try:
                super().reject(delivery_tag, requeue=False)
            except Exception as exc:  # noqa: BLE001 - _defer_ack re-raises non-transient ones
                self._defer_ack(delivery_tag, exc)
            return
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        except Exception as exc:  # noqa: BLE001 - any Redis refusal: keep it for redelivery
            log.warning("requeue_refused_kept_unacked", delivery_tag=delivery_tag,
                        error=str(exc)[:300], error_type=type(exc).__name__)
        # Forget it locally (frees the prefetch slot); if the restore failed, Redis keeps it
        # in ``unacked`` and the visibility timeout brings it back.
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def flush_pending(self) -> None:
        """Record unrecorded deliveries, finish deferred acks and push pending requeues; stops
        at the first refusal (Redis still refuses writes) and is tried again at the next sweep.
        Never raises."""
        for tag, message in list(self.unrecorded.items()):
            try:
                kombu_redis.QoS.append(self, message, tag)
            except Exception:  # noqa: BLE001 - still refused: next sweep
                return
            self.unrecorded.pop(tag, None)
            log.info("unacked_record_written_late", delivery_tag=tag)
        for tag in list(self.to_ack):
            try:
                self._remove_from_indices(tag).execute()
            except Exception:  # noqa: BLE001 - still refused: next sweep
                return
            self.to_ack.discard(tag)
        for tag, message in list(self.to_requeue.items()):
            info = message.delivery_info
            try:
                with self.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                    self.channel._do_restore_message(message._raw, info["exchange"],
                                                     info["routing_key"], pipe, True)
                    pipe.execute()
            except Exception:  # noqa: BLE001 - still refused: next sweep
                return
            self.to_requeue.pop(tag, None)
            log.info("requeued_late", delivery_tag=tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        self.flush_pending()
        return super().restore_visible(*args, **kwargs)

    def restore_unacked(self, client: Any = None) -> None:
        for tag in list(self.unrecorded):
            self.to_requeue[tag] = self.unrecorded.pop(tag)
            self._delivered.pop(tag, None)  # type: ignore[attr-defined]
        self.flush_pending()
        if self.to_requeue:
            log.error("tickets_lost_at_shutdown", count=len(self.to_requeue),
                      messages=[str(m._raw)[:512] for m in self.to_requeue.values()])
        super().restore_unacked(client)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with ``decode_item`` in place of its bare ``json.loads``."""

    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self.connection._deliver(decode_item(item, dest), dest)
                return True
            raise kombu_redis.Empty()
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    return decode_item(item, queue)
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above (``broker_transport`` in Celery)."""

    Channel = Channel
