"""Issue 11: "nothing lost, nothing twice" under real faults, one test per hole.

Pure decisions (the exception tree, bounded dead-letter excerpts, envelope checks, settings)
are tested directly; the rest with real processes: a redis-server per test where the test
breaks Redis, real Celery workers with the real model from the S3 endpoint.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from models import keys
from models.errors import (
    AttemptsExhausted,
    Failure,
    InferenceError,
    MalformedMessage,
    TicketRejected,
    TransientError,
    failure_of,
)
from models.schemas import DeadLetterEntry, bounded_ticket
from producer import Producer, ProducerSettings
from tests.conftest import worker_env
from thinfleet import devstack

# ---- pure logic ---------------------------------------------------------------------------


@pytest.mark.parametrize("exc,failure", [
    (TicketRejected("empty"), Failure.INVALID_TICKET),
    (MalformedMessage("no args"), Failure.MALFORMED),
    (AttemptsExhausted("3"), Failure.EXHAUSTED),
    (TransientError("blip"), Failure.TRANSIENT),
    (InferenceError("no KV slot"), Failure.TRANSIENT),
    (redis.ConnectionError("gone"), Failure.TRANSIENT),
    (redis.exceptions.OutOfMemoryError("maxmemory"), Failure.TRANSIENT),
    (redis.exceptions.ReadOnlyError("replica"), Failure.TRANSIENT),
    (OperationalError("broker"), Failure.TRANSIENT),
    (SoftTimeLimitExceeded(), Failure.TRANSIENT),
    (TypeError("a bug"), Failure.PERMANENT),
    (KeyError("a bug"), Failure.PERMANENT),
    (redis.ResponseError("WRONGTYPE"), Failure.PERMANENT),
])
def test_the_tree_decides_retry_or_dead_letter(exc: BaseException, failure: Failure) -> None:
    assert failure_of(exc) is failure
    assert failure.retryable is (failure in (Failure.TRANSIENT, Failure.EXHAUSTED))


def test_dead_letter_keeps_a_bounded_excerpt_that_always_serialises() -> None:
    small = {"ticket_id": "a", "text": "hi"}
    assert bounded_ticket(small) == (small, len(json.dumps(small)), False)
    huge = {"ticket_id": "a", "text": "x" * (1 << 20)}
    kept, size, truncated = bounded_ticket(huge)
    assert isinstance(kept, str) and len(kept) == keys.DEAD_LETTER_EXCERPT_CHARS and truncated
    assert size is not None and size > 1 << 20
    lone = {"ticket_id": "a\ud800", "text": "b\udfff"}
    kept, _, _ = bounded_ticket(lone)
    assert isinstance(kept, str) and "\\ud800" in kept
    entry = DeadLetterEntry(ticket_id=None, task_id=None, reason="r", error_type="E",
                            retryable=False, attempts=1, ticket=kept, worker="w")
    entry.model_dump_json()  # would raise PydanticSerializationError with the raw surrogate
    assert bounded_ticket(b"\xff\xfe{")[0] == "\\xff\\xfe{"


def test_transport_turns_anything_but_an_envelope_into_a_malformed_task() -> None:
    from worker.transport import decode_item, envelope_problem

    for item in (b"not json", b'"a string"', b"[1, 2]", b'{"body": "x"}',
                 json.dumps({"body": "!!", "headers": {"task": "t", "id": "i"},
                             "properties": {"body_encoding": "base64"}}).encode()):
        envelope = decode_item(item, keys.ROUTE_QUEUE)
        assert envelope_problem(envelope) is None
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert args == [] and kwargs[keys.MALFORMED_KWARG]["bytes"] == len(item)
        assert envelope["headers"]["task"] == keys.ROUTE_TASK


def test_visibility_timeout_must_cover_a_held_ticket() -> None:
    from worker.settings import WorkerSettings

    assert WorkerSettings().visibility_timeout_s == 300
    with pytest.raises(ValueError, match="must exceed"):
        WorkerSettings(visibility_timeout_s=100, task_time_limit_s=60, retry_backoff_max_s=60)


def test_the_worker_needs_a_celery_that_knows_acks_on_timeout() -> None:
    from celery.app.defaults import DEFAULTS

    from worker.app import REQUIRED_CELERY_SETTINGS, app

    assert all(name in DEFAULTS for name in REQUIRED_CELERY_SETTINGS)
    assert app.conf.task_acks_on_timeout is False
    assert app.conf.broker_transport == "worker.transport:Transport"


# ---- real processes -----------------------------------------------------------------------

FAST = {"visibility_timeout_s": "20", "task_time_limit_s": "5", "task_soft_time_limit_s": "4",
        "retry_backoff_max_s": "4", "max_attempts": "3"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("delivery-cache")


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own, which the test may break."""
    with devstack.redis_server(tmp_path / "redis") as url:
        yield url


