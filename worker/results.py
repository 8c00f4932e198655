"""Publishing to the results and dead-letter streams, and counting attempts.

Exactly-once, as far as Redis allows: a result is published at most once per
(ticket_id, model sha256). The marker key and the ``XADD`` run in one Lua script, so a ticket
that is redelivered after its result was published (the worker died before acking, or a
visibility timeout fired) finds the marker and publishes nothing. Consumers should still be
idempotent on ``ticket_id``: the marker expires (``result_marker_ttl_s``) and a new model sha256
routes the same ticket again by design.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from models import keys
from models.schemas import DeadLetterEntry, RoutedResult

# KEYS[1] marker, KEYS[2] stream, KEYS[3] outcome pointer; ARGV: json, maxlen, marker ttl (s),
# field name
_PUBLISH_ONCE = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', ARGV[4], ARGV[1])
redis.call('SET', KEYS[1], id, 'EX', ARGV[3])
redis.call('SET', KEYS[3], KEYS[2] .. ' ' .. id, 'EX', ARGV[3])
return {1, id}
"""

# KEYS[1] dead-letter stream, KEYS[2] outcome pointer (or ''); ARGV: json, maxlen, ttl, field
_DEAD_LETTER = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', ARGV[4], ARGV[1])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], KEYS[1] .. ' ' .. id, 'EX', ARGV[3]) end
return id
"""

ATTEMPTS_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Published:
    """``entry_id`` on the results stream; ``duplicate`` if an earlier attempt had published it."""

    entry_id: str
    duplicate: bool


class ResultPublisher:
    """Writes results and dead-letter entries; one per worker child, on its own connection pool."""

    def __init__(self, client: redis.Redis, results_maxlen: int = keys.DEFAULT_RESULTS_MAXLEN,
                 dead_letter_maxlen: int = keys.DEFAULT_DEAD_LETTER_MAXLEN,
                 marker_ttl_s: int = keys.DEFAULT_RESULT_MARKER_TTL_S):
        self.client = client
        self.results_maxlen = results_maxlen
        self.dead_letter_maxlen = dead_letter_maxlen
        self.marker_ttl_s = marker_ttl_s
        self._publish_once = client.register_script(_PUBLISH_ONCE)
        self._dead_letter = client.register_script(_DEAD_LETTER)

    def already_published(self, ticket_id: str, model_sha256: str) -> str | None:
        """The stream id of an earlier result for this (ticket, model), or ``None``."""
        value = self.client.get(keys.published_key(ticket_id, model_sha256))
        return value.decode() if isinstance(value, bytes) else value

    def publish_result(self, result: RoutedResult) -> Published:
        """XADD ``result`` (approximate MAXLEN) unless this (ticket, model) was published before."""
        created, entry_id = self._publish_once(
            keys=[keys.published_key(result.ticket_id, result.model.sha256), keys.RESULTS_STREAM,
                  keys.outcome_key(result.ticket_id)],
            args=[result.model_dump_json(), self.results_maxlen, self.marker_ttl_s,
                  keys.STREAM_FIELD])
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return Published(entry, duplicate=not created)

    def dead_letter(self, entry: DeadLetterEntry) -> str:
        """XADD ``entry`` to the dead-letter stream (and point the ticket's outcome key at it);
        returns its stream id. Raises redis-py's errors when Redis refuses."""
        outcome = keys.outcome_key(entry.ticket_id) if entry.ticket_id else ""
        entry_id = self._dead_letter(
            keys=[keys.DEAD_LETTER_STREAM, outcome],
            args=[entry.model_dump_json(), self.dead_letter_maxlen, self.marker_ttl_s,
                  keys.STREAM_FIELD])
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def count_attempt(self, task_id: str) -> int:
        """Increment and return the attempt number (1-based) of Celery task ``task_id``.

        Counted in Redis rather than by Celery because a ticket that kills its worker child is
        redelivered (``acks_late`` + ``reject_on_worker_lost``) with Celery's own retry count
        unchanged; only an external counter sees those attempts.
        """
        pipe = self.client.pipeline()
        pipe.incr(keys.attempts_key(task_id))
        pipe.expire(keys.attempts_key(task_id), ATTEMPTS_TTL_S)
        attempt, _ = pipe.execute()
        return int(attempt)

    def clear_attempts(self, task_id: str) -> None:
        """Forget the attempt counter once the ticket is settled (published or dead-lettered)."""
        self.client.delete(keys.attempts_key(task_id))
