"""Producer library and backfill against a real redis-server (no worker consuming)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from models import keys
from models.errors import TicketRejected, TransientError
from producer import Producer, ProducerSettings
from producer.backfill import ColumnMap, backfill
from thinfleet import devstack


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    """A clean Redis database that no worker consumes (the fleet tests' worker uses db 0), so
    what these tests enqueue stays in the queue for them to inspect."""
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/5")
    client.flushdb()
    return client


@pytest.fixture()
def producer(r: redis.Redis) -> Producer:
    kwargs = r.connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"
    return Producer(ProducerSettings(redis_url=url, dedupe_window_s=600))


def queued_payloads(r: redis.Redis) -> list[dict]:
    messages = [json.loads(m) for m in r.lrange(keys.ROUTE_QUEUE, 0, -1)]
    return [json.loads(__import__("base64").b64decode(m["body"]))[0][0] for m in messages]


def test_submit_enqueues_a_json_task(producer: Producer, r: redis.Redis) -> None:
    receipt = producer.submit({"ticket_id": "T-1", "text": "My card has not arrived"})
    assert not receipt.duplicate and receipt.task_id
    [payload] = queued_payloads(r)
    assert payload["ticket_id"] == "T-1" and payload["enqueued_at"]


def test_same_ticket_id_is_enqueued_once_per_window(producer: Producer, r: redis.Redis) -> None:
    first = producer.submit({"ticket_id": "T-2", "text": "hello"})
    again = producer.submit({"ticket_id": "T-2", "text": "hello again"})
    assert again.duplicate and again.task_id == first.task_id
    assert r.llen(keys.ROUTE_QUEUE) == 1
    assert 0 < r.ttl(keys.dedupe_key("T-2")) <= 600


@pytest.mark.parametrize("ticket,message", [
    ({"ticket_id": "T", "text": "x" * 9000}, "over the 8192-byte limit"),
    ({"ticket_id": "T", "text": "  "}, "empty"),
    ({"text": "no id"}, "ticket_id"),
])
def test_bad_tickets_are_rejected_and_nothing_is_enqueued(
        producer: Producer, r: redis.Redis, ticket: dict, message: str) -> None:
    with pytest.raises(TicketRejected, match=message):
        producer.submit(ticket)
    assert r.llen(keys.ROUTE_QUEUE) == 0
    assert not list(r.scan_iter(keys.dedupe_key("*")))


def test_unreachable_redis_is_a_transient_error() -> None:
    dead = f"redis://127.0.0.1:{devstack.free_port()}/0"
    producer = Producer(ProducerSettings(redis_url=dead, redis_timeout_s=0.5))
    with pytest.raises(TransientError, match="cannot reach Redis"):
        producer.submit({"ticket_id": "T", "text": "hi"})


def test_backpressure_waits_while_the_queue_is_deep(producer: Producer) -> None:
    for i in range(3):
        producer.submit({"ticket_id": f"deep-{i}", "text": "hi"})
    assert producer.wait_for_queue_below(3, timeout_s=1) == pytest.approx(0, abs=0.5)
    with pytest.raises(TransientError, match="stayed above 1"):
        producer.wait_for_queue_below(1, timeout_s=0.3)


def write_csv(path: Path, rows: int, bad_rows: tuple[int, ...] = ()) -> Path:
    lines = ["id,text,category"]
    for i in range(rows):
        text = "" if i in bad_rows else f"ticket number {i} about my card"
        lines.append(f"B{i},{text},card_arrival")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_backfill_reports_bad_rows_and_carries_metadata(
        producer: Producer, r: redis.Redis, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", 6, bad_rows=(2,))
    report = backfill(producer, path, ColumnMap(ticket_id="id", metadata=("category",)),
                      progress=False)
    assert report.submitted == 5 and [row for row, _ in report.rejected] == [4]
    payloads = queued_payloads(r)
    assert payloads[0]["metadata"] == {"category": "card_arrival"}


class CrashingProducer(Producer):
    """Dies (like a killed process) after ``limit`` submits."""

    def __init__(self, settings: ProducerSettings, limit: int):
        super().__init__(settings)
        self.limit = limit

    def submit(self, ticket):  # type: ignore[no-untyped-def]
        if self.limit == 0:
            raise KeyboardInterrupt
        self.limit -= 1
        return super().submit(ticket)


def test_backfill_resumes_without_enqueuing_twice(
        producer: Producer, r: redis.Redis, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", 130)
    columns = ColumnMap(ticket_id="id")
    with pytest.raises(KeyboardInterrupt):
        backfill(CrashingProducer(producer.settings, 120), path, columns, progress=False)
    assert r.llen(keys.ROUTE_QUEUE) == 120
    report = backfill(producer, path, columns, progress=False)
    assert report.resumed_from == 100          # the last checkpoint before the crash
    assert report.duplicates == 20             # rows 100..119: caught by ticket_id dedupe
    assert report.submitted == 10
    ids = [p["ticket_id"] for p in queued_payloads(r)]
    assert len(ids) == len(set(ids)) == 130


def test_backfill_jsonl_derives_stable_ids(producer: Producer, r: redis.Redis,
                                           tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(3)) + "\n")
    report = backfill(producer, path, ColumnMap(text="body", ticket_id=None), progress=False)
    again = backfill(producer, path, ColumnMap(text="body", ticket_id=None), progress=False,
                     restart=True)
    assert report.submitted == 3 and again.duplicates == 3


def test_backfill_refuses_unknown_formats(producer: Producer, tmp_path: Path) -> None:
    path = tmp_path / "t.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(TicketRejected, match=r"csv or \.jsonl"):
        backfill(producer, path, progress=False)


# ---- issue 11, holes 3 and 4: the producer's errors stay in the tree, and leave no half-state --

def test_failed_enqueue_releases_the_dedupe_claim(producer: Producer, r: redis.Redis) -> None:
    dead = f"redis://127.0.0.1:{devstack.free_port()}/0"
    producer.celery.conf.broker_url = dead  # Redis for dedupe is up; the broker is not
    producer.celery.conf.broker_connection_timeout = 0.5
    with pytest.raises(TransientError, match="to enqueue the ticket") as caught:
        producer.submit({"ticket_id": "T-claim", "text": "hi"})
    assert caught.value.__cause__ is not None
    assert r.get(keys.dedupe_key("T-claim")) is None  # a later submit can enqueue it


def test_redis_refusing_writes_is_a_transient_error(producer: Producer, r: redis.Redis) -> None:
    r.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        with pytest.raises(TransientError, match="OutOfMemoryError") as caught:
            producer.submit({"ticket_id": "T-oom", "text": "hi"})
        assert isinstance(caught.value.__cause__, redis.exceptions.OutOfMemoryError)
    finally:
        r.config_set("maxmemory", 0)
    assert r.llen(keys.ROUTE_QUEUE) == 0 and r.get(keys.dedupe_key("T-oom")) is None


def test_every_read_of_an_unreachable_redis_is_a_transient_error() -> None:
    dead = f"redis://127.0.0.1:{devstack.free_port()}/0"
    producer = Producer(ProducerSettings(redis_url=dead, redis_timeout_s=0.5))
    calls = [producer.queue_depth, producer.stream_tail_ids,
             lambda: producer.read({keys.RESULTS_STREAM: "0-0"}),
             lambda: next(producer.follow(stop_when_idle=True), None),
             lambda: producer.outcome("T"),
             lambda: producer.route({"ticket_id": "T", "text": "hi"}, timeout_s=1)]
    for call in calls:
        with pytest.raises(TransientError, match=r"Redis at 127\.0\.0\.1"):
            call()


@pytest.mark.parametrize("argv", [["route", "hello", "--wait"], ["results"]])
def test_cli_says_redis_is_unreachable_without_a_traceback(argv: list[str]) -> None:
    import subprocess
    import sys

    dead = f"redis://127.0.0.1:{devstack.free_port()}/0"
    proc = subprocess.run([sys.executable, "-m", "thinfleet.cli", *argv], capture_output=True,
                          text=True, timeout=60,
                          env={"THINFLEET_REDIS_URL": dead, "THINFLEET_REDIS_TIMEOUT_S": "0.5",
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    assert "Redis at 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


def test_route_of_a_ticket_routed_before_answers_at_once(producer: Producer,
                                                         r: redis.Redis) -> None:
    """No worker consumes this database: the first route times out; after a result is on the
    stream (written as the worker writes it), the second route returns it at once."""
    import time

    from models.schemas import ModelRef, RoutedResult, Timings
    from worker.results import ResultPublisher

    with pytest.raises(TimeoutError):
        producer.route({"ticket_id": "T-again", "text": "hi"}, timeout_s=0.5)
    result = RoutedResult(ticket_id="T-again", label="card_arrival", route="cards",
                          confidence=0.9, status="routed", taxonomy="banking77@x",
                          model=ModelRef(name="m", sha256="a" * 64),
                          timings=Timings(prompt_eval_ms=1, decode_ms=1, total_ms=2),
                          tokens_in=3, tokens_out=0, worker="w1@host", attempt=1)
    ResultPublisher(r).publish_result(result)
    started = time.monotonic()
    again = producer.route({"ticket_id": "T-again", "text": "hi"}, timeout_s=30)
    assert time.monotonic() - started < 2
    assert isinstance(again, RoutedResult) and again.label == "card_arrival"
