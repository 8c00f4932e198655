"""The worker's HTTP endpoint: Prometheus metrics plus the liveness and readiness probes.

One small WSGI server in the worker *parent* (children do not serve), on ``metrics_port``:

- ``GET /metrics``: every process's metrics summed (``prometheus_client`` multiprocess mode),
  plus queue gauges read from Redis at scrape time (``QueueCollector``);
- ``GET /readyz`` (readiness and startup probes, Docker ``HEALTHCHECK``): 200 once at least one
  child has mapped the model and warmed its prefix cache (``thinfleet_worker_ready`` summed over
  the children) *and* the parent is live; 503 before that, e.g. while the model downloads;
- ``GET /healthz`` (liveness probe): 200 while the Celery consumer's event loop runs, which it
  proves by sending a worker heartbeat every 2 s (Celery's ``heartbeat_sent`` signal), *and*
  makes progress: 503 when no heartbeat came for ``liveness_stale_s``, or when tickets wait in
  the queue and the parent received none for ``stall_s`` (a parent that beats but consumes
  nothing, seen after Redis refused writes): either way it is restarted.

The paths are constants here because the Helm chart, the Dockerfile and the tests name them.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from models import keys

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
PROBE_PATHS = (METRICS_PATH, LIVENESS_PATH, READINESS_PATH)

READY_METRIC = "thinfleet_worker_ready"


class Probes:
    """Liveness and readiness state of one worker parent.

    ``liveness_stale_s``: seconds without a heartbeat after which the parent counts as wedged
    (Celery sends one every 2 s). ``ready_children`` returns how many children are warm.
    """

    def __init__(self, liveness_stale_s: float, ready_children: Callable[[], float],
                 stall_s: float = float("inf"),
                 queue_depth: Callable[[], int | None] = lambda: None):
        self.liveness_stale_s = liveness_stale_s
        self.ready_children = ready_children
        self.stall_s = stall_s
        self.queue_depth = queue_depth
        self._last_beat = time.monotonic()  # boot counts as a beat: the startup probe gates it
        self._last_received = time.monotonic()

    def beat(self) -> None:
        """Record a heartbeat of the consumer loop (connected to Celery's ``heartbeat_sent``)."""
        self._last_beat = time.monotonic()

    def received(self) -> None:
        """Record that the parent took a ticket off the queue (Celery's ``task_received``)."""
        self._last_received = time.monotonic()

    def live(self) -> tuple[bool, str]:
        """(ok, reason): a heartbeat within ``liveness_stale_s``, and no stall: tickets waiting
        while none was received for ``stall_s`` (the queue depth is read only then; a Redis
        that cannot answer is not this worker's fault, and ``None`` skips the check)."""
        now = time.monotonic()
        age_s = now - self._last_beat
        if age_s > self.liveness_stale_s:
            return False, f"no worker heartbeat for {age_s:.0f} s"
        idle_s = now - self._last_received
        if idle_s > self.stall_s:
            waiting = self.queue_depth()
            if waiting:
                return False, (f"{waiting} tickets waiting but none received for "
                               f"{idle_s:.0f} s")
        return True, f"last heartbeat {age_s:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        """(ok, reason): live, and at least one child holds a warm model."""
        ok, reason = self.live()
        if not ok:
            return ok, reason
        children = self.ready_children()
        if children < 1:
            return False, "no child has loaded the model yet"
        return True, f"{children:.0f} children ready"


def ready_children(registry: CollectorRegistry) -> float:
    """Sum of ``thinfleet_worker_ready`` over the processes that ``registry`` collects."""
    return sum(sample.value for family in registry.collect() if family.name == READY_METRIC
               for sample in family.samples)


def queue_depth(client: redis.Redis, queue: str = keys.ROUTE_QUEUE) -> int | None:
    """``LLEN`` of the queue, or ``None`` when Redis does not answer."""
    try:
        return int(client.llen(queue))
    except (redis.RedisError, OSError):
        return None


def oldest_age_s(raw: bytes | None, now: datetime | None = None) -> float | None:
    """Age in seconds of one kombu message on the queue, from the ticket's ``enqueued_at``.

    ``raw`` is a list element as kombu's Redis transport stores it (JSON with a base64 body that
    holds Celery protocol 2's ``[args, kwargs, embed]``). None when it cannot be read.
    """
    if not raw:
        return None
    try:
        message = json.loads(raw)
        body = base64.b64decode(message["body"]) if message.get("properties", {}).get(
            "body_encoding") == "base64" else message["body"]
        args = json.loads(body)[0]
        enqueued = datetime.fromisoformat(args[0]["enqueued_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if enqueued.tzinfo is None:
        enqueued = enqueued.replace(tzinfo=UTC)
    return max(0.0, ((now or datetime.now(UTC)) - enqueued).total_seconds())


class QueueCollector(Collector):
    """Queue gauges read from Redis at scrape time (each worker host reports the same queue).

    - ``thinfleet_queue_depth``: tickets waiting (``LLEN`` of the Celery queue list);
    - ``thinfleet_queue_unacked``: tickets delivered to a worker and not yet acknowledged
      (kombu's ``unacked`` hash: prefetched or running, all queues of this Redis database),
      plus those in workers' in-flight lists (``keys.inflight_key``: handed out, not yet
      recorded; a dead worker's stays there until a sweep hands it back);
    - ``thinfleet_queue_oldest_age_seconds``: age of the oldest waiting ticket (0 when empty).

    A Redis error yields no samples rather than failing the whole scrape.
    """

    def __init__(self, client: redis.Redis, queue: str = keys.ROUTE_QUEUE):
        self.client, self.queue = client, queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(self.queue)
            pipe.hlen(keys.KOMBU_UNACKED)
            pipe.lindex(self.queue, -1)  # kombu LPUSHes, workers pop: the oldest is on the right
            pipe.zrange(keys.INFLIGHT_REGISTRY, 0, -1)
            depth, unacked, oldest, inflight = pipe.execute()
            if inflight:
                pipe = self.client.pipeline(transaction=False)
                for key in inflight:
                    pipe.llen(key)
                unacked += sum(pipe.execute())
        except (redis.RedisError, OSError):
            return
        labels = ["queue"]
        for name, doc, value in (
                ("thinfleet_queue_depth", "Tickets waiting in the Celery queue (LLEN).", depth),
                ("thinfleet_queue_unacked",
                 "Tickets delivered to workers and not yet acknowledged (kombu unacked hash "
                 "and workers' in-flight lists).",
                 unacked),
                ("thinfleet_queue_oldest_age_seconds",
                 "Age of the oldest waiting ticket, from its enqueued_at (0 when empty).",
                 oldest_age_s(oldest) or 0.0)):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self.queue], float(value))
            yield family


def make_app(registry: CollectorRegistry, probes: Probes) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: ``/metrics`` from ``registry``; ``/healthz`` and ``/readyz`` from ``probes``."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in (LIVENESS_PATH, READINESS_PATH):
            ok, reason = probes.live() if path == LIVENESS_PATH else probes.ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{'ok' if ok else 'unavailable'}: {reason}\n".encode()]
        return metrics_app(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve(port: int, app: Callable[..., Iterable[bytes]], addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``app`` on ``addr:port`` from a daemon thread; returns the server.

    Raises ``OSError`` when the port is taken.
    """
    server = make_server(addr, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="thinfleet-http", daemon=True).start()
    return server
