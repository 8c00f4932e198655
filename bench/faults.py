"""The fault suite: does every ticket end routed once or dead-lettered, whatever breaks?

Real parts only: a redis-server per fault (one we can kill, restart, or fill to ``maxmemory``),
moto's S3 server, ``thinfleet worker`` processes with 2 prefork children and the real Gemma 3
270M Q4_K_M model. Each fault: enqueue a burst of tickets, break something mid-burst, repair
it, and count per ticket id what the results and dead-letter streams hold once the fleet is
quiet again:

* **routed**: ids with a result; **dead-lettered**: ids with a dead-letter entry only;
* **lost**: ids with neither, ``visibility_timeout_s + 60`` s after the repair;
* **duplicates**: results beyond the first for one id (the design promises 0);
* **recover_s**: from the repair (or the fault, when nothing is repaired) to the last ticket
  settled.

The last row runs the prompt-injection corpus (``data/injection/corpus.yaml``) against the
router the demo serves, with the worker's threshold and guard.

Timings use short limits so that a run takes minutes (``SETTINGS``: visibility timeout 30 s,
hard time limit 10 s); production defaults are 300 s and 60 s, and recovery after a whole-worker
loss scales with the visibility timeout.

    make faults                       # every fault, 150 tickets each (about 11 minutes)
    .venv/bin/python -m bench.faults --only redis_oom --tickets 60

Writes ``var/faults/faults.md`` and ``faults.json`` and prints the table. Loopback only; every
loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from models import keys
from producer import Producer, ProducerSettings
from thinfleet import devstack
from worker.acquire import sha256_file

OUT = Path("var/faults")
SETTINGS = {"THINFLEET_VISIBILITY_TIMEOUT_S": "30", "THINFLEET_TASK_TIME_LIMIT_S": "10",
            "THINFLEET_TASK_SOFT_TIME_LIMIT_S": "8", "THINFLEET_RETRY_BACKOFF_S": "1",
            "THINFLEET_RETRY_BACKOFF_MAX_S": "5", "THINFLEET_MAX_ATTEMPTS": "3",
            "THINFLEET_UNACKED_RESTORE_INTERVAL_S": "2", "THINFLEET_METRICS_PORT": "0"}
VISIBILITY_S = 30
TEXTS = ["My card has not arrived yet", "Why was I charged twice for one purchase?",
         "How do I top up with Apple Pay?", "The ATM swallowed my card",
         "I want to close my account", "My transfer is still pending after three days"]


@dataclass
class Row:
    """One fault's outcome (counts are ticket ids; ``recover_s`` seconds)."""

    fault: str
    sent: int
    routed: int
    dead_lettered: int
    lost: int
    duplicates: int
    recover_s: float | None
    note: str = ""


class Stack:
    """The S3 endpoint with the model, a model cache shared by all workers, a scratch dir."""

    def __init__(self, endpoint: str, workdir: Path):
        self.endpoint = endpoint
        self.workdir = workdir
        model = devstack.base_model_file()
        self.model_sha = sha256_file(model)
        self.model_uri = devstack.upload(endpoint, model, "faults", f"base/{model.name}")
        self.cache = workdir / "cache"
        self.count = 0

    def env(self, redis_url: str, **extra: str) -> dict[str, str]:
        return {"THINFLEET_REDIS_URL": redis_url, "THINFLEET_MODEL_URI": self.model_uri,
                "THINFLEET_MODEL_SHA256": self.model_sha,
                "THINFLEET_S3_ENDPOINT_URL": self.endpoint,
                "THINFLEET_MODEL_CACHE_DIR": str(self.cache),
                "THINFLEET_METRICS_DIR": str(self.workdir / f"metrics{self.count}"),
                **SETTINGS, **extra}

    def worker(self, redis_url: str, name: str, concurrency: int = 2, wait: bool = True,
               **extra: str) -> devstack.WorkerProcess:
        self.count += 1
        worker = devstack.start_worker(self.env(redis_url, **extra),
                                       self.workdir / f"{name}-{self.count}.log",
                                       concurrency=concurrency, hostname=name)
        if wait:
            worker.wait_ready(concurrency, timeout_s=180)
        return worker


def burst(url: str, prefix: str, n: int) -> list[str]:
    """Enqueue ``n`` tickets through the producer; returns their ids."""
    producer = Producer(ProducerSettings(redis_url=url))
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, ticket_id in enumerate(ids):
        producer.submit({"ticket_id": ticket_id, "text": TEXTS[i % len(TEXTS)]})
    return ids


def streams(client: redis.Redis) -> tuple[Counter[str], set[str]]:
    """Results per ticket id, and the ids with a dead-letter entry."""
    try:
        results = Counter(json.loads(f[b"json"])["ticket_id"]
                          for _, f in client.xrange(keys.RESULTS_STREAM))
        dead = {json.loads(f[b"json"])["ticket_id"]
                for _, f in client.xrange(keys.DEAD_LETTER_STREAM)}
    except redis.RedisError:
        return Counter(), set()
    return results, dead


