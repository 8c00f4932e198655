"""The fleet end to end: producer -> Redis -> Celery worker -> results stream, 1 and 2 children.

Same machine, same model as ``bench.routing`` (the shipped fine-tuned router, label-only),
through everything a deployment runs: a real redis-server, moto's S3 server, ``thinfleet
worker`` with prefork children pulling the model through its manifest. Per repetition and per
child count (alternating, so drift hits both alike):

* **boot**: process start to every child ready (model mapped, prefix warm). The first boot of
  each child count starts from an empty cache (**cold**: S3 download + sha256 + map + warm-up);
  later ones find the model cached (**warm**);
* **throughput**: a burst of N tickets enqueued at once; tickets/s from the first enqueue to the
  last result on the stream;
* **latency**: per ticket, the task's own wall time as the worker records it (``total_ms``:
  validate, prompt, head, publish), and enqueue-to-result for the burst;
* **memory**: RSS, PSS and private memory of each child after the burst, from
  ``/proc/PID/smaps_rollup``; the PSS an extra child adds is total PSS(2) - total PSS(1), of
  the children and of the whole worker (parent included: a new child takes over part of the
  parent's share of the shared pages, which the children-only figure counts as added);
* **Redis cost**: ``CONFIG RESETSTAT`` before the burst and ``INFO commandstats`` after it:
  Redis commands and Redis CPU (the commands' own execution time, ``usec``) per ticket, for
  everything that ran (producer, broker, worker, results, the bench's own stream reads), and
  the most frequent commands. One Redis serves the whole fleet, so this bounds how far the
  fleet scales by worker count (issue 16).

Medians over repetitions are reported.

    .venv/bin/python -m bench.fleet --reps 5 --tickets 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.routing import ROUTER, fields_taxonomy, load_tickets
from models import keys
from thinfleet import devstack
from worker.acquire import sha256_file

VAR = Path("var/bench-fleet")


def burst(producer: Any, tickets: list[str], timeout_s: float = 600.0) -> dict[str, Any]:
    """Enqueue every ticket at once and wait for all results; returns the burst's figures."""
    run = uuid.uuid4().hex[:8]
    positions = producer.stream_tail_ids()
    started = time.monotonic()
    sent = {f"bench-{run}-{i}": time.monotonic() for i in range(len(tickets))}
    for i, text in enumerate(tickets):
        producer.submit({"ticket_id": f"bench-{run}-{i}", "text": text})
    done: dict[str, dict[str, Any]] = {}
    arrived: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(sent) and time.monotonic() < deadline:
        for entry in producer.read(positions, block_ms=500, count=500):
            positions[entry.stream] = entry.entry_id
            tid = entry.document.get("ticket_id")
            if tid in sent and entry.stream == keys.RESULTS_STREAM:
                done[tid] = entry.document
                arrived[tid] = time.monotonic()
    wall_s = time.monotonic() - started
    if len(done) < len(sent):
        raise RuntimeError(f"only {len(done)} of {len(sent)} tickets were routed")
    task_ms = [doc["timings"]["total_ms"] for doc in done.values()]
    e2e_ms = [(arrived[t] - sent[t]) * 1000 for t in done]
    return {"tps": len(done) / wall_s, "task_p50": float(np.percentile(task_ms, 50)),
            "task_p95": float(np.percentile(task_ms, 95)),
            "e2e_p50": float(np.percentile(e2e_ms, 50)), "e2e_p95": float(np.percentile(e2e_ms, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tickets", type=int, default=60)
    parser.add_argument("--children", default="1,2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--manifest", type=Path, default=ROUTER, help="the router to serve")
    parser.add_argument("--fields", action="store_true",
                        help="extraction fields on: the base model with the label trie and a "
                        "Banking77 taxonomy carrying the ecommerce taxonomy's two fields")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="extra worker setting, e.g. --set n_ubatch=64")
    args = parser.parse_args()

    import redis

    from producer import Producer, ProducerSettings

    children_counts = [int(c) for c in args.children.split(",")]
    tickets = load_tickets(args.tickets)
    shutil.rmtree(VAR, ignore_errors=True)
    figures: dict[int, dict[str, list[float]]] = {c: {} for c in children_counts}

    top_commands: dict[int, list[tuple[str, int]]] = {}

    def add(children: int, name: str, value: float) -> None:
        figures[children].setdefault(name, []).append(value)

    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(devstack.redis_server(VAR / "redis"))
        endpoint = stack.enter_context(devstack.s3_server())
        if args.fields:
            import yaml

            taxonomy = fields_taxonomy()
            taxonomy_file = (VAR / "banking77-fields.yaml").resolve()
            taxonomy_file.write_text(yaml.safe_dump(taxonomy.model_dump(mode="json")))
            base = devstack.base_model_file()
            model_env = {"THINFLEET_MODEL_URI": devstack.upload(
                endpoint, base, "thinfleet-models", f"base/{base.name}"),
                "THINFLEET_MODEL_SHA256": sha256_file(base),
                "THINFLEET_TAXONOMY": str(taxonomy_file)}
            served = f"{base.name} (trie, fields product_name and brief_description)"
        else:
            staged = devstack.stage_model_dir(args.manifest)
            model_env = {"THINFLEET_MODEL_MANIFEST": devstack.upload_model_dir(
                endpoint, staged, "thinfleet-models", "routers/bench"),
                "THINFLEET_MANIFEST_SHA256": sha256_file(staged)}
            served = f"{staged.parent.name} (label-only)"
        producer = Producer(ProducerSettings(redis_url=redis_url))
        for rep in range(args.reps):
            for children in children_counts:
                cache = VAR / f"cache-{children}"
                cold = not cache.exists()
                env = {**model_env, "THINFLEET_REDIS_URL": redis_url,
                       "THINFLEET_S3_ENDPOINT_URL": endpoint,
                       "THINFLEET_MODEL_CACHE_DIR": str(cache.resolve()),
                       "THINFLEET_METRICS_PORT": "0", "THINFLEET_METRICS_DIR":
                       str((VAR / f"metrics-{rep}-{children}").resolve()),
                       **{f"THINFLEET_{k.upper()}": v for k, _, v in
                          (item.partition("=") for item in args.set)}}
                started = time.monotonic()
                worker = devstack.start_worker(env, VAR / f"worker-{rep}-{children}.log",
                                               concurrency=children, hostname=f"bench{children}")
                try:
                    worker.wait_ready(children, timeout_s=300)
                    boot_s = time.monotonic() - started
                    add(children, "boot_cold_s" if cold else "boot_warm_s", boot_s)
                    burst(producer, tickets[:4])  # warm-up, not timed
                    admin = redis.Redis.from_url(redis_url)
                    admin.config_resetstat()
                    result = burst(producer, tickets)
                    stats = admin.info("commandstats")
                    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
                    result["redis_calls_per_ticket"] = sum(calls.values()) / len(tickets)
                    result["redis_usec_per_ticket"] = sum(
                        v["usec"] for v in stats.values()) / len(tickets)
                    top_commands[children] = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
                    for name, value in result.items():
                        add(children, name, value)
                    pss = [devstack.memory_of(pid) for pid in worker.child_pids()]
                    add(children, "pss_total_mib", sum(m["pss_kib"] for m in pss) / 1024)
                    # with the parent: a preloaded parent holds the model's structures, and a
                    # new child takes over part of the parent's share of the shared pages
                    add(children, "pss_fleet_mib", (devstack.memory_of(worker.proc.pid)["pss_kib"]
                                                    + sum(m["pss_kib"] for m in pss)) / 1024)
                    add(children, "pss_child_mib", statistics.mean(m["pss_kib"] for m in pss) / 1024)
                    add(children, "rss_child_mib", statistics.mean(m["rss_kib"] for m in pss) / 1024)
                    # Private_Dirty: the child's own anonymous memory (Private_Clean would also
                    # count the model's file pages while only one child maps them).
                    add(children, "private_child_mib", statistics.mean(
                        m["private_dirty_kib"] for m in pss) / 1024)
                finally:
                    worker.stop()
                print(f"rep {rep + 1}/{args.reps} children {children}: "
                      f"{'cold' if cold else 'warm'} boot {boot_s:.1f} s, "
                      f"{result['tps']:.2f} tickets/s, task p50 {result['task_p50']:.0f} ms",
                      flush=True)

    med = {c: {k: statistics.median(v) for k, v in f.items()} for c, f in figures.items()}
    print(f"\nfleet: {len(tickets)}-ticket bursts, {args.reps} repetitions, {served}"
          f"{', ' + ' '.join(args.set) if args.set else ''}, median of per-run figures\n")
    print("| children | tickets/s | task p50 ms | task p95 ms | burst e2e p50 s | PSS/child MiB "
          "| private/child MiB | boot cold s | boot warm s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c, row in med.items():
        print(f"| {c} | {row['tps']:.2f} | {row['task_p50']:.0f} | {row['task_p95']:.0f} | "
              f"{row['e2e_p50'] / 1000:.1f} | {row['pss_child_mib']:.0f} | "
              f"{row['private_child_mib']:.0f} | {row.get('boot_cold_s', float('nan')):.1f} | "
              f"{row.get('boot_warm_s', float('nan')):.1f} |")
    print("\n| children | Redis commands per ticket | Redis CPU per ticket (usec) | most frequent "
          "commands in the last burst |")
    print("| --- | --- | --- | --- |")
    for c, row in med.items():
        top = ", ".join(f"{name} {count}" for name, count in top_commands.get(c, []))
        print(f"| {c} | {row['redis_calls_per_ticket']:.1f} | "
              f"{row['redis_usec_per_ticket']:.0f} | {top} |")
    if len(med) >= 2:
        a, b = sorted(med)[:2]
        print(f"\nPSS added by child {b} (children's total PSS({b}) - ({a})): "
              f"{med[b]['pss_total_mib'] - med[a]['pss_total_mib']:.0f} MiB; parent and "
              f"children: {med[b]['pss_fleet_mib'] - med[a]['pss_fleet_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({str(c): r for c, r in med.items()}, indent=2))


if __name__ == "__main__":
    main()
