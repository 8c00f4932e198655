"""kombu's Redis transport, hardened for a queue that anyone with broker access can write to.

The stock transport loses tickets or stops the fleet in five ways:

* **Popped, then killed.** kombu's ``BRPOP`` removes a message from the queue, and only when
  the worker has read the reply does it write the ``unacked`` record. A worker killed in
  between (``kill -9``, an OOM kill, a node lost) loses that message for good: Redis has handed
  it out, nothing records it. The window is the time from Redis' reply to the worker reading
  it, which on a starved CPU is long: a fleet test lost one ticket of 30 this way, and a
  worker frozen (``SIGSTOP``) while blocked in ``BRPOP`` and then killed loses the next message
  every time, with the stock transport and with this one before the fix. Here the pop is a
  ``BLMOVE`` into the consumer's own in-flight list (``keys.inflight_key``), atomic in Redis,
  and one Lua script (``_CLAIM``) writes the ``unacked`` record and removes it from that list,
  atomic again. At every moment the message is in the queue, in an in-flight list or in
  ``unacked``. The list of a consumer that stopped polling (``keys.INFLIGHT_REGISTRY``) for
  the visibility timeout is handed back by any worker's restore sweep. Redis >= 6.2.
* **Poison bytes.** kombu decodes each popped item with ``json.loads`` inside the consumer's poll
  loop; one non-JSON value pushed onto ``thinfleet.route`` raised ``JSONDecodeError`` out of the
  loop and the worker exited ("Unrecoverable error"). Here an item that is not a kombu envelope
  (bad JSON, not an object, no ``headers``/``properties``/``body``, a body that does not decode)
  becomes a well-formed task message for the routing task carrying only
  ``keys.MALFORMED_KWARG`` (reason, bounded excerpt, size): the task dead-letters it as
  ``malformed`` through the one decision point (``worker.tasks``), and the worker goes on.
* **Bookkeeping refused.** The stock transport pops a message and only then records it in
  ``unacked`` (``ZADD``/``HSET``), which Redis refuses at ``maxmemory``: the popped ticket
  existed only in the worker's memory. Here the pop and the record are one atomic hand-over
  (above): Redis refuses the move itself at ``maxmemory`` (``BLMOVE`` is ``denyoom``), or the
  claim, which leaves the message in the worker's in-flight list; the consumer then waits
  ``Channel.backoff_s`` and tries again, and nothing is held only in memory.
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
import contextlib
import json
import uuid
from time import monotonic, time
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


def malformed_envelope(raw: bytes | str, reason: str, queue: str,
                       delivery_tag: str | None = None) -> dict[str, Any]:
    """A kombu envelope of a routing task whose only argument is ``keys.MALFORMED_KWARG``
    (reason, a bounded excerpt of ``raw`` and its size in bytes), under ``delivery_tag`` (the
    tag its ``unacked`` record was written under) or a new one."""
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
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": delivery_tag or task_id},
    }


def decode_item(item: bytes | str, queue: str, delivery_tag: str | None = None) -> dict[str, Any]:
    """Decode one popped queue item: the envelope itself, or ``malformed_envelope`` for
    anything else. With ``delivery_tag`` (the tag ``_CLAIM`` recorded it under) the envelope
    carries that tag, so its ack removes that record. Never raises."""
    try:
        message = json.loads(bytes_to_str(item))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        problem = f"not JSON: {exc}"
    else:
        found = envelope_problem(message)
        if found is None:
            if delivery_tag is not None:
                message["properties"]["delivery_tag"] = delivery_tag
            return message
        problem = found
    log.warning("malformed_queue_item", queue=queue, problem=problem,
                bytes=len(item) if item is not None else 0)
    return malformed_envelope(item, problem, queue, delivery_tag)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS for messages that ``Channel.claim`` recorded with their pop, and that
    survives Redis refusing writes: a refused ack is finished at a later sweep, and a refused
    requeue leaves the message in ``unacked`` for the visibility timeout."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: acked (or rejected without requeue) while Redis refused the removal
        self.to_ack: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        claimed: set[str] = getattr(self.channel, "claimed", set())
        if delivery_tag in claimed:  # ``_CLAIM`` wrote the record with the pop
            claimed.discard(delivery_tag)
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)  # not claimed here: kombu's own record

    def ack(self, delivery_tag: str) -> None:
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
        """Finish deferred acks; stops at the first refusal (Redis still refuses writes) and is
        tried again at the next sweep. Never raises."""
        for tag in list(self.to_ack):
            try:
                self._remove_from_indices(tag).execute()
            except Exception:  # noqa: BLE001 - still refused: next sweep
                return
            self.to_ack.discard(tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        self.flush_pending()
        sweep = getattr(self.channel, "sweep_inflight", None)
        if sweep is not None:
            sweep()
        return super().restore_visible(*args, **kwargs)


# ---- the atomic hand-over (module doc, "Popped, then killed") --------------------------------

#: Shared Lua: record the rightmost item of list ``src`` in kombu's ``unacked`` hash and index
#: (when ``record_it``), then pop it; returns ``{tag, item}`` or false. The record is what
#: kombu's ``QoS.append`` writes (``[message, exchange, routing_key]``), with the item's own
#: JSON text spliced in verbatim (re-encoding would turn ``[]`` into ``{}``). An item that is
#: not a kombu envelope is recorded as a JSON string under ``tag_if_malformed`` and restored
#: byte for byte (``Channel._do_restore_message``). Writes come before the pop: a script
#: refused half-way (Redis over ``maxmemory``) leaves the item where it was.
_CLAIM_FN = """
local function claim(src, index_key, hash_key, score, tag_if_malformed, queue, record_it)
  local item = redis.call('LINDEX', src, -1)
  if not item then return false end
  local tag, record
  local ok, msg = pcall(cjson.decode, item)
  local props = ok and type(msg) == 'table' and msg['properties']
  if type(props) == 'table' and type(props['delivery_tag']) == 'string'
      and type(props['delivery_info']) == 'table' then
    local ex, rk = props['delivery_info']['exchange'], props['delivery_info']['routing_key']
    if type(ex) ~= 'string' then ex = '' end
    if type(rk) ~= 'string' then rk = queue end
    tag = props['delivery_tag']
    record = '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']'
  else
    tag = tag_if_malformed
    record = cjson.encode({item, '', queue})
  end
  if record_it then
    redis.call('HSET', hash_key, tag, record)
    redis.call('ZADD', index_key, score, tag)
  end
  redis.call('RPOP', src)
  return {tag, item}