def wait_results(client: redis.Redis, at_least: int, timeout_s: float = 120) -> None:
    """Block until ``at_least`` results are on the stream (mid-burst)."""
    deadline = time.monotonic() + timeout_s
    while sum(streams(client)[0].values()) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)


def settle(fault: str, client: redis.Redis, ids: list[str], repaired_at: float,
           note: str = "", quiet_s: float = 5.0) -> Row:
    """Wait until every id settled (or ``VISIBILITY_S + 60`` s after the repair), then count."""
    deadline = repaired_at + VISIBILITY_S + 60
    wanted, last_change, last_seen = set(ids), time.monotonic(), -1
    settled_at: float | None = None
    while time.monotonic() < deadline:
        results, dead = streams(client)
        done = wanted & (set(results) | dead)
        seen = sum(results.values()) + len(dead)
        if seen != last_seen:
            last_seen, last_change = seen, time.monotonic()
        if done == wanted:
            settled_at = settled_at or time.monotonic()
            if time.monotonic() - last_change > quiet_s:  # and nothing more arrives (duplicates)
                break
        time.sleep(0.25)
    results, dead = streams(client)
    routed = {i for i in wanted if results[i]}
    return Row(fault, len(ids), len(routed), len((wanted & dead) - routed),
               len(wanted - routed - dead), sum(max(0, results[i] - 1) for i in wanted),
               None if settled_at is None else round(settled_at - repaired_at, 1), note)


# ---- the faults ---------------------------------------------------------------------------

@contextlib.contextmanager
def under_fault(stack: Stack, name: str, n: int, appendonly: bool = False
                ) -> Iterator[tuple[devstack.RedisServer, redis.Redis, devstack.WorkerProcess,
                                    list[str]]]:
    """A redis-server of the fault's own, a worker on it, and a burst of ``n`` tickets
    enqueued; yields them and stops both afterwards."""
    server = devstack.RedisServer(stack.workdir / f"r-{name}", appendonly=appendonly).start()
    client = redis.Redis.from_url(server.url)
    worker = stack.worker(server.url, name)
    try:
        yield server, client, worker, burst(server.url, name, n)
    finally:
        worker.stop()
        server.stop()


