"""Every Redis key, queue, stream name and shared default, in one place.

Producers, workers, tests and dashboards import these names; none of them spells a key by hand.
All thinfleet keys start with ``thinfleet:`` so that an operator can find (and a test can clean)
them with one ``SCAN MATCH thinfleet:*``. Kombu's own keys (the queue list, ``unacked`` hash and
``_kombu.binding.*`` sets) are named by the queue name below.
"""

PREFIX = "thinfleet"

#: Celery queue (a Redis list of the same name under kombu's Redis transport).
ROUTE_QUEUE = "thinfleet.route"
#: Celery task name; the producer sends by name so it never imports worker code.
ROUTE_TASK = "thinfleet.route_ticket"

#: The keyword argument ``worker.transport`` puts on a message it could not decode (bad JSON,
#: not a kombu envelope): ``{"reason": str, "excerpt": str, "bytes": int}``. The routing task
#: dead-letters it as ``malformed``.
MALFORMED_KWARG = "thinfleet_malformed"

#: Kombu's hash of delivered-but-unacknowledged messages (prefetched or running tickets; with
#: ``acks_late`` that is every ticket a child holds). ``LLEN`` of the queue does not count them.
KOMBU_UNACKED = "unacked"

#: Redis stream of routed results (one entry per ticket and model sha256).
RESULTS_STREAM = f"{PREFIX}:results"
#: Redis stream of tickets that could not be routed, with the reason.
DEAD_LETTER_STREAM = f"{PREFIX}:dead-letter"
#: The field of a stream entry that holds the JSON document.
STREAM_FIELD = "json"

# ---- defaults shared by both sides (units in the names) -------------------------------------
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MAX_TICKET_BYTES = 8 * 1024
DEFAULT_DEDUPE_WINDOW_S = 24 * 3600
DEFAULT_RESULT_MARKER_TTL_S = 7 * 24 * 3600
DEFAULT_RESULTS_MAXLEN = 1_000_000
DEFAULT_DEAD_LETTER_MAXLEN = 100_000
#: A dead-letter entry keeps a ticket whole up to this many bytes of JSON (a valid ticket fits) ...
DEAD_LETTER_TICKET_BYTES = 16 * 1024
#: ... and a bounded excerpt of anything larger or stranger (characters of escaped JSON).
DEAD_LETTER_EXCERPT_CHARS = 2048


def dedupe_key(ticket_id: str) -> str:
    """Producer-side dedupe marker: ``SET NX EX`` holding the first task id for ``ticket_id``."""
    return f"{PREFIX}:dedupe:{ticket_id}"


def published_key(ticket_id: str, model_sha256: str) -> str:
    """Worker-side marker: a result for (ticket, model) is on the results stream (holds its id)."""
    return f"{PREFIX}:published:{model_sha256[:16]}:{ticket_id}"


def outcome_key(ticket_id: str) -> str:
    """Where a ticket ended last: ``"<stream> <entry id>"`` of its newest result or dead-letter
    entry (written with the entry, in one Lua script; expires with the result marker). Lets
    ``Producer.route`` answer a ticket routed before at once."""
    return f"{PREFIX}:outcome:{ticket_id}"


def attempts_key(task_id: str) -> str:
    """Attempt counter for one Celery task id; survives worker crashes and redelivery."""
    return f"{PREFIX}:attempts:{task_id}"


def backfill_checkpoint_key(source_digest: str) -> str:
    """Hash of ``{rows_submitted, ...}`` for one backfill source (file digest + column mapping)."""
    return f"{PREFIX}:backfill:{source_digest}"

# ---- the worker's atomic hand-over from the queue (worker.transport) --------------------------
#: Sorted set of in-flight lists: member ``inflight_key(consumer, queue)``, score the epoch
#: seconds its consumer last polled. A list whose consumer has not polled for the visibility
#: timeout belongs to a dead worker; any worker's sweep hands its message back.
INFLIGHT_REGISTRY = f"{PREFIX}:inflight"
#: Never written: a worker blocks on it (``BRPOP``) to wait out a refusal from Redis without
#: spinning its event loop.
BACKOFF_KEY = f"{PREFIX}:backoff"


def inflight_key(consumer: str, queue: str) -> str:
    """The list a consumer's ``BLMOVE`` moves one message into, atomically with the pop: it
    holds the message between Redis handing it out and the ``unacked`` record (at most one)."""
    return f"{INFLIGHT_REGISTRY}:{consumer}:{queue}"


def inflight_queue(key: str) -> str:
    """The queue of an ``inflight_key`` (consumer ids are hex, queue names may hold ``:``)."""
    return key.split(":", 3)[3]
