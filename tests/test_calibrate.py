"""Issue 13: calibrated confidence and a precision-targeted threshold, fitted, stored, served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import load_taxonomy
from models.errors import ModelUnavailable
from models.manifest import Manifest
from training.calibrate import (
    cross_fit,
    expected_calibration_error,
    fit_beta,
    fit_temperature,
    risk_coverage,
    softmax,
    threshold_for_precision,
)


def synthetic(n: int = 3000, k: int = 5, true_t: float = 0.5, seed: int = 0):  # type: ignore[no-untyped-def]
    """Scores whose labels are drawn from softmax(scores / true_t): a model whose calibrated
    temperature is exactly ``true_t``."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 1.0, (n, k))
    probs = softmax(scores, true_t)
    gold = np.array([rng.choice(k, p=p) for p in probs])
    return scores, gold


def test_temperature_scaling_recovers_the_true_temperature_and_keeps_the_argmax() -> None:
    scores, gold = synthetic()
    t = fit_temperature(scores, gold)
    assert t == pytest.approx(0.5, rel=0.1)
    correct = scores.argmax(1) == gold
    before = expected_calibration_error(correct, softmax(scores, 1.0).max(1))
    after = expected_calibration_error(correct, softmax(scores, t).max(1))
    assert after < 0.03 < before
    assert (softmax(scores, t).argmax(1) == scores.argmax(1)).all()


def test_beta_calibration_recovers_a_known_map_and_never_reorders() -> None:
    from worker.engine import beta_map

    rng = np.random.default_rng(1)
    confidence = rng.beta(5, 1.2, 20000)  # a router's top-label confidences, mostly high
    true = (2.0, 0.6, 0.4)
    correct = rng.random(confidence.size) < beta_map(confidence, true)
    a, b, c = fit_beta(confidence, correct)
    mapped = beta_map(confidence, (a, b, c))
    assert np.abs(mapped - beta_map(confidence, true)).max() < 0.03  # the map, not its (a, b, c)
    assert (np.argsort(mapped, kind="stable") == np.argsort(confidence, kind="stable")).all()
    before = expected_calibration_error(correct, confidence)
    assert expected_calibration_error(correct, mapped) < 0.01 < before
    # a map that would decrease somewhere is refitted without that feature (a, b >= 0)
    flat = rng.random(confidence.size) < 0.9
    assert min(fit_beta(confidence, flat)[:2]) >= 0.0
    with pytest.raises(ValueError, match="both right and wrong"):
        fit_beta(confidence, np.ones(confidence.size, dtype=bool))


def test_a_head_refuses_a_decreasing_beta_map(tmp_path: Path) -> None:
    from worker.engine import LabelHead

    np.savez(tmp_path / "head.npz", weight=np.zeros((2, 4), np.float32),
             bias=np.zeros(2, np.float32), labels=np.array(["a", "b"]))
    assert LabelHead.load(tmp_path / "head.npz", 0.7, (1.0, 0.5, 0.1)).confidence(0.9) == (
        pytest.approx(1 / (1 + np.exp(-(0.1 + np.log(0.9) - 0.5 * np.log(0.1))))))
    with pytest.raises(ModelUnavailable, match="beta"):
        LabelHead.load(tmp_path / "head.npz", 0.7, (-1.0, 0.5, 0.1))


def test_risk_coverage_and_the_precision_threshold() -> None:
    correct = np.array([True] * 90 + [False] * 10)
    confidence = np.r_[np.linspace(0.99, 0.60, 90), np.linspace(0.59, 0.10, 10)]
    curve = risk_coverage(correct, confidence)
    assert curve.coverage_at["0.99"] == pytest.approx(0.90)
    assert curve.aurc == pytest.approx(np.mean(np.cumsum(~correct) / np.arange(1, 101)))
    assert threshold_for_precision(correct, confidence, 0.99) == pytest.approx(0.60, abs=1e-5)
    # ties are covered together: no threshold can split them
    tied = risk_coverage(np.array([True, False]), np.array([0.9, 0.9]))
    assert list(tied.coverage) == [1.0]
    # an unreachable target routes nothing automatically
    assert threshold_for_precision(np.array([False]), np.array([0.7]), 0.9) > 0.7


