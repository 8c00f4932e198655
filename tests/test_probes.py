"""The worker's probe logic and queue gauges (pure logic, plus a real kombu message on Redis).

The probes on a running worker are checked in ``test_fleet``."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import redis
from prometheus_client import CollectorRegistry, generate_latest

from models import keys
from producer import Producer
from tests.test_producer import producer, r  # noqa: F401  (fixtures: a database no worker reads)
from thinfleet import devstack
from worker import probes


def call(app, path: str) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list) -> None:  # type: ignore[type-arg]
        seen["status"] = status

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": "",
                         "wsgi.input": io.BytesIO()}, start_response))
    return seen["status"], body


def test_readiness_waits_for_a_warm_child_and_liveness_for_heartbeats() -> None:
    children = {"n": 0.0}
    state = probes.Probes(liveness_stale_s=60, ready_children=lambda: children["n"])
    app = probes.make_app(CollectorRegistry(), state)
    assert call(app, probes.LIVENESS_PATH)[0].startswith("200")
    status, body = call(app, probes.READINESS_PATH)
    assert status.startswith("503") and b"no child" in body
    children["n"] = 2
    assert call(app, probes.READINESS_PATH)[0].startswith("200")
    state._last_beat -= 120  # two minutes without a heartbeat: wedged
    assert call(app, probes.LIVENESS_PATH)[0].startswith("503")
    assert call(app, probes.READINESS_PATH)[0].startswith("503")
    state.beat()
    assert call(app, probes.LIVENESS_PATH)[0].startswith("200")


def test_liveness_fails_when_tickets_wait_and_the_parent_takes_none() -> None:
    """Issue 11, hole 11: a parent that still beats but consumes nothing must be restarted."""
    depth = {"n": 0}
    state = probes.Probes(liveness_stale_s=60, ready_children=lambda: 1.0, stall_s=120,
                          queue_depth=lambda: depth["n"])
    app = probes.make_app(CollectorRegistry(), state)
    state._last_received -= 300  # idle for 5 minutes with an empty queue: fine
    assert call(app, probes.LIVENESS_PATH)[0].startswith("200")
    depth["n"] = 7  # tickets wait, none taken: stalled
    status, body = call(app, probes.LIVENESS_PATH)
    assert status.startswith("503") and b"7 tickets waiting" in body
    state.received()
    assert call(app, probes.LIVENESS_PATH)[0].startswith("200")
    state._last_received -= 300
    depth["n"] = None  # type: ignore[assignment]  # Redis did not answer: not this worker's fault
    assert call(app, probes.LIVENESS_PATH)[0].startswith("200")


def test_the_probe_server_binds_the_configured_address() -> None:
    from worker.settings import WorkerSettings

    assert WorkerSettings().metrics_host == "0.0.0.0"  # Kubernetes probes the pod IP
    port = devstack.free_port()
    server = probes.serve(port, probes.make_app(CollectorRegistry(), probes.Probes(
        60, lambda: 1.0)), "127.0.0.1")
    try:
        assert server.server_address == ("127.0.0.1", port)
    finally:
        server.shutdown()


def test_queue_gauges_read_a_real_celery_message(producer: Producer,  # noqa: F811
                                                 r: redis.Redis) -> None:  # noqa: F811
    before = datetime.now(UTC)
    producer.submit({"ticket_id": "old-1", "text": "card?"})
    producer.submit({"ticket_id": "new-1", "text": "top up?"})
    r.hset(keys.KOMBU_UNACKED, "tag-1", "{}")
    handed_out = keys.inflight_key("c0ffee", keys.ROUTE_QUEUE)  # a dead worker's, say
    r.lpush(handed_out, "{}")
    r.zadd(keys.INFLIGHT_REGISTRY, {handed_out: 0})
    registry = CollectorRegistry()
    registry.register(probes.QueueCollector(r))
    text = generate_latest(registry).decode()
    assert f'thinfleet_queue_depth{{queue="{keys.ROUTE_QUEUE}"}} 2.0' in text
    assert f'thinfleet_queue_unacked{{queue="{keys.ROUTE_QUEUE}"}} 2.0' in text
    assert "thinfleet_queue_oldest_age_seconds{" in text
    # The oldest ticket is the list's right end; its age comes from the producer's enqueued_at.
    age_s = probes.oldest_age_s(r.lindex(keys.ROUTE_QUEUE, -1),
                                now=before + timedelta(seconds=30))
    assert age_s is not None and 29 <= age_s <= 30
    assert probes.oldest_age_s(b"not a kombu message") is None


def test_queue_gauges_vanish_rather_than_fail_when_redis_is_down() -> None:
    registry = CollectorRegistry()
    registry.register(probes.QueueCollector(redis.Redis(port=1, socket_connect_timeout=0.2)))
    assert b"thinfleet_queue_depth" not in generate_latest(registry)


def test_probe_command_fails_clearly_when_no_worker_answers() -> None:
    """The Docker HEALTHCHECK (`thinfleet probe ready`) exits 1 with the URL it tried."""
    import os
    import subprocess
    import sys

    from thinfleet import devstack

    port = devstack.free_port()  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "thinfleet.cli", "probe", "ready"],
                          env={**os.environ, "THINFLEET_METRICS_PORT": str(port)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"127.0.0.1:{port}{probes.READINESS_PATH}" in done.stderr