def start(url: str, s3_endpoint: str, model_uri: str, model_sha: str, cache: Path, log: Path,
          hostname: str, concurrency: int = 1, **extra: str) -> devstack.WorkerProcess:
    env = worker_env(url, s3_endpoint, model_uri, model_sha, cache, **{**FAST, **extra})
    worker = devstack.start_worker(env, log, concurrency=concurrency, hostname=hostname)
    worker.wait_ready(concurrency, timeout_s=180)
    return worker


def settled(client: redis.Redis) -> tuple[list[str], list[dict]]:
    """Ticket ids on the results stream (with repeats), and the dead-letter documents."""
    results = [json.loads(f[b"json"])["ticket_id"] for _, f in client.xrange(keys.RESULTS_STREAM)]
    dead = [json.loads(f[b"json"]) for _, f in client.xrange(keys.DEAD_LETTER_STREAM)]
    return results, dead


def wait_for(client: redis.Redis, ids: set[str], timeout_s: float) -> tuple[list[str], list[dict]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        results, dead = settled(client)
        if ids <= set(results) | {d["ticket_id"] for d in dead}:
            return results, dead
        time.sleep(0.5)
    return settled(client)


def submit_burst(url: str, prefix: str, n: int) -> set[str]:
    producer = Producer(ProducerSettings(redis_url=url))
    ids = {f"{prefix}-{i}" for i in range(n)}
    for ticket_id in sorted(ids):
        producer.submit({"ticket_id": ticket_id, "text": f"My card {ticket_id} has not arrived"})
    return ids


@pytest.mark.fleet
def test_poison_messages_are_dead_lettered_and_the_worker_goes_on(
        fleet: devstack.WorkerProcess, producer: Producer, r: redis.Redis) -> None:
    """Holes 8 and 10: bytes that are not a task, wrong arguments, lone surrogates, 1 MiB."""
    send = producer.celery.send_task
    r.lpush(keys.ROUTE_QUEUE, b"\xffnot json at all")
    r.lpush(keys.ROUTE_QUEUE, b'{"hello": "world"}')
    ids = {"no-args": send(keys.ROUTE_TASK, args=[], queue=keys.ROUTE_QUEUE).id,
           "two-args": send(keys.ROUTE_TASK, args=[{"ticket_id": "x", "text": "a"}, 2],
                            queue=keys.ROUTE_QUEUE).id,
           "kwarg": send(keys.ROUTE_TASK, args=[{"ticket_id": "x", "text": "a"}],
                         kwargs={"priority": "high"}, queue=keys.ROUTE_QUEUE).id,
           "surrogate": send(keys.ROUTE_TASK, args=[{"ticket_id": "s\ud800", "text": "a\udfff"}],
                             queue=keys.ROUTE_QUEUE).id,
           "huge": send(keys.ROUTE_TASK, args=[{"ticket_id": "huge-1", "text": "x" * (1 << 20)}],
                        queue=keys.ROUTE_QUEUE).id}
    after = producer.route({"ticket_id": "after-poison", "text": "Where is my card?"},
                           timeout_s=60)
    assert after.ticket_id == "after-poison" and fleet.proc.poll() is None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, dead = settled(r)
        by_task = {d["task_id"]: d for d in dead}
        if set(ids.values()) <= set(by_task) and sum(d["failure"] == "malformed" for d in dead) >= 5:
            break
        time.sleep(0.3)
    for name in ("no-args", "two-args", "kwarg"):
        assert by_task[ids[name]]["failure"] == "malformed", name
        assert not by_task[ids[name]]["retryable"]
    assert by_task[ids["surrogate"]]["failure"] == "invalid_ticket"
    assert "\\ud800" in by_task[ids["surrogate"]]["ticket"]
    huge = by_task[ids["huge"]]
    assert huge["ticket_truncated"] and huge["ticket_bytes"] > 1 << 20
    assert len(huge["ticket"]) <= keys.DEAD_LETTER_EXCERPT_CHARS
    raw = [d for d in dead if d["failure"] == "malformed" and d["task_id"] not in ids.values()]
    assert {d["ticket"] for d in raw} >= {"\\xffnot json at all", '{"hello": "world"}'}
    assert all(d["worker"].startswith("fleet1@") for d in dead)  # the Celery node, not the host


@pytest.mark.fleet
def test_redis_refusing_writes_mid_burst_loses_nothing(
        own_redis: str, s3_endpoint: str, model_uri: str, model_sha: str, cache_dir: Path,
        tmp_path: Path) -> None:
    """Holes 1, 7 and 11: Redis at maxmemory (noeviction) refuses the attempt count, the
    result, the retry and the dead-letter entry; once it recovers every ticket is routed."""
    client = redis.Redis.from_url(own_redis)
    worker = start(own_redis, s3_endpoint, model_uri, model_sha, cache_dir, tmp_path / "w.log",
                   "oom")
    try:
        ids = submit_burst(own_redis, "oom", 24)
        while len(settled(client)[0]) < 3:
            time.sleep(0.05)
        client.config_set("maxmemory", 1)
        time.sleep(8)
        client.config_set("maxmemory", 0)
        results, dead = wait_for(client, ids, timeout_s=90)
        assert worker.proc.poll() is None, worker.log_text()[-3000:]
    finally:
        worker.stop()
    assert sorted(results) == sorted(ids), f"lost: {ids - set(results)}"
    assert dead == []


@pytest.mark.fleet
def test_whole_worker_killed_mid_burst_is_recovered_within_the_visibility_timeout(
        own_redis: str, s3_endpoint: str, model_uri: str, model_sha: str, cache_dir: Path,
        tmp_path: Path) -> None:
    """Holes 6 and 9: kill -9 the parent and its children; a new worker routes every ticket
    within visibility_timeout_s (20 s here) plus its boot, and none twice."""
    client = redis.Redis.from_url(own_redis)
    first = start(own_redis, s3_endpoint, model_uri, model_sha, cache_dir, tmp_path / "a.log",
                  "doomed", concurrency=2)
    ids = submit_burst(own_redis, "kill", 30)
    while len(settled(client)[0]) < 4:
        time.sleep(0.05)
    for pid in [*first.child_pids(), first.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(10)
    killed_at = time.monotonic()
    assert client.hlen(keys.KOMBU_UNACKED) >= 1  # held by the dead worker
    second = start(own_redis, s3_endpoint, model_uri, model_sha, cache_dir, tmp_path / "b.log",
                   "rescuer")
    try:
        results, dead = wait_for(client, ids, timeout_s=120)
        recovered_s = time.monotonic() - killed_at
    finally:
        second.stop()
    assert sorted(results) == sorted(ids), f"lost: {ids - set(results)}"
    assert dead == [] and recovered_s < 20 + 60


@pytest.mark.fleet
def test_worker_that_loses_redis_for_good_exits_non_zero(
        s3_endpoint: str, model_uri: str, model_sha: str, cache_dir: Path,
        tmp_path: Path) -> None:
    """Hole 11: a fatal exit must be non-zero, or an on-failure supervisor won't restart it."""
    with devstack.redis_server(tmp_path / "redis") as url:
        worker = start(url, s3_endpoint, model_uri, model_sha, cache_dir, tmp_path / "w.log",
                       "orphan", broker_connection_max_retries="1")
    try:
        code = worker.proc.wait(120)
    finally:
        worker.stop()
    assert code != 0, worker.log_text()[-2000:]


def test_transport_survives_redis_refusing_the_ack_and_the_requeue(own_redis: str) -> None:
    """Over maxmemory Redis refuses even an ack's ZREM/HDEL (a MULTI): the stock transport
    raised out of the consumer and the worker died. Ours finishes it at the next sweep."""
    from kombu import Connection, Queue

    client = redis.Redis.from_url(own_redis)
    with Connection(own_redis, transport="worker.transport:Transport") as conn:
        queue = Queue("t.q", routing_key="t.q")
        with conn.Producer() as producer:
            for i in range(2):
                producer.publish({"n": i}, routing_key="t.q", declare=[queue])
        channel = conn.default_channel
        acked, requeued = (channel.basic_get("t.q") for _ in range(2))
        assert client.hlen(keys.KOMBU_UNACKED) == 2
        client.config_set("maxmemory", 1)
        try:
            acked.ack()  # must not raise
            requeued.reject(requeue=True)
            channel.qos.flush_pending()
            assert client.hlen(keys.KOMBU_UNACKED) == 2  # nothing could change yet
        finally:
            client.config_set("maxmemory", 0)
        channel.qos.flush_pending()
        assert client.hlen(keys.KOMBU_UNACKED) == 1  # the ack is done; the requeue waits
        # for the visibility timeout (kept in unacked, recorded), never lost
        assert client.hexists(keys.KOMBU_UNACKED, requeued.delivery_tag)


_CONSUMER = """
import sys
from kombu import Connection, Queue
with Connection(sys.argv[1], transport=sys.argv[2]) as conn:
    def got(body, message):
        print("got", body[0][0], flush=True)
        message.ack()
    with conn.Consumer(Queue("t.q", routing_key="t.q"), callbacks=[got]):
        print("ready", flush=True)
        while True:
            try:
                conn.drain_events(timeout=30)
            except TimeoutError:
                pass
"""


def _consumer(url: str, transport: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _CONSUMER, url, transport],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # blocked in its pop
    return proc


def _publish(url: str, n: int) -> None:
    """One Celery protocol 2 message with argument ``n`` (the transport accepts no other)."""
    from kombu import Connection, Queue

    with Connection(url) as conn, conn.Producer() as producer:
        producer.publish([[n], {}, {}], routing_key="t.q", headers={"task": "t", "id": str(n)},
                         declare=[Queue("t.q", routing_key="t.q")])


@pytest.mark.parametrize("transport", ["redis", "worker.transport:Transport"])
def test_a_consumer_frozen_in_its_pop_and_killed_loses_nothing(own_redis: str,
                                                               transport: str) -> None:
    """Redis hands a message to a consumer blocked in its pop; the consumer, frozen (a starved
    CPU, SIGSTOP) before it reads the reply, is killed. kombu's BRPOP has removed the message
    and nothing records it: the stock transport loses it (the first case pins that down). Ours
    moved it into the consumer's in-flight list, and a sweep after the visibility timeout
    requeues it for a live consumer, which gets it once."""
    client = redis.Redis.from_url(own_redis)
    frozen = _consumer(own_redis, transport)
    os.kill(frozen.pid, signal.SIGSTOP)
    _publish(own_redis, 1)
    deadline = time.monotonic() + 5
    while client.llen("t.q") and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(frozen.pid, signal.SIGKILL)
    frozen.wait(10)
    assert client.llen("t.q") == 0 and client.hlen(keys.KOMBU_UNACKED) == 0  # handed out
    held = [k for k in client.scan_iter(f"{keys.INFLIGHT_REGISTRY}:*") if client.llen(k)]
    if transport == "redis":
        assert held == []  # the stock transport: gone for good
        return
    assert len(held) == 1 and keys.inflight_queue(held[0].decode()) == "t.q"

    from kombu import Connection
    options = {"visibility_timeout": 1}
    with Connection(own_redis, transport=transport, transport_options=options) as conn:
        channel = conn.default_channel
        channel.qos.restore_visible(num=10, interval=1)
        assert client.llen("t.q") == 0  # its consumer polled less than 1 s ago
        time.sleep(1.2)
        channel.qos.restore_visible(num=10, interval=1)
    assert client.llen("t.q") == 1 and client.zcard(keys.INFLIGHT_REGISTRY) == 0
    rescuer = _consumer(own_redis, transport)
    try:
        assert rescuer.stdout is not None and rescuer.stdout.readline().split() == ["got", "1"]
    finally:
        rescuer.kill()
        rescuer.wait(10)
    assert client.llen("t.q") == 0 and client.hlen(keys.KOMBU_UNACKED) == 0


def test_the_hand_over_records_and_restores_what_is_not_an_envelope(own_redis: str) -> None:
    """An item that is not a kombu envelope is recorded with the pop under the tag its
    malformed task carries, and a requeue puts the same bytes back; a closing channel gives
    back what is left in its in-flight list."""
    from kombu import Connection

    from worker.transport import envelope_problem

    client = redis.Redis.from_url(own_redis)
    client.lpush("t.q", b"not json {")
    with Connection(own_redis, transport="worker.transport:Transport") as conn:
        channel = conn.default_channel
        message = channel.basic_get("t.q")
        assert envelope_problem(message._raw) is None  # the task that dead-letters it
        assert client.hkeys(keys.KOMBU_UNACKED) == [message.delivery_tag.encode()]
        message.reject(requeue=True)
        assert client.lrange("t.q", 0, -1) == [b"not json {"] and not client.hlen("unacked")
        assert channel.basic_get("t.q", no_ack=True) is not None
        assert client.hlen(keys.KOMBU_UNACKED) == 0  # nothing acks it: nothing recorded

        leftover = keys.inflight_key(channel.consumer_id, "t.q")
        client.lpush(leftover, b"left in flight")
        channel._inflight[leftover] = "t.q"
    assert client.lrange("t.q", 0, -1) == [b"left in flight"] and not client.exists(leftover)


def test_a_claim_refused_at_maxmemory_waits_in_redis_and_backs_off(own_redis: str) -> None:
    """Redis hands a message over, then refuses the claim's record (maxmemory, noeviction):
    the message stays in the consumer's in-flight list, the consumer waits ``backoff_s``
    between tries instead of spinning, and delivers it once Redis accepts writes again."""
    client = redis.Redis.from_url(own_redis)
    consumer = _consumer(own_redis, "worker.transport:Transport")
    try:
        os.kill(consumer.pid, signal.SIGSTOP)
        _publish(own_redis, 7)
        while client.llen("t.q"):
            time.sleep(0.02)
        client.config_set("maxmemory", 1)
        client.config_resetstat()
        os.kill(consumer.pid, signal.SIGCONT)
        time.sleep(2)
        held = [k for k in client.scan_iter(f"{keys.INFLIGHT_REGISTRY}:*") if client.llen(k)]
        calls = {name: stats["calls"] for name, stats in client.info("commandstats").items()}
        client.config_set("maxmemory", 0)
        assert len(held) == 1 and client.hlen(keys.KOMBU_UNACKED) == 0
        assert calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0) <= 10  # ~2 s / 0.5 s
        assert consumer.stdout is not None
        lines: list[str] = []
        while len(lines) < 20 and not (lines and lines[-1].startswith("got")):
            lines.append(consumer.stdout.readline())  # structlog's warnings, then the message
        assert lines[-1].split() == ["got", "7"]
        assert sum("consume_refused_backing_off" in line for line in lines) <= 6
    finally:
        consumer.kill()
        consumer.wait(10)