def test_cross_fit_never_measures_a_row_on_its_own_fit() -> None:
    scores, gold = synthetic(n=1000)
    fit = cross_fit(scores, gold, 0.9, folds=5)
    assert len(fit.temperatures) == 5 and all(0.3 < t < 0.8 for t in fit.temperatures)
    correct = scores.argmax(1) == gold
    assert expected_calibration_error(correct, fit.confidence) < 0.05
    assert 0 < fit.routed.mean() < 1


def test_taxonomy_decides_which_threshold_is_in_force() -> None:
    taxonomy = load_taxonomy("banking77")
    assert taxonomy.sha256.startswith("f53a9008c1f7")  # new keys at default: pins stay valid
    assert taxonomy.threshold_for(None) == taxonomy.confidence_threshold == 0.35
    assert taxonomy.threshold_for(0.8) == 0.8  # the model's precision-targeted one wins
    assert taxonomy.route_for("card_arrival", 0.7, model_threshold=0.8) == ("human-triage", True)
    strict = taxonomy.model_copy(update={"route_thresholds": {"security": 0.95}})
    assert strict.sha256 != taxonomy.sha256
    assert strict.route_for("lost_or_stolen_card", 0.9, 0.8) == ("human-triage", True)
    assert strict.route_for("card_arrival", 0.9, 0.8) == ("cards", False)
    forced = taxonomy.model_copy(update={"override_model_threshold": True})
    assert forced.threshold_for(0.8) == 0.35


def test_calibrate_writes_temperature_and_threshold_the_worker_serves(
        tmp_path: Path, model_file: Path) -> None:
    """The whole path on the real model: calibrate a manifest (synthetic head, real GGUF),
    resolve it as a worker does, and check the engine applies the temperature (same label,
    calibrated confidence) and the task routes by the manifest's threshold."""
    from tests.test_manifest import make_model_dir, resolve
    from training.calibrate_model import calibrate_manifest
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    taxonomy = load_taxonomy("banking77")
    manifest = make_model_dir(tmp_path, model_file)  # always label #1, score 5 vs 0
    labels = taxonomy.label_names
    rows = [("where is my card", labels[1])] * 60 + [("hi", labels[2])] * 40
    scores = np.zeros((100, len(labels)))
    scores[:, 1] = 5.0
    summary = calibrate_manifest(manifest, taxonomy, rows, manifest, 0.5, folds=5,
                                 scores=scores)
    stored = Manifest.model_validate_json(manifest.read_text())
    assert stored.calibration is not None and stored.selective is not None
    t = stored.calibration.temperature
    assert summary["ece_after"] < summary["ece_before"]  # 60 % right at 0.95 confidence before
    spec = resolve(manifest, tmp_path / "cache", taxonomy.sha256)
    assert spec.temperature == pytest.approx(t) and spec.threshold == stored.selective.threshold
    engine = build_engine(spec, taxonomy, 2, WorkerSettings())
    try:
        outcome = engine.route("where is my card")
    finally:
        engine.close()
    assert stored.calibration.method == "temperature+beta" and stored.calibration.beta
    assert spec.beta == pytest.approx(tuple(stored.calibration.beta))
    from worker.engine import beta_map

    expected = float(beta_map(softmax(scores[:1], t).max(), spec.beta))
    assert outcome.label == labels[1]
    assert outcome.confidence == pytest.approx(expected, abs=1e-4)
    assert outcome.confidence == pytest.approx(0.6, abs=0.05)  # what 60 % right should say
    route, fallback = taxonomy.route_for(outcome.label, outcome.confidence, spec.threshold)
    assert (route, fallback) == (taxonomy.routes[labels[1]], False)
    assert json.loads(manifest.read_text())["selective"]["precision_target"] == 0.5
