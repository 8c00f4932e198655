"""Backfill: enqueue a file of historical tickets, resumably and without flooding the queue.

* **Input:** CSV (with a header) or JSONL; ``ColumnMap`` says which column is the text, the
  ticket id, the subject, and which columns to carry as ``metadata`` (e.g. a gold label).
  Without an id column, ids are ``<file digest[:12]>-<row number>``: stable across re-runs.
* **Backpressure:** before each row, while the queue is deeper than ``max_queue_depth``, wait.
* **Resume:** a checkpoint hash (``keys.backfill_checkpoint_key``) keyed by the file's sha256
  and the column map records how many rows were handled; a re-run skips them. Rows handled
  after the last checkpoint write are caught by the producer's ticket_id dedupe, and a ticket
  re-enqueued after the dedupe window is still published once per model by the worker's marker.
* **Bad rows** (missing text, oversized) are reported with their row number and skipped; they
  never stop the backfill.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models import keys
from models.errors import TicketRejected
from producer.client import Producer

CHECKPOINT_EVERY_ROWS = 50
CHECKPOINT_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns feed which ticket fields."""

    text: str = "text"
    ticket_id: str | None = "ticket_id"
    subject: str | None = None
    metadata: tuple[str, ...] = ()
    id_prefix: str = ""


@dataclass
class BackfillReport:
    """Counts of one backfill run; ``rejected`` lists ``(row_number, reason)``."""

    rows: int = 0
    submitted: int = 0
    duplicates: int = 0
    resumed_from: int = 0
    waited_s: float = 0.0
    seconds: float = 0.0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)


def source_digest(path: Path, columns: ColumnMap) -> str:
    """sha256 of the file's bytes and the column map: the checkpoint's identity."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    digest.update(json.dumps(columns.__dict__, sort_keys=True, default=list).encode())
    return digest.hexdigest()


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a ``.csv`` (header required) or ``.jsonl``/``.ndjson`` file, as dicts.

    Raises ``TicketRejected`` for other suffixes and for a JSONL line that is not an object.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
    elif suffix in {".jsonl", ".ndjson"}:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise TicketRejected(f"{path}:{number}: a JSONL line must be an object")
                    yield row
    else:
        raise TicketRejected(f"{path}: backfill reads .csv or .jsonl files, not {suffix!r}")


def count_rows(path: Path) -> int:
    """Data rows in the file (for the progress bar)."""
    return sum(1 for _ in read_rows(path))


def row_to_ticket(row: dict[str, Any], columns: ColumnMap, fallback_id: str) -> dict[str, Any]:
    """Map one input row to a ticket dict (validated later by the producer)."""
    ticket: dict[str, Any] = {"text": row.get(columns.text)}
    raw_id = str(row.get(columns.ticket_id) or fallback_id) if columns.ticket_id else fallback_id
    ticket["ticket_id"] = columns.id_prefix + raw_id
    if columns.subject and row.get(columns.subject):
        ticket["subject"] = row[columns.subject]
    ticket["metadata"] = {name: str(row[name]) for name in columns.metadata if name in row}
    ticket["source"] = "backfill"
    return ticket


def backfill(producer: Producer, path: Path, columns: ColumnMap | None = None, *,
             max_queue_depth: int | None = None, progress: bool = True,
             restart: bool = False) -> BackfillReport:
    """Enqueue every row of ``path``; see the module docstring for resume and backpressure.

    ``restart`` ignores (and resets) the checkpoint. Raises ``TransientError`` if Redis goes
    away (the checkpoint keeps what was done) and ``TicketRejected`` for an unreadable file.
    """
    columns = columns or ColumnMap()
    limit = max_queue_depth or producer.settings.max_queue_depth
    digest = source_digest(path, columns)
    checkpoint = keys.backfill_checkpoint_key(digest)
    if restart:
        producer.redis.delete(checkpoint)
    done = int(producer.redis.hget(checkpoint, "rows_done") or 0)
    report = BackfillReport(resumed_from=done)
    started = time.monotonic()
    total = count_rows(path)
    bar = tqdm(total=total, initial=done, unit="ticket", desc=f"backfill {path.name}",
               disable=not progress, dynamic_ncols=True)

    def save(rows_done: int) -> None:
        producer.redis.hset(checkpoint, mapping={"rows_done": rows_done, "file": str(path),
                                                 "total": total})
        producer.redis.expire(checkpoint, CHECKPOINT_TTL_S)

    try:
        for index, row in enumerate(read_rows(path)):
            report.rows += 1
            if index < done:
                continue
            if (index - done) % 10 == 0:
                report.waited_s += producer.wait_for_queue_below(limit)
            try:
                receipt = producer.submit(row_to_ticket(row, columns, f"{digest[:12]}-{index + 1}"))
            except TicketRejected as exc:
                report.rejected.append((index + 2 if path.suffix == ".csv" else index + 1,
                                        str(exc)))
            else:
                report.duplicates += receipt.duplicate
                report.submitted += not receipt.duplicate
                report.task_ids.append(receipt.task_id)
            bar.update(1)
            if (index + 1) % CHECKPOINT_EVERY_ROWS == 0:
                save(index + 1)
                bar.set_postfix(queue=producer.queue_depth(), refresh=False)
        save(report.rows)
    finally:
        bar.close()
    report.seconds = time.monotonic() - started
    return report
