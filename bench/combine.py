"""A stronger router at the same cost? Score combinations measured out-of-fold (issue 13).

Routes the validation split once per manifest through the worker's engine (the label head's raw
scores, ``training.calibrate_model.head_scores``), fits the TF-IDF baseline on the training
rows (``training.evaluate.tfidf_pipeline``, the split ``thinfleet train`` uses), and reports for
each router, each router plus ``w`` times the TF-IDF log-probabilities, and the ensemble of the
first two routers (log-softmax sum: twice the cost per ticket): accuracy, ECE, AURC and coverage
at 95 / 98 / 99 % precision, all **out-of-fold** (5 stratified folds: ``w`` chosen by accuracy,
ties by NLL, and the temperature fitted on four folds, measured on the fifth). It also prints
how much ECE 1,001 rows can show: the ECE of a router that is *perfectly* calibrated at the
first router's out-of-fold confidences, its labels drawn from them (median and 90th percentile
of 200 draws). Usage (about 2 min of engine time per manifest on 2 cores)::

    python -m bench.combine \\
        --manifest models/trained/banking77-gemma3-270m-lora-accounts-pair/manifest.json \\
        --manifest models/trained/banking77-gemma3-270m-lora/manifest.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.calibrate import (
    expected_calibration_error,
    fit_temperature,
    nll,
    risk_coverage,
    softmax,
    stratified_folds,
)

VALIDATION = Path("data/banking77/validation.csv")
TRAIN = Path("../shared/datasets/banking77/train.csv")
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def log_softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of ``scores / temperature``; ``[n, k]`` -> ``[n, k]``."""
    return np.log(softmax(scores, temperature))


def out_of_fold(combine: Callable[[float], np.ndarray], gold: np.ndarray,
                weights: tuple[float, ...] = (0.0,), seed: int = 13
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the predicted label and temperature-scaled confidence of ``combine(w)``
    (scores ``[n, k]``), with ``w`` and the temperature fitted on the other folds."""
    fold = stratified_folds(gold, 5, seed)
    predicted, confidence = np.zeros(len(gold), dtype=np.int64), np.zeros(len(gold))
    for k in range(5):
        fit, held = fold != k, fold == k
        accuracy = {w: float((combine(w)[fit].argmax(1) == gold[fit]).mean()) for w in weights}
        best = max(accuracy.values())
        w = min((w for w in weights if accuracy[w] == best), key=lambda w: nll(
            combine(w)[fit], gold[fit], fit_temperature(combine(w)[fit], gold[fit])))
        scores = combine(w)
        probs = softmax(scores[held], fit_temperature(scores[fit], gold[fit]))
        predicted[held], confidence[held] = probs.argmax(1), probs.max(1)
    return predicted, confidence


def row(name: str, predicted: np.ndarray, confidence: np.ndarray, gold: np.ndarray) -> str:
    """One table row of out-of-fold figures."""
    correct = predicted == gold
    curve = risk_coverage(correct, confidence)
    at = curve.coverage_at
    return (f"| {name} | {correct.mean():.1%} | {expected_calibration_error(correct, confidence):.3f}"
            f" | {curve.aurc:.4f} | {at['0.95']:.1%} / {at['0.98']:.1%} / {at['0.99']:.1%} |")


def main() -> None:
    from models import load_taxonomy
    from training.calibrate_model import head_scores
    from training.evaluate import tfidf_pipeline
    from training.recipe import read_labelled
    from training.split import stratified_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--train-data", default=str(TRAIN))
    args = parser.parse_args()
    taxonomy = load_taxonomy("banking77")
    rows = read_labelled(VALIDATION, "text", "category")
    train, held_out = stratified_split(read_labelled(Path(args.train_data), "text", "category"))
    if sorted(held_out) != sorted(rows):
        raise SystemExit(f"{VALIDATION} is not the validation split of {args.train_data}")
    gold = np.array([taxonomy.label_names.index(label) for _, label in rows])
    pipeline = tfidf_pipeline(train)
    order = [list(pipeline.classes_).index(label) for label in taxonomy.label_names]
    tfidf = np.log(np.clip(pipeline.predict_proba([t for t, _ in rows])[:, order], 1e-12, 1))
    scores = {Path(m).parent.name: head_scores(Path(m), taxonomy, [t for t, _ in rows])
              for m in args.manifest}
    print("| system (out-of-fold) | accuracy | ECE | AURC | coverage at 95 / 98 / 99 % precision |")
    print("| --- | --- | --- | --- | --- |")
    print(row("TF-IDF", *out_of_fold(lambda w: tfidf, gold), gold))
    for name, raw in scores.items():
        print(row(name, *out_of_fold(lambda w, raw=raw: raw, gold), gold))
        print(row(f"{name} + w · TF-IDF", *out_of_fold(
            lambda w, raw=raw: log_softmax(raw, 0.7) + w * tfidf, gold, WEIGHTS), gold))
    if len(scores) >= 2:
        (a_name, a), (b_name, b) = list(scores.items())[:2]
        print(row(f"ensemble {a_name} + {b_name} (2x cost)", *out_of_fold(
            lambda w: log_softmax(a, 0.7) + log_softmax(b, 0.7), gold), gold))
    _, confidence = out_of_fold(lambda w: next(iter(scores.values())), gold)
    rng = np.random.default_rng(0)
    floor = [expected_calibration_error(rng.random(len(confidence)) < confidence, confidence)
             for _ in range(200)]
    print(f"\nECE of a perfectly calibrated router at these confidences, {len(gold)} rows: "
          f"median {np.median(floor):.3f}, 90th percentile {np.quantile(floor, 0.9):.3f}")


if __name__ == "__main__":
    main()