def child_kill(stack: Stack, n: int) -> Row:
    with under_fault(stack, "childkill", n) as (_, client, worker, ids):
        for step in (1, 2, 3):
            wait_results(client, step * n // 4)
            pids = worker.child_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
        return settle("kill -9 one child, 3 times", client, ids, time.monotonic(),
                      "Celery replaces the child; its ticket is requeued (reject_on_worker_lost)")


def worker_kill(stack: Stack, n: int) -> Row:
    with under_fault(stack, "doomed", n) as (server, client, doomed, ids):
        wait_results(client, n // 4)
        for pid in [*doomed.child_pids(), doomed.proc.pid]:
            os.kill(pid, signal.SIGKILL)
        doomed.proc.wait(10)
        killed = time.monotonic()
        held = client.hlen(keys.KOMBU_UNACKED)
        rescuer = stack.worker(server.url, "rescuer")
        try:
            return settle("kill -9 whole worker, start a new one", client, ids, killed,
                          f"{held} tickets held by the dead worker come back after the "
                          f"visibility timeout ({VISIBILITY_S} s here, 300 s by default)")
        finally:
            rescuer.stop()


def worker_freeze_kill(stack: Stack, n: int) -> Row:
    """A worker frozen (SIGSTOP: a starved or paused host) while blocked in its pop, sent a
    burst, then killed: Redis hands the first ticket to the frozen parent, which never reads
    it. kombu's stock ``BRPOP`` loses that ticket every time; thinfleet's hand-over keeps it in
    the worker's in-flight list until a sweep requeues it."""
    server = devstack.RedisServer(stack.workdir / "r-frozen").start()
    client = redis.Redis.from_url(server.url)
    frozen = stack.worker(server.url, "frozen")
    try:
        time.sleep(1)  # idle: the parent is blocked in its pop
        pids = [frozen.proc.pid, *frozen.child_pids()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        ids = burst(server.url, "frozen", n)
        time.sleep(1)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        frozen.proc.wait(10)
        killed = time.monotonic()
        held = sum(client.llen(k) for k in client.scan_iter(f"{keys.INFLIGHT_REGISTRY}:*"))
        rescuer = stack.worker(server.url, "rescuer")
        try:
            return settle("worker frozen in its pop, then kill -9", client, ids, killed,
                          f"{held} ticket handed to the frozen worker waits in its in-flight "
                          f"list and comes back after the visibility timeout; kombu's stock "
                          f"BRPOP loses it")
        finally:
            rescuer.stop()
    finally:
        frozen.stop()
        server.stop()


def redis_restart(stack: Stack, n: int, appendonly: bool) -> Row:
    name = "aof" if appendonly else "mem"
    with under_fault(stack, name, n, appendonly) as (server, client, _, ids):
        wait_results(client, n // 4)
        server.kill()
        time.sleep(2)
        server.start()
        repaired = time.monotonic()
        if appendonly:
            return settle("Redis SIGKILL + restart, AOF everysec", client, ids, repaired,
                          "AOF replays the queue, unacked hash and streams; at most ~1 s of "
                          "writes can go")
        return settle("Redis SIGKILL + restart, no persistence (dev stack)", client, ids,
                      repaired, "the queue, and the results already published, lived only in "
                      "Redis' memory: run Redis with AOF")


def redis_oom(stack: Stack, n: int) -> Row:
    with under_fault(stack, "oom", n) as (_, client, worker, ids):
        wait_results(client, n // 4)
        client.config_set("maxmemory", 1)  # noeviction: every write refused
        time.sleep(10)
        client.config_set("maxmemory", 0)
        row = settle("Redis refusing writes (maxmemory, noeviction) for 10 s", client, ids,
                     time.monotonic(),
                     "refused requeues stay in unacked until the visibility timeout")
        if worker.proc.poll() is not None:
            row.note += f"; worker exited {worker.proc.returncode}"
        return row


def s3_boot(stack: Stack, n: int, corrupt: bool) -> Row:
    server = devstack.RedisServer(stack.workdir / ("r-s3c" if corrupt else "r-s3u")).start()
    client = redis.Redis.from_url(server.url)
    try:
        ids = burst(server.url, "s3", n)
        cache = stack.workdir / ("cache-corrupt" if corrupt else "cache-unreachable")
        if corrupt:
            junk = stack.workdir / "corrupt.gguf"
            junk.write_bytes(b"GGUF" + os.urandom(1 << 20))
            uri = devstack.upload(stack.endpoint, junk, "faults", "base/corrupt.gguf")
            extra = {"THINFLEET_MODEL_URI": uri}
        else:
            extra = {"THINFLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{devstack.free_port()}",
                     "THINFLEET_S3_CONNECT_TIMEOUT_S": "1", "THINFLEET_S3_MAX_ATTEMPTS": "2"}
        env = {**stack.env(server.url), "THINFLEET_MODEL_CACHE_DIR": str(cache), **extra}
        worker = devstack.start_worker(env, stack.workdir / f"s3-{corrupt}.log", 2, "s3boot")
        started = time.monotonic()
        code = worker.proc.wait(120)
        refused_s = time.monotonic() - started
        waiting = client.llen(keys.ROUTE_QUEUE)
        results, dead = streams(client)
        fault = "S3 serving a corrupt object at boot" if corrupt else "S3 unreachable at boot"
        return Row(fault, len(ids), sum(1 for i in ids if results[i]), len(dead),
                   len(ids) - waiting - sum(1 for i in ids if results[i]) - len(dead), 0,
                   None, f"worker refused to start (exit {code}) in {refused_s:.0f} s; "
                   f"{waiting}/{len(ids)} tickets still queued for a healthy worker")
    finally:
        server.stop()


def poison(stack: Stack, n: int) -> Row:
    server = devstack.RedisServer(stack.workdir / "r-poison").start()
    client = redis.Redis.from_url(server.url)
    worker = stack.worker(server.url, "poison")
    try:
        producer = Producer(ProducerSettings(redis_url=server.url))
        send = producer.celery.send_task
        bad: list[tuple[str, Callable[[], object]]] = [
            ("huge", lambda: send(keys.ROUTE_TASK, args=[{"ticket_id": "p-huge",
                                                         "text": "x" * (1 << 20)}])),
            ("surrogate", lambda: send(keys.ROUTE_TASK, args=[{"ticket_id": "p-sur",
                                                              "text": "a\ud800"}])),
            ("not an object", lambda: send(keys.ROUTE_TASK, args=["p-str"])),
            ("no ticket_id", lambda: send(keys.ROUTE_TASK, args=[{"text": "hi"}])),
            ("unknown field", lambda: send(keys.ROUTE_TASK, args=[{"ticket_id": "p-unk",
                                                                  "text": "hi", "x": 1}])),
            ("no args", lambda: send(keys.ROUTE_TASK, args=[])),
            ("unknown kwarg", lambda: send(keys.ROUTE_TASK, args=[{"ticket_id": "p-kw",
                                                                  "text": "hi"}], kwargs={"a": 1})),
            ("invalid JSON bytes", lambda: client.lpush(keys.ROUTE_QUEUE, b"\xff{not json")),
            ("JSON, not a task", lambda: client.lpush(keys.ROUTE_QUEUE, b'{"ticket_id": "x"}')),
        ]
        ids = burst(server.url, "good", n - len(bad))
        for _, sender in bad:
            sender()
        sent = time.monotonic()
        row = settle("poison input straight to the queue", client, ids, sent)
        deadline = time.monotonic() + 30
        while client.xlen(keys.DEAD_LETTER_STREAM) < len(bad) and time.monotonic() < deadline:
            time.sleep(0.2)
        dead = client.xlen(keys.DEAD_LETTER_STREAM)
        row.sent, row.dead_lettered = n, dead
        row.lost += len(bad) - dead
        row.note = (f"{len(bad)} kinds ({', '.join(k for k, _ in bad)}): each dead-lettered "
                    f"with a bounded excerpt; worker alive: {worker.proc.poll() is None}")
        return row
    finally:
        worker.stop()
        server.stop()


def injection(stack: Stack, n: int) -> Row:
    """The prompt-injection corpus against the router the demo serves (in process: the guard
    and threshold are the worker's own code), summarised as one row; ``thinfleet injection``
    has the per-style table."""
    from models import load_taxonomy
    from thinfleet.demo import merged_router
    from training.injection import evaluate_injection, is_attack
    from worker.acquire import resolve_model
    from worker.guard import InjectionGuard
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    taxonomy = load_taxonomy("banking77")
    staged = devstack.stage_model_dir(merged_router())
    spec = resolve_model(model_uri="", model_sha256="0" * 64, manifest_uri=str(staged),
                         manifest_sha256=None, taxonomy_sha256=taxonomy.sha256,
                         cache_dir=stack.workdir / "cache-injection")
    engine = build_engine(spec, taxonomy, 2, WorkerSettings())
    tickets = max(10, n // 3)
    try:
        report = evaluate_injection(engine, taxonomy, taxonomy.threshold_for(spec.threshold),
                                    tickets, OUT / "injection", InjectionGuard.for_taxonomy(
                                        taxonomy), "Prompt injection (fault suite)")
    finally:
        engine.close()
    attacks = [s for s in report["styles"] if is_attack(s)]
    worst = max(attacks, key=lambda s: s["auto_to_attacker_route"])
    held_out = max((s for s in attacks if s["split"] == "eval"), key=lambda s: s["flip_reported"])
    sent = tickets * len(attacks)
    return Row(f"prompt-injection corpus ({len(attacks)} attack styles)", sent, sent, 0, 0, 0,
               None, f"auto-routed to the attacker's route: at most "
               f"{worst['auto_to_attacker_route']:.1%} ({worst['style']}); reported labels "
               f"flipped by a held-out style: at most {held_out['flip_reported']:.1%} "
               f"({held_out['style']}); valid labels "
               f"{min(s['valid'] for s in attacks):.0%}; per style: var/faults/injection/")


FAULTS: dict[str, Callable[[Stack, int], Row]] = {
    "child_kill": child_kill,
    "worker_kill": worker_kill,
    "worker_freeze_kill": worker_freeze_kill,
    "redis_restart_aof": lambda s, n: redis_restart(s, n, appendonly=True),
    "redis_oom": redis_oom,
    "s3_unreachable": lambda s, n: s3_boot(s, min(n, 20), corrupt=False),
    "s3_corrupt": lambda s, n: s3_boot(s, min(n, 20), corrupt=True),
    "poison": poison,
    "redis_restart_no_persistence": lambda s, n: redis_restart(s, n, appendonly=False),
    "injection": injection,
}


def table(rows: list[Row]) -> str:
    """The README's Markdown table."""
    lines = ["| fault | sent | routed | dead-lettered | **lost** | **duplicate results** | "
             "recovered in | note |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        recover = "–" if row.recover_s is None else f"{row.recover_s:.0f} s"
        lines.append(f"| {row.fault} | {row.sent} | {row.routed} | {row.dead_lettered} | "
                     f"**{row.lost}** | **{row.duplicates}** | {recover} | {row.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=150)
    parser.add_argument("--only", action="append", choices=sorted(FAULTS))
    args = parser.parse_args(argv)
    os.environ.update(devstack.LOCAL_S3_ENV)
    work = OUT / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows: list[Row] = []
    with devstack.s3_server() as endpoint:
        stack = Stack(endpoint, work)
        for name in args.only or list(FAULTS):
            started = time.monotonic()
            row = FAULTS[name](stack, args.tickets)
            rows.append(row)
            print(f"{name}: {asdict(row)} ({time.monotonic() - started:.0f} s)", flush=True)
    text = table(rows)
    (OUT / "faults.md").write_text(text + "\n")
    (OUT / "faults.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