end
"""

#: KEYS: src, unacked index, unacked hash. ARGV: score (epoch s), tag if malformed, queue,
#: "1" to record (``"0"`` for a no-ack queue).
_CLAIM = _CLAIM_FN + "return claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], " \
                     "ARGV[4] == '1')"

#: KEYS: an in-flight list, unacked index, unacked hash, the registry. ARGV: ceiling (epoch s),
#: tag prefix, queue. If the list's consumer has not polled since the ceiling, record each of
#: its items as due at once (score 0: the same sweep's ``restore_visible`` requeues them) and
#: drop it from the registry; returns how many, or -1 when the consumer polled since.
_ORPHAN = _CLAIM_FN + """
local stamp = redis.call('ZSCORE', KEYS[4], KEYS[1])
if stamp and tonumber(stamp) > tonumber(ARGV[1]) then return -1 end
local n = 0
while claim(KEYS[1], KEYS[2], KEYS[3], 0, ARGV[2] .. ':' .. n, ARGV[3], true) do n = n + 1 end
redis.call('ZREM', KEYS[4], KEYS[1])
return n
"""

#: KEYS: the registry, this consumer's in-flight lists, then the queue keys in kombu's order.
#: ARGV: now (epoch s), how many in-flight lists. Stamps the lists, and returns the 1-based
#: index of the first non-empty key (an in-flight list first), or 0.
_PREPARE = """
local n = tonumber(ARGV[2])
for i = 2, n + 1 do redis.call('ZADD', KEYS[1], ARGV[1], KEYS[i]) end
for i = 2, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return i - 1 end
end
return 0
"""

#: KEYS: the registry, then pairs (in-flight list, its queue). Moves whatever is left in each
#: list to the head of its queue (next to be popped) and drops the lists from the registry.
_GIVE_BACK = """
local moved = 0
for i = 2, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'RIGHT', 'RIGHT') do moved = moved + 1 end
  redis.call('ZREM', KEYS[1], KEYS[i])
