"""An estimated precision threshold against a guaranteed one, on a head router's scores.

The threshold ``thinfleet calibrate`` records by default meets the precision target on the
calibration rows (a point estimate); ``--delta`` records the SGR threshold instead, whose
precision is at least the target with probability 1 - delta (Geifman & El-Yaniv 2017,
arXiv:1705.08500; ``training.calibrate.guaranteed_threshold``). This routes the validation
split once through the worker's engine (``training.calibrate_model.head_scores``; cached in
``var/bench/``), then for each target, with and without the guarantee:

* the threshold fitted on all rows (temperature, beta map, threshold: as ``thinfleet calibrate``);
* out-of-fold coverage and precision (5 stratified folds, ``training.calibrate.cross_fit``);
* ``--halves`` random halves: fitted on one half, measured on the other; the mean coverage and
  how many halves fell below the target (each measured half is itself an estimate from about
  500 rows, so this count is noisy too).

Usage (about 3 min for the scores on 2 CPU cores, then seconds)::

    python -m bench.guarantee --manifest models/trained/banking77-gemma3-270m-lora-accounts-pair/manifest.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from models import load_taxonomy
from training.calibrate import (
    calibrated_confidence,
    cross_fit,
    fit_head_calibration,
    threshold_for_precision,
)
from training.recipe import read_labelled

VALIDATION = Path("data/banking77/validation.csv")


def fit_threshold(scores: np.ndarray, gold: np.ndarray, target: float,
                  delta: float | None
                  ) -> tuple[float, float, tuple[float, float, float] | None]:
    """Temperature, beta map and the ``target`` threshold on ``scores`` ``[n, k]``, as
    ``thinfleet calibrate`` fits them; returns ``(threshold, T, beta)``."""
    correct = scores.argmax(axis=1) == gold
    t, b = fit_head_calibration(scores, gold)
    return threshold_for_precision(correct, calibrated_confidence(scores, t, b), target,
                                   delta), t, b


def compare(scores: np.ndarray, gold: np.ndarray, targets: list[float], delta: float,
            halves: int, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """For each target, estimated and guaranteed: threshold, out-of-fold coverage and
    precision, and the random-halves figures (module doc)."""
    correct = scores.argmax(axis=1) == gold
    out: dict[str, dict[str, float | None]] = {}
    for target in targets:
        for guarantee in (None, delta):
            threshold, t, b = fit_threshold(scores, gold, target, guarantee)
            routed = cross_fit(scores, gold, target, 5, 13, delta=guarantee).routed
            rng = np.random.default_rng(seed)
            below, coverage = 0, []
            for _ in range(halves):
                order = rng.permutation(len(gold))
                fit, held = order[: len(gold) // 2], order[len(gold) // 2:]
                th, tt, bb = fit_threshold(scores[fit], gold[fit], target, guarantee)
                auto = calibrated_confidence(scores[held], tt, bb) >= th
                coverage.append(float(auto.mean()))
                below += bool(auto.any() and correct[held][auto].mean() < target)
            out[f"{target:.2f} {'guaranteed' if guarantee else 'estimated'}"] = {
                "threshold": threshold,
                "coverage_in_sample": float(
                    (calibrated_confidence(scores, t, b) >= threshold).mean()),
                "coverage_out_of_fold": float(routed.mean()),
                "precision_out_of_fold": float(correct[routed].mean()) if routed.any() else None,
                "halves_coverage_mean": float(np.mean(coverage)),
                "halves_below_target": below / halves if halves else None,
            }
    return out


def main() -> None:
    """Print one JSON line per (target, kind) and write ``var/bench/guarantee-<manifest>.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", default=str(VALIDATION))
    parser.add_argument("--taxonomy", default="banking77")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--halves", type=int, default=100)
    parser.add_argument("--target", type=float, action="append",
                        help="precision target (repeatable; default 0.95, 0.98, 0.99)")
    args = parser.parse_args()
    taxonomy = load_taxonomy(args.taxonomy)
    rows = read_labelled(Path(args.data), "text", "category")
    manifest = Path(args.manifest)
    key = hashlib.sha256(manifest.read_bytes() + Path(args.data).read_bytes()).hexdigest()[:12]
    cache = Path("var/bench") / f"head-scores-{key}.npz"
    if cache.exists():
        scores = np.load(cache)["scores"]
    else:
        from training.calibrate_model import head_scores

        scores = head_scores(manifest, taxonomy, [text for text, _ in rows])
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, scores=scores)
    index = {label: i for i, label in enumerate(taxonomy.label_names)}
    gold = np.array([index[label] for _, label in rows])
    result = compare(scores, gold, args.target or [0.95, 0.98, 0.99], args.delta, args.halves)
    for name, figures in result.items():
        print(json.dumps({"target": name, **figures}))
    report = Path("var/bench") / f"guarantee-{key}.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
