"""Issue 15, item 7: the wire contract works without Celery's Python client.

A ticket enqueued as the README's wire format says, by hand: a Celery protocol 2 message in
kombu's Redis envelope, LPUSHed with plain redis-py; and the same from Node.js with no
dependencies (``producer/examples/enqueue.mjs``). Both are routed by the real worker.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from models import keys
from producer import Producer
from thinfleet import devstack

pytestmark = pytest.mark.fleet
EXAMPLE = Path(__file__).parent.parent / "producer" / "examples" / "enqueue.mjs"


def wire_message(ticket: dict) -> tuple[str, bytes]:
    """The README's wire format, written out by hand (no kombu, no Celery)."""
    task_id = str(uuid.uuid4())
    body = [[ticket], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "thinfleet.route_ticket", "id": task_id,
                    "root_id": task_id, "parent_id": None, "group": None, "retries": 0,
                    "eta": None, "expires": None, "timelimit": [None, None]},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "thinfleet.route"},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": task_id},
    }
    return task_id, json.dumps(envelope).encode()


def wait_outcome(producer: Producer, ticket_id: str, timeout_s: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = producer.outcome(ticket_id)
        if found is not None:
            return found
        time.sleep(0.2)
    raise TimeoutError(ticket_id)


def test_a_hand_written_protocol_2_message_is_routed(
        fleet: devstack.WorkerProcess, producer: Producer, r: redis.Redis) -> None:
    ticket = {"ticket_id": "wire-1", "text": "My card has not arrived yet",
              "metadata": {"channel": "raw"}}
    task_id, message = wire_message(ticket)
    assert r.set(keys.dedupe_key("wire-1"), task_id, nx=True, ex=60)
    r.lpush("thinfleet.route", message)
    result = wait_outcome(producer, "wire-1")
    assert result.ticket_id == "wire-1" and hasattr(result, "label")
    # an unknown top-level field is refused with a reason that names it
    _, extra = wire_message({"ticket_id": "wire-2", "text": "hi", "priority": "high"})
    r.lpush("thinfleet.route", extra)
    dead = wait_outcome(producer, "wire-2")
    assert dead.failure == "invalid_ticket" and "priority" in dead.reason


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_the_node_example_enqueues_a_ticket_the_fleet_routes(
        fleet: devstack.WorkerProcess, producer: Producer, redis_url: str) -> None:
    run = subprocess.run(["node", str(EXAMPLE), redis_url, "node-1", "I lost my card"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    receipt = json.loads(run.stdout)
    assert receipt == {"ticket_id": "node-1", "task_id": receipt["task_id"], "duplicate": False}
    result = wait_outcome(producer, "node-1")
    assert hasattr(result, "label") and result.ticket_id == "node-1"
    again = subprocess.run(["node", str(EXAMPLE), redis_url, "node-1", "I lost my card"],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout)["duplicate"] is True  # the dedupe claim, as in Python
