"""The fleet end to end: producer -> redis-server -> Celery worker (real model from S3) -> streams.

These tests start real processes. The shared ``fleet`` worker consumes db 0; tests that need a
worker with other settings give it its own Redis database so the two never share a queue.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from models import RoutedResult, keys, load_taxonomy
from models.schemas import DeadLetterEntry
from producer import Producer, ProducerSettings
from producer.backfill import ColumnMap, backfill
from tests.conftest import worker_env
from tests.test_producer import CrashingProducer, write_csv
from thinfleet import devstack

pytestmark = pytest.mark.fleet


def entries_for(r: redis.Redis, stream: str, ticket_id: str) -> list[dict]:
    import json

    return [json.loads(fields[b"json"]) for _, fields in r.xrange(stream)
            if json.loads(fields[b"json"])["ticket_id"] == ticket_id]


def wait_settled(producer: Producer, ticket_ids: set[str], timeout_s: float = 90) -> dict:
    """Follow both streams until every id has a result or dead-letter entry."""
    found: dict[str, dict] = {}
    positions = {keys.RESULTS_STREAM: "0-0", keys.DEAD_LETTER_STREAM: "0-0"}
    deadline = time.monotonic() + timeout_s
    while set(found) < ticket_ids and time.monotonic() < deadline:
        for entry in producer.read(positions, block_ms=500):
            positions[entry.stream] = entry.entry_id
            if entry.document.get("ticket_id") in ticket_ids:
                found[entry.document["ticket_id"]] = {"stream": entry.stream, **entry.document}
    assert set(found) == ticket_ids, f"unsettled: {ticket_ids - set(found)}"
    return found


def send_raw(producer: Producer, payload: object, task_id: str | None = None) -> str:
    """Enqueue a task payload directly, bypassing the producer's validation and dedupe."""
    task_id = task_id or str(uuid.uuid4())
    producer.celery.send_task(keys.ROUTE_TASK, args=[payload], task_id=task_id,
                              queue=keys.ROUTE_QUEUE)
    return task_id


def test_route_end_to_end(fleet: devstack.WorkerProcess, producer: Producer,
                          model_sha: str) -> None:
    outcome = producer.route({"ticket_id": "e2e-1", "text": "I am still waiting on my card?",
                              "metadata": {"channel": "chat"}}, timeout_s=60)
    assert isinstance(outcome, RoutedResult)
    taxonomy = load_taxonomy("banking77")
    assert outcome.label in taxonomy.label_names
    assert outcome.route in {*taxonomy.routes.values(), taxonomy.fallback_route}
    assert 0 <= outcome.confidence <= 1
    assert outcome.model.sha256 == model_sha and outcome.attempt == 1
    assert outcome.timings.queue_wait_ms is not None and outcome.timings.total_ms > 0
    assert outcome.taxonomy == taxonomy.ref
    log = fleet.log_text()
    assert '"ticket_routed"' in log and '"ticket_id": "e2e-1"' in log


def test_redelivered_ticket_publishes_one_result(fleet: devstack.WorkerProcess,
                                                 producer: Producer, r: redis.Redis) -> None:
    payload = {"ticket_id": "redeliver-1", "text": "Why was I charged twice?"}
    send_raw(producer, payload)
    send_raw(producer, payload)  # what a redelivery after a lost ack looks like to the worker
    producer.route({"ticket_id": "sentinel-1", "text": "hello"}, timeout_s=60)  # FIFO barrier
    deadline = time.monotonic() + 30
    while r.llen(keys.ROUTE_QUEUE) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert len(entries_for(r, keys.RESULTS_STREAM, "redeliver-1")) == 1
    assert '"ticket_already_published"' in fleet.log_text()


def test_invalid_ticket_is_dead_lettered_without_retry(fleet: devstack.WorkerProcess,
                                                       producer: Producer) -> None:
    send_raw(producer, {"ticket_id": "bad-1", "text": "   "})
    send_raw(producer, {"ticket_id": "bad-2", "text": "x" * 9000})
    found = wait_settled(producer, {"bad-1", "bad-2"})
    for ticket_id, reason in (("bad-1", "empty"), ("bad-2", "8192-byte limit")):
        entry = DeadLetterEntry.model_validate(found[ticket_id])
        assert found[ticket_id]["stream"] == keys.DEAD_LETTER_STREAM
        assert reason in entry.reason and not entry.retryable and entry.attempts == 1
        assert entry.ticket is not None


