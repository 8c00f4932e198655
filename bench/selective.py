"""Which score knows best when the router is wrong? Selective-routing scores compared.

Issue 13 asks for 90 % of tickets auto-routed at 99 % precision, and for margin- or
energy-based scores to be measured before a stronger router is trained. This routes the
validation split once through the worker's engine per manifest (the label head's raw scores,
``RouteOutcome.scores``), then ranks the tickets by each score and reports the risk–coverage
curve's AURC and its coverage at 95 / 98 / 99 % precision (``training.calibrate.risk_coverage``;
Geifman & El-Yaniv 2017). All scores use the manifest's temperature ``T``:

* ``max_prob``: the top label's softmax probability (what the worker routes on);
* ``margin``: top probability minus the second's;
* ``energy``: ``T * logsumexp(s / T)``, the negative free energy (Liu et al. 2020,
  arXiv:2010.03759);
* ``max_logit``: the top raw score.

Coverage here is in-sample (the best threshold for these rows), the same for every score, so
the ranking quality is compared, not a deployable figure; the deployable figures are the
out-of-fold ones of ``thinfleet eval``. Usage::

    python -m bench.selective \\
        --manifest models/trained/banking77-gemma3-270m-lora-accounts-pair/manifest.json \\
        --manifest models/trained/banking77-gemma3-270m-lora/manifest.json
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from training.calibrate import risk_coverage, softmax

VALIDATION = Path("data/banking77/validation.csv")


def scores_of(raw: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """Each selective score of raw head scores ``[n, n_labels]`` at ``temperature``: ``[n]``."""
    probs = softmax(raw, temperature)
    top2 = np.sort(probs, axis=1)[:, -2:]
    z = raw / temperature
    zmax = z.max(axis=1)
    energy = temperature * (zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1)))
    return {"max_prob": top2[:, 1], "margin": top2[:, 1] - top2[:, 0], "energy": energy,
            "max_logit": raw.max(axis=1)}


def measure(manifest: Path, rows: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Route ``rows`` with the model of ``manifest``; each score's AURC and coverage figures."""
    from models import load_taxonomy
    from models.manifest import Manifest
    from training.calibrate_model import open_engine

    spec = Manifest.model_validate_json(manifest.read_text())
    taxonomy = load_taxonomy(spec.taxonomy.name)
    temperature = spec.calibration.temperature if spec.calibration else 1.0
    engine = open_engine(manifest, taxonomy, threads=2)
    try:
        raw = np.stack([engine.route(text).scores for text, _ in rows])  # type: ignore[misc]
    finally:
        engine.close()
    gold = np.array([taxonomy.label_names.index(label) for _, label in rows])
    correct = raw.argmax(axis=1) == gold
    out = {}
    for name, score in scores_of(raw, temperature).items():
        curve = risk_coverage(correct, score)
        out[name] = {"aurc": curve.aurc, **{f"coverage_at_{k}": v
                                           for k, v in curve.coverage_at.items()}}
    out["_accuracy"] = {"accuracy": float(correct.mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--data", default=str(VALIDATION))
    args = parser.parse_args()
    with Path(args.data).open(newline="") as handle:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(handle)]
    print("| model | score | AURC | coverage at 95 / 98 / 99 % precision (in-sample) |")
    print("| --- | --- | --- | --- |")
    for manifest in args.manifest:
        figures = measure(Path(manifest), rows)
        accuracy = figures.pop("_accuracy")["accuracy"]
        for name, f in figures.items():
            print(f"| {Path(manifest).parent.name} ({accuracy:.1%}) | {name} | {f['aurc']:.4f} | "
                  f"{f['coverage_at_0.95']:.1%} / {f['coverage_at_0.98']:.1%} / "
                  f"{f['coverage_at_0.99']:.1%} |")


if __name__ == "__main__":
    main()
