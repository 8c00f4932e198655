"""The pruning/distillation frontier (issue 16): speed against accuracy, one router per row.

Each router (``NAME=manifest.json``; default: the shipped router and every
``models/trained/*-blocks*`` router) is served the way the fleet serves it: merged into its
base and quantized to Q4_K_M (``thinfleet merge``, cached under ``var/merged/``). In one
process, per repetition, every router routes the same tickets in turn, at 1 and at 2 threads
(systems alternating, so drift hits them alike), and each model's **floor** (the same tickets'
tokens through its blocks, no output row: ``bench.routing.measure_floor``'s label-head floor)
is measured beside it. Reported per router: blocks, GGUF size, median p50 ms per ticket at 1 and 2 threads,
× its floor, validation accuracy / macro-F1 and ECE (temperature-scaled, out-of-fold) from its
manifest (measured by ``thinfleet train`` through the worker's engine with the adapter applied
at load), and, with ``--fleet``, tickets/s per core through the whole fleet (``bench.fleet``, 2
children × 1 thread, its own run per router, one after another).

    .venv/bin/python -m bench.frontier --reps 5 --tickets 12 --fleet
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.routing import ROUTER, load_tickets, measure_floor, run_system

TRAINED = Path("models/trained")


def default_routers() -> dict[str, Path]:
    """The shipped router and every pruned router under ``models/trained``."""
    routers = {"18 blocks (shipped)": ROUTER}
    for manifest in sorted(TRAINED.glob("*blocks*/manifest.json")):
        routers[manifest.parent.name] = manifest
    return routers


def fleet_tps(manifest: Path, reps: int, tickets: int, out: Path) -> float:
    """Tickets/s of 2 children × 1 thread through ``bench.fleet`` (median of ``reps``)."""
    subprocess.run([sys.executable, "-m", "bench.fleet", "--manifest", str(manifest),
                    "--children", "2", "--reps", str(reps), "--tickets", str(tickets),
                    "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["2"]["tps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", action="append", default=[], metavar="NAME=PATH",
                        help="a router manifest (repeatable; default: shipped + pruned)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tickets", type=int, default=12)
    parser.add_argument("--fleet", action="store_true",
                        help="also tickets/s per core through bench.fleet (2 children)")
    parser.add_argument("--fleet-reps", type=int, default=3)
    parser.add_argument("--fleet-tickets", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from models import load_taxonomy
    from models.manifest import Manifest
    from thinfleet.demo import merged_router
    from thinfleet.devstack import stage_model_dir
    from training.prune import block_count
    from worker.acquire import resolve_model
    from worker.prompt import encode_ticket
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    routers = ({name: Path(path) for name, _, path in (r.partition("=") for r in args.router)}
               if args.router else default_routers())
    taxonomy = load_taxonomy("banking77")
    tickets = load_tickets(args.tickets)
    settings = WorkerSettings()
    served: dict[str, Path] = {}
    engines: dict[tuple[str, int], Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, manifest_path in routers.items():
        source = Manifest.model_validate_json(manifest_path.read_text())
        # every router at Q4_K_M, as the README's frontier table was measured (the shipped
        # router is served at Q8_0 since: a median 4 % more time per ticket, bench.quant)
        merged = (merged_router(manifest_path, "Q4_K_M") if source.adapter is not None
                  else manifest_path)
        staged = stage_model_dir(merged)
        served[name] = merged
        spec = resolve_model(model_uri="", model_sha256="0" * 64, manifest_uri=str(staged),
                             manifest_sha256=None, taxonomy_sha256=taxonomy.sha256,
                             cache_dir=settings.model_cache_dir)
        for threads in (1, 2):
            engines[(name, threads)] = build_engine(spec, taxonomy, threads, settings)
        engine = engines[(name, 1)]
        base_file = staged.parent / Manifest.model_validate_json(staged.read_text()).base_model.path
        metrics = source.metrics.get("model", {})
        info[name] = {
            "blocks": block_count(base_file), "gguf_mib": base_file.stat().st_size / 2**20,
            "model_file": base_file, "accuracy": metrics.get("accuracy"),
            "macro_f1": metrics.get("macro_f1"),
            "ece": source.calibration.ece_after if source.calibration else None,
            "coverage_99": metrics.get("coverage_at_precision", {}).get("0.99"),
            "distilled": bool(source.recipe.get("distill_from")),
            "ticket_ids": [encode_ticket(engine.runtime.tokenize, t, None,
                                         engine.max_ticket_tokens)[0] for t in tickets]}
    runs: dict[tuple[str, int | str], list[float]] = {}
    for engine in engines.values():  # warm-up, not timed
        engine.route(tickets[0])
    for rep in range(args.reps):
        for (name, threads), engine in engines.items():
            runs.setdefault((name, threads), []).append(
                statistics.median(run_system(engine.route, tickets)))
        for name, row in info.items():
            for threads in (1, 2):
                _, blocks_only = measure_floor(row["model_file"], threads, row["ticket_ids"])
                runs.setdefault((name, f"floor{threads}"), []).append(
                    statistics.median(blocks_only))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{name}@{t} {runs[(name, t)][-1]:.0f} ms" for name, t in engines), flush=True)
    for engine in engines.values():
        engine.close()
    for name, row in info.items():
        for key in (1, 2, "floor1", "floor2"):
            row[f"p50_{key}"] = statistics.median(runs[(name, key)])
        if args.fleet:
            out = Path("var/bench-frontier") / f"{''.join(c if c.isalnum() else '_' for c in name)}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            row["fleet_tps"] = fleet_tps(served[name], args.fleet_reps, args.fleet_tickets, out)
            print(f"{name}: fleet {row['fleet_tps']:.2f} tickets/s (2 children)", flush=True)

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f} %"

    print(f"\n{len(tickets)} Banking77 tickets, {args.reps} repetitions, merged Q4_K_M, "
          "median of per-run p50s\n")
    print("| router | blocks | distilled | GGUF MiB | ms/ticket, 1 thread (× floor) | "
          "ms/ticket, 2 threads (× floor) | fleet tickets/s per core | validation accuracy | "
          "macro-F1 | ECE (temperature-scaled, out-of-fold) | coverage at 99 % precision "
          "(uncalibrated, in-sample) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in info.items():
        fleet = f"{row['fleet_tps'] / 2:.2f}" if "fleet_tps" in row else "–"
        ece = "–" if row["ece"] is None else f"{row['ece']:.3f}"
        print(f"| {name} | {row['blocks']} | {'yes' if row['distilled'] else 'no'} | "
              f"{row['gguf_mib']:.0f} | {row['p50_1']:.0f} ({row['p50_1'] / row['p50_floor1']:.2f}×)"
              f" | {row['p50_2']:.0f} ({row['p50_2'] / row['p50_floor2']:.2f}×) | {fleet} | "
              f"{pct(row['accuracy'])} | {row['macro_f1'] or float('nan'):.3f} | "
              f"{ece} | {pct(row['coverage_99'])} |")
    if args.json:
        args.json.write_text(json.dumps({n: {k: v for k, v in r.items() if k not in (
            "model_file", "ticket_ids")} for n, r in info.items()}, indent=2, default=str))


if __name__ == "__main__":
    main()
