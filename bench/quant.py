"""What a router's quantization costs per ticket: the same router merged at two quantizations
(e.g. Q4_K_M and Q8_0, ``thinfleet merge``), routed in one process on the same tickets.

Issues 12 and 13: the R-Drop stage 2 serves 93.2 % of the 1,001 validation rows merged to Q8_0
and 92.8 % at Q4_K_M (docs/experiments/security.md). Whether Q8_0 is "the same cost per
ticket" is a speed and memory question, measured here, not in a test. Each repetition opens
each model's engine (``training.calibrate_model.open_engine``: as the worker serves it), routes
the same tickets once to warm it, then times them, in turn A/B/A/B so that the machine's drift
hits both alike. Reported per model: the GGUF's size (MiB, what each worker child maps), the
median over repetitions of tickets/s (one engine, ``--threads`` threads) and of the p50 and p95
per-ticket latency (ms), and each model's tickets/s as a ratio to the first's.

    .venv/bin/python -m bench.quant var/merged/<q4>/manifest.json var/merged/<q8>/manifest.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from bench.routing import load_tickets, run_system
from models import load_taxonomy
from models.manifest import Manifest


def time_once(manifest: Path, tickets: list[str], threads: int) -> list[float]:
    """Per-ticket latencies in ms of one warmed engine of ``manifest``."""
    from training.calibrate_model import open_engine

    taxonomy = load_taxonomy(Manifest.model_validate_json(manifest.read_text()).taxonomy.name)
    engine = open_engine(manifest, taxonomy, threads)
    try:
        run_system(engine.route, tickets)  # warm: pages mapped, caches filled
        return run_system(engine.route, tickets)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", type=Path, help="merged routers' manifests")
    parser.add_argument("--tickets", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tickets = load_tickets(args.tickets)
    runs: dict[Path, list[list[float]]] = {m: [] for m in args.manifests}
    for _ in range(args.reps):
        for manifest in args.manifests:
            runs[manifest].append(time_once(manifest, tickets, args.threads))
    rate = {m: 1000 / statistics.median(statistics.mean(r) for r in runs[m])
            for m in args.manifests}
    first = rate[args.manifests[0]]
    print(f"{len(tickets)} tickets, {args.reps} repetitions, {args.threads} threads; medians")
    print("| model | GGUF MiB | tickets/s | p50 ms | p95 ms | tickets/s vs the first |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in args.manifests:
        manifest = Manifest.model_validate_json(m.read_text())
        p50 = statistics.median(statistics.median(r) for r in runs[m])
        p95 = statistics.median(float(np.percentile(r, 95)) for r in runs[m])
        print(f"| {manifest.name} | {manifest.base_model.bytes / 2**20:.0f} | {rate[m]:.1f} | "
              f"{p50:.1f} | {p95:.1f} | {rate[m] / first:.2f} |")


if __name__ == "__main__":
    main()
