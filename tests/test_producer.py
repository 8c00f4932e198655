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
