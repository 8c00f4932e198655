"""Threads and OpenMP wait policy: per-ticket routing time of the engine, in process.

Each configuration runs in its own subprocess (OMP_WAIT_POLICY is read once, when libgomp
loads). Configurations alternate A/B/C/D within each repetition; the report gives the median over
repetitions of each run's median per-ticket time, and the ratio to the first configuration.

    .venv/bin/python -m bench.threads --reps 5 --tickets 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path("data/banking77/sample.csv")
CONFIGS = [("PASSIVE", 2), ("ACTIVE", 2), ("PASSIVE", 1), ("ACTIVE", 1)]


def _child(threads: int, tickets: int) -> None:
    from models import load_taxonomy
    from thinfleet.devstack import base_model_file
    from worker.engine import RoutingEngine

    with SAMPLE.open(newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)][:tickets]
    engine = RoutingEngine(base_model_file(), load_taxonomy("banking77"), n_threads=threads)
    engine.route(texts[0])  # warm-up
    times = []
    for text in texts:
        started = time.perf_counter()
        engine.route(text)
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"median_ms": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tickets", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.tickets)
        return
    runs: dict[tuple[str, int], list[float]] = {cfg: [] for cfg in CONFIGS}
    for rep in range(args.reps):
        for policy, threads in CONFIGS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.threads", "--child", str(threads),
                 "--tickets", str(args.tickets)],
                env={**os.environ, "OMP_WAIT_POLICY": policy}, capture_output=True, text=True,
                check=True)
            runs[(policy, threads)].append(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    base = statistics.median(runs[CONFIGS[0]])
    print(f"| OMP_WAIT_POLICY | threads | median ms/ticket (of {args.reps} runs) | vs first row |")
    print("| --- | --- | --- | --- |")
    for (policy, threads), values in runs.items():
        med = statistics.median(values)
        print(f"| {policy} | {threads} | {med:.0f} | {med / base:.2f}× |")


if __name__ == "__main__":
    main()