end
return moved
"""


class Channel(kombu_redis.Channel):
    """kombu's Redis channel that consumes with an atomic hand-over (``BLMOVE`` into its own
    in-flight list, then ``_CLAIM``) in place of ``BRPOP``, and with ``decode_item`` in place of
    its bare ``json.loads``.

    A poll is one ``_PREPARE`` (stamp this consumer's in-flight lists; find a non-empty key),
    then one ``BLMOVE`` on the connection kombu's event loop watches, and on its reply one
    ``_CLAIM``: one round trip more per message than the stock transport. A consumer of several
    queues (or priority steps) blocks on the first non-empty one, or on the first queue when all
    are empty, so a message on another queue waits up to ``brpop_timeout`` (1 s) when all were
    empty at the poll. Raises ``ValueError`` on ``global_keyprefix`` (not supported)."""

    QoS = QoS

    #: How long a consumer waits (blocked on ``keys.BACKOFF_KEY``) after Redis refused a poll
    #: or a claim, before it tries again.
    backoff_s = 0.5

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("thinfleet's transport does not support global_keyprefix")
        #: names this consumer's in-flight lists (``keys.inflight_key``)
        self.consumer_id = uuid.uuid4().hex
        #: delivery tags ``_CLAIM`` has recorded; ``QoS.append`` writes nothing for them
        self.claimed: set[str] = set()
        #: in-flight lists this consumer has used (key -> queue), given back at close
        self._inflight: dict[str, str] = {}
        #: (in-flight list, queue) of the BLMOVE on the wire; None while backing off
        self._poll_target: tuple[str, str] | None = None
        self._backoff_until = 0.0
        #: queues consumed with ``no_ack`` (nothing acks them: claimed without a record)
        self._no_ack_queues: set[str] = set()

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else bool(args and args[0])
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _script(self, source: str, script_keys: list[str], args: list[Any]) -> Any:
        with self.conn_or_acquire() as client:
            return client.register_script(source)(keys=script_keys, args=args)

    def _back_off(self, stage: str, exc: Exception) -> None:
        if not is_transient(exc):
            raise exc
        self._backoff_until = monotonic() + self.backoff_s
        log.warning("consume_refused_backing_off", stage=stage, error=str(exc)[:300],
                    error_type=type(exc).__name__, backoff_s=self.backoff_s)

    def _brpop_start(self, timeout: Any = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        command: tuple[Any, ...]
        target: tuple[str, str] | None = None
        wait_s = self._backoff_until - monotonic()
        if wait_s <= 0:
            inflight = [keys.inflight_key(self.consumer_id, q) for q in queues]
            sources = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
            try:
                found = int(self._script(_PREPARE, [keys.INFLIGHT_REGISTRY, *inflight, *sources],
                                         [time(), len(inflight)]))
            except Exception as exc:  # noqa: BLE001 - _back_off re-raises non-transient ones
                self._back_off("prepare", exc)
                wait_s = self.backoff_s
            else:
                if 0 < found <= len(inflight):  # left in our own list: its claim was refused
                    key = inflight[found - 1]
                    target = (key, queues[found - 1])
                    command = ("BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)
                else:
                    source = sources[found - len(inflight) - 1] if found else sources[0]
                    queue = source.rsplit(self.sep, 1)[0]
                    target = (keys.inflight_key(self.consumer_id, queue), queue)
                    command = ("BLMOVE", source, target[0], "RIGHT", "LEFT", timeout or 0)
                self._inflight[target[0]] = target[1]
        if target is None:
            command = ("BRPOP", keys.BACKOFF_KEY, round(max(wait_s, 0.01), 3))
        self._poll_target = target
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        target, self._poll_target = self._poll_target, None
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BRPOP" if target is None else "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except kombu_redis.redis.ResponseError as exc:
                if "unknown command" in str(exc).lower():
                    raise RuntimeError("thinfleet's transport needs Redis >= 6.2 (BLMOVE): "
                                       f"{exc}") from exc
                self._back_off("move", exc)  # BLMOVE is refused over maxmemory
                raise kombu_redis.Empty() from exc
            if target is None or reply is None:
                raise kombu_redis.Empty()
            inflight, queue = target
            try:
                got = self.claim(inflight, queue, record=queue not in self._no_ack_queues)
            except Exception as exc:  # stays in our list; claimed at the next poll
                self._back_off("claim", exc)
                raise kombu_redis.Empty() from exc
            if got is None:  # a sweep took it back while this worker stalled
                raise kombu_redis.Empty()
            self._queue_cycle.rotate(queue)
            self.connection._deliver(decode_item(got[1], queue, got[0]), queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def claim(self, source: str, queue: str, record: bool = True) -> tuple[str, bytes] | None:
        """Run ``_CLAIM`` on list ``source`` (an in-flight list or a queue key): the rightmost
        item is recorded in ``unacked`` (when ``record``) and popped, atomically. Returns
        ``(delivery tag, item)``, or ``None`` when the list is empty. Raises redis-py's errors
        (the list is then unchanged)."""
        got = self._script(_CLAIM, [source, self.unacked_index_key, self.unacked_key],
                           [time(), uuid.uuid4().hex, queue, "1" if record else "0"])
        if not got:
            return None
        tag = bytes_to_str(got[0])
        if record:
            self.claimed.add(tag)
        return tag, got[1]

    def sweep_inflight(self, limit: int = 100) -> int:
        """Hand back the in-flight lists of consumers that have not polled for the visibility
        timeout (dead workers): their messages are recorded as due in ``unacked`` and the same
        restore sweep requeues them. Returns how many messages; never raises on Redis errors
        (the next sweep tries again)."""
        ceiling = time() - self.visibility_timeout
        moved = 0
        try:
            with self.conn_or_acquire() as client:
                stale = client.zrange(keys.INFLIGHT_REGISTRY, "-inf", ceiling, byscore=True,
                                      offset=0, num=limit)
            for member in stale:
                key = bytes_to_str(member)
                n = int(self._script(_ORPHAN, [key, self.unacked_index_key, self.unacked_key,
                                               keys.INFLIGHT_REGISTRY],
                                     [ceiling, uuid.uuid4().hex, keys.inflight_queue(key)]))
                if n > 0:
                    moved += n
                    log.warning("inflight_handed_back", inflight=key, messages=n)
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("inflight_sweep_failed", error=str(exc)[:300],
                        error_type=type(exc).__name__)
        return moved

    def close(self) -> None:
        self._closing = True
        if self._in_poll:
            with contextlib.suppress(kombu_redis.Empty):
                self._brpop_read()
        if self._inflight and not self.closed:
            pairs = [k for item in self._inflight.items() for k in item]
            try:
                moved = self._script(_GIVE_BACK, [keys.INFLIGHT_REGISTRY, *pairs], [])
            except Exception as exc:  # noqa: BLE001 - a sweep hands them back later
                log.warning("inflight_left_for_sweep", error=str(exc)[:300],
                            lists=list(self._inflight))
            else:
                if moved:
                    log.info("inflight_given_back", messages=moved)
            self._inflight.clear()
        super().close()

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._get_records = not no_ack
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._get_records = True

    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        for pri in self.priority_steps:
            got = self.claim(self._q_for_pri(queue, pri), queue,
                             record=getattr(self, "_get_records", True))
            if got:
                with self.conn_or_acquire() as client:
                    self._maybe_update_queues_expire(client, queue)
                return decode_item(got[1], queue, got[0])
        with self.conn_or_acquire() as client:
            self._maybe_update_queues_expire(client, queue)
        raise kombu_redis.Empty()

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        if isinstance(payload, str):  # an item that was not an envelope, recorded verbatim
            (pipe.lpush if leftmost else pipe.rpush)(routing_key, payload)
            return
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above (``broker_transport`` in Celery)."""

    Channel = Channel