def test_non_object_payload_is_dead_lettered(fleet: devstack.WorkerProcess,
                                             producer: Producer, r: redis.Redis) -> None:
    task_id = send_raw(producer, "just a string")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        import json

        docs = [json.loads(f[b"json"]) for _, f in r.xrange(keys.DEAD_LETTER_STREAM)]
        if any(d["task_id"] == task_id for d in docs):
            break
        time.sleep(0.2)
    [doc] = [d for d in docs if d["task_id"] == task_id]
    assert doc["ticket_id"] is None and "expected an object" in doc["reason"]


def test_backfill_resume_through_the_fleet(fleet: devstack.WorkerProcess, producer: Producer,
                                           r: redis.Redis, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "resume.csv", 12)
    columns = ColumnMap(ticket_id="id", id_prefix="resume-")
    with pytest.raises(KeyboardInterrupt):
        backfill(CrashingProducer(producer.settings, 7), path, columns, progress=False)
    report = backfill(producer, path, columns, progress=False)
    assert report.duplicates == 7 and report.submitted == 5
    ids = {f"resume-B{i}" for i in range(12)}
    found = wait_settled(producer, ids)
    assert all(doc["stream"] == keys.RESULTS_STREAM for doc in found.values())
    for ticket_id in ids:
        assert len(entries_for(r, keys.RESULTS_STREAM, ticket_id)) == 1


def test_metrics_endpoint_serves_routing_histograms(fleet: devstack.WorkerProcess,
                                                    producer: Producer, metrics_port: int) -> None:
    producer.route({"ticket_id": "metrics-1", "text": "How do I top up?"}, timeout_s=60)
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    text = body.decode()
    for name in ("thinfleet_routing_duration_seconds_count",
                 "thinfleet_token_generation_duration_seconds_count",
                 "thinfleet_queue_wait_seconds_count", "thinfleet_model_load_seconds_count",
                 "thinfleet_tickets_total", "thinfleet_worker_ready"):
        assert name in text, name
    # every failure kind exists before its first dead letter, so increase() sees the first one
    for failure in ("invalid_ticket", "malformed", "permanent", "transient", "exhausted"):
        assert f'thinfleet_dead_letters_total{{failure="{failure}"}}' in text, failure
    assert 'thinfleet_model_load_last_seconds{phase="load"}' in text


def test_probes_and_queue_gauges_on_the_worker_port(fleet: devstack.WorkerProcess,
                                                     producer: Producer, metrics_port: int) -> None:
    """What the Helm chart's probes and the dashboard read, from a real worker."""
    from worker import probes

    base = f"http://127.0.0.1:{metrics_port}"
    for path in (probes.LIVENESS_PATH, probes.READINESS_PATH):
        with urllib.request.urlopen(base + path, timeout=5) as response:
            assert response.status == 200, path
            assert response.read().startswith(b"ok"), path
    text = urllib.request.urlopen(base + probes.METRICS_PATH, timeout=5).read().decode()
    for name in ("thinfleet_queue_depth", "thinfleet_queue_unacked",
                 "thinfleet_queue_oldest_age_seconds"):
        assert f'{name}{{queue="{keys.ROUTE_QUEUE}"}}' in text, name


def test_worker_refuses_a_mismatched_model(redis_url: str, s3_endpoint: str, model_uri: str,
                                           tmp_path: Path) -> None:
    db = redis_url.rsplit("/", 1)[0] + "/2"
    client = redis.Redis.from_url(db)
    client.flushdb()
    Producer(ProducerSettings(redis_url=db)).submit({"ticket_id": "waits", "text": "hi"})
    env = worker_env(db, s3_endpoint, model_uri, "e" * 64, tmp_path / "cache")
    worker = devstack.start_worker(env, tmp_path / "w.log", hostname="refuse")
    assert worker.proc.wait(120) != 0
    assert "sha256" in worker.log_text() and "refused to start" in worker.log_text()
    assert client.llen(keys.ROUTE_QUEUE) == 1  # the ticket is still waiting, not consumed
    assert not list((tmp_path / "cache").glob("*.gguf"))


def test_worker_refuses_an_unreachable_redis(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{devstack.free_port()}/0"
    proc = subprocess.run([sys.executable, "-m", "thinfleet.cli", "worker"],
                          env={"THINFLEET_REDIS_URL": dead, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Redis is unreachable" in proc.stderr


def test_ticket_that_kills_its_worker_is_dead_lettered(redis_url: str, s3_endpoint: str,
                                                       model_uri: str, model_sha: str,
                                                       tmp_path: Path) -> None:
    db = redis_url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(db).flushdb()
    # A hard time limit below any routing time: every attempt's child is killed (SIGKILL).
    env = worker_env(db, s3_endpoint, model_uri, model_sha, tmp_path / "cache",
                     task_time_limit_s="0.05", task_soft_time_limit_s="0.04", max_attempts="2")
    worker = devstack.start_worker(env, tmp_path / "w.log", hostname="killer")
    try:
        worker.wait_ready(1, timeout_s=180)
        producer = Producer(ProducerSettings(redis_url=db))
        producer.submit({"ticket_id": "killer-1", "text": "My card got swallowed by the ATM"})
        found = wait_settled(producer, {"killer-1"}, timeout_s=120)
    finally:
        worker.stop()
    entry = found["killer-1"]
    assert entry["stream"] == keys.DEAD_LETTER_STREAM
    assert entry["retryable"] is True and entry["attempts"] >= 2


def test_worker_serves_a_manifest_from_s3_and_refuses_a_foreign_one(
        redis_url: str, s3_endpoint: str, model_file: Path, tmp_path: Path) -> None:
    from tests.test_manifest import make_model_dir
    from worker.acquire import sha256_file

    db = redis_url.rsplit("/", 1)[0] + "/4"
    redis.Redis.from_url(db).flushdb()
    manifest = make_model_dir(tmp_path, model_file)  # banking77 head, always label #1
    uri = devstack.upload_model_dir(s3_endpoint, manifest, "models", "routers/synthetic")
    env = worker_env(db, s3_endpoint, "", "0" * 64, tmp_path / "cache",
                     model_manifest=uri, manifest_sha256=sha256_file(manifest))
    worker = devstack.start_worker(env, tmp_path / "w.log", hostname="manifest")
    try:
        worker.wait_ready(1, timeout_s=180)
        producer = Producer(ProducerSettings(redis_url=db))
        outcome = producer.route({"ticket_id": "m-1", "text": "Where is my card?"}, timeout_s=60)
    finally:
        worker.stop()
    assert isinstance(outcome, RoutedResult)
    assert outcome.model.name == "synthetic-head"
    assert outcome.model.sha256 == sha256_file(manifest)
    assert outcome.label == load_taxonomy("banking77").label_names[1]

    foreign = worker_env(db, s3_endpoint, "", "0" * 64, tmp_path / "cache2",
                         model_manifest=uri, taxonomy="ecommerce")
    refused = devstack.start_worker(foreign, tmp_path / "w2.log", hostname="foreign")
    assert refused.proc.wait(120) != 0
    assert "trained for taxonomy banking77" in refused.log_text()


def test_loading_the_model_starts_no_thread(model_file: Path) -> None:
    """``preload_model`` loads the model in the worker parent, before Celery forks: that load,
    llama.cpp's weight repacking included, must start no thread (an OpenMP team in the parent
    would not survive the fork)."""
    code = ("import sys; from pathlib import Path\n"
            "def threads(): return next(int(line.split()[1]) for line in open('/proc/self/status')"
            " if line.startswith('Threads:'))\n"
            "from worker.llama import load_model\n"
            "before = threads(); load_model(Path(sys.argv[1]), repack=True)\n"
            "print(before, threads())")
    done = subprocess.run([sys.executable, "-c", code, str(model_file)], capture_output=True,
                          text=True, timeout=120, check=True)
    before, after = done.stdout.split()
    assert after == before


def test_a_model_preloaded_before_the_fork_serves_every_child(
        redis_url: str, s3_endpoint: str, model_uri: str, model_sha: str, tmp_path: Path) -> None:
    """``preload_model``: the parent loads the model (repacked weights included), two forked
    children route with it and route every ticket to a valid label."""
    db = redis_url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(db).flushdb()
    env = worker_env(db, s3_endpoint, model_uri, model_sha, tmp_path / "cache",
                     preload_model="true")
    worker = devstack.start_worker(env, tmp_path / "w.log", concurrency=2, hostname="preload")
    try:
        worker.wait_ready(2, timeout_s=180)
        producer = Producer(ProducerSettings(redis_url=db))
        tickets = {f"pre-{i}": text for i, text in enumerate(
            ["Where is my card?", "I was charged twice", "How do I top up?", "My PIN is blocked"])}
        results = [producer.route({"ticket_id": tid, "text": text}, timeout_s=60)
                   for tid, text in tickets.items()]
    finally:
        worker.stop()
    assert "model_preloaded" in worker.log_text()
    labels = set(load_taxonomy("banking77").label_names)
    assert all(isinstance(r, RoutedResult) and r.label in labels for r in results)
