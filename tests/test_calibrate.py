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
    coverage_intervals,
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


def test_coverage_intervals_hold_the_point_and_narrow_with_more_rows() -> None:
    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        scores, gold = synthetic(n=n, true_t=0.3, seed=7)
        return scores.argmax(1) == gold, softmax(scores, 0.3).max(1)

    small, large = rows(500), rows(5000)
    narrow = coverage_intervals(*large)
    wide = coverage_intervals(*small)
    assert narrow is not None and wide is not None
    for target in ("0.95", "0.98", "0.99"):
        point = risk_coverage(*large).coverage_at[target]
        low, high = narrow[target]
        assert 0.0 <= low <= point <= high <= 1.0
        assert high - low < wide[target][1] - wide[target][0]
    # the same rows and seed give the same interval; a lone ticket has none
    assert coverage_intervals(*small) == wide
    assert coverage_intervals(np.array([True]), np.array([0.9])) is None


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


def test_a_trie_confidence_is_cross_fitted_by_the_beta_map_alone() -> None:
    """A router that gives only its top label's confidence (the trie): the beta map and the
    threshold are fitted on 4 folds and measured on the fifth, never on their own rows."""
    from training.calibrate import cross_fit_confidence
    from worker.engine import beta_map

    rng = np.random.default_rng(2)
    confidence = rng.beta(4, 1.5, 2000)  # over-confident: right far less often than it says
    correct = rng.random(confidence.size) < beta_map(confidence, (1.5, 0.3, -1.0))
    gold = rng.integers(0, 7, confidence.size)
    fit = cross_fit_confidence(confidence, correct, gold, 0.5, folds=5)
    assert fit.temperatures == [] and len(fit.betas) == len(fit.thresholds) == 5
    before = expected_calibration_error(correct, confidence)
    assert expected_calibration_error(correct, fit.confidence) < 0.03 < before
    assert 0 < fit.routed.mean() < 0.5 and correct[fit.routed].mean() > 0.45


def test_a_manifest_calibration_must_fit_its_decoder(tmp_path: Path, model_file: Path) -> None:
    from pydantic import ValidationError

    from tests.test_manifest import make_model_dir

    data = json.loads(make_model_dir(tmp_path, model_file).read_text())
    calibration = {"method": "beta", "temperature": 1.0, "beta": [1.0, 0.5, 0.0],
                   "fitted_on": "x", "rows": 10, "scheme": "x", "ece_before": 0.1,
                   "ece_after": 0.01}
    with pytest.raises(ValidationError, match="temperature"):  # a head needs its temperature
        Manifest.model_validate({**data, "calibration": calibration})
    trie = {**data, "decoder": "trie", "head": None}
    assert Manifest.model_validate({**trie, "calibration": calibration}).calibration
    for wrong in ({"method": "temperature", "beta": None, "temperature": 0.7},
                  {"method": "beta", "temperature": 0.7}, {"method": "beta", "beta": None}):
        with pytest.raises(ValidationError):
            Manifest.model_validate({**trie, "calibration": {**calibration, **wrong}})


def test_calibrate_a_bare_models_trie_and_the_worker_serves_it(tmp_path: Path,
                                                               model_file: Path) -> None:
    """The base model's label trie, on the real model: a manifest for the bare GGUF, its beta
    map fitted on routed rows, resolved as a worker does; the engine keeps the label and maps
    the trie's path probability, and the threshold decides the route."""
    from tests.test_manifest import resolve
    from training.calibrate_model import base_manifest, calibrate_manifest, trie_confidences
    from worker.engine import beta_map
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    taxonomy = load_taxonomy("banking77")
    manifest = base_manifest(model_file, taxonomy, tmp_path / "base", 64)
    assert not (tmp_path / "base" / model_file.name).exists()  # the packaged base: by sha256
    texts = ["Where is my new card?", "I was charged twice for one coffee",
             "How do I top up by bank transfer?", "My transfer has not arrived yet",
             "Can I change my PIN at an ATM?", "Why was my card declined abroad?"] * 5
    labels, path = trie_confidences(manifest, taxonomy, texts)
    assert len(labels) == 30 and ((path > 0) & (path <= 1)).all()
    names = taxonomy.label_names
    # gold: the model's own label for two rows in three, another label for the third
    rows = [(t, label if i % 3 else names[(names.index(label) + 1) % len(names)])
            for i, (t, label) in enumerate(zip(texts, labels, strict=True))]
    summary = calibrate_manifest(manifest, taxonomy, rows, manifest, 0.6, folds=3,
                                 trie=(labels, path))
    stored = Manifest.model_validate_json(manifest.read_text())
    assert stored.decoder == "trie" and stored.calibration and stored.selective
    assert stored.calibration.method == "beta" and stored.calibration.temperature == 1.0
    assert summary["accuracy"] == pytest.approx(20 / 30)
    from thinfleet.devstack import stage_model_dir

    staged = stage_model_dir(manifest, tmp_path / "staged")  # the base linked in, as served
    spec = resolve(staged, tmp_path / "cache", taxonomy.sha256)
    assert spec.decoder == "trie" and spec.beta == pytest.approx(tuple(stored.calibration.beta))
    engine = build_engine(spec, taxonomy, 2, WorkerSettings())
    try:
        outcome = engine.route(texts[0])
    finally:
        engine.close()
    assert outcome.label == labels[0] and outcome.path_confidence == pytest.approx(path[0])
    assert outcome.confidence == pytest.approx(float(beta_map(path[0], spec.beta)))
    _, fallback = taxonomy.route_for(outcome.label, outcome.confidence, spec.threshold)
    assert fallback == (outcome.confidence < stored.selective.threshold)
    with pytest.raises(ValueError, match="beta map"):
        calibrate_manifest(manifest, taxonomy, rows, manifest, 0.6, beta=False,
                           trie=(labels, path))


def test_a_guaranteed_threshold_keeps_its_precision_on_new_tickets() -> None:
    """Selection with guaranteed risk (Geifman & El-Yaniv 2017): fitted on 1,000 rows of a
    calibrated router and measured on 20,000 new ones, the point estimate falls below its
    precision target about half the time; the guaranteed threshold (delta 0.05) at most
    delta of the time, for less coverage."""
    from training.calibrate import guaranteed_threshold, risk_upper_bound

    assert risk_upper_bound(0, 149, 0.05) == pytest.approx(0.0199, abs=1e-4)  # rule of three
    assert risk_upper_bound(3, 3, 0.05) == risk_upper_bound(0, 0, 0.05) == 1.0
    rng = np.random.default_rng(3)
    below = {"estimate": 0, "guaranteed": 0}
    coverage = {"estimate": 0.0, "guaranteed": 0.0}
    for _ in range(60):
        fit_conf, new_conf = rng.beta(8, 1, 1000), rng.beta(8, 1, 20000)
        fit_ok, new_ok = rng.random(1000) < fit_conf, rng.random(20000) < new_conf
        for name, threshold in (("estimate", threshold_for_precision(fit_ok, fit_conf, 0.95)),
                                ("guaranteed", guaranteed_threshold(fit_ok, fit_conf, 0.95,
                                                                    0.05))):
            routed = new_conf >= threshold
            below[name] += new_ok[routed].mean() < 0.95
            coverage[name] += routed.mean() / 60
    assert below["estimate"] >= 15 and below["guaranteed"] <= 6  # about 30 of 60; <= 3 expected
    assert 0.1 < coverage["guaranteed"] < coverage["estimate"]
    # a router that cannot reach the target routes nothing; the same threshold rule applies
    assert guaranteed_threshold(np.zeros(50, bool), np.linspace(0.1, 0.9, 50), 0.9, 0.05) > 0.9
    with pytest.raises(ValueError, match="delta"):
        threshold_for_precision(fit_ok, fit_conf, 0.95, delta=1.5)


def test_calibrate_records_a_guaranteed_threshold(tmp_path: Path, model_file: Path) -> None:
    from tests.test_manifest import make_model_dir
    from training.calibrate_model import calibrate_manifest

    taxonomy = load_taxonomy("banking77")
    manifest = make_model_dir(tmp_path, model_file)
    rng = np.random.default_rng(4)
    scores = rng.normal(0, 1, (600, len(taxonomy.labels)))
    gold = np.where(rng.random(600) < 0.9, scores.argmax(1), rng.integers(0, 77, 600))
    rows = [(f"ticket {i}", taxonomy.label_names[g]) for i, g in enumerate(gold)]
    point = calibrate_manifest(manifest, taxonomy, rows, manifest, 0.95, scores=scores,
                               out=tmp_path / "point.json")
    sure = calibrate_manifest(manifest, taxonomy, rows, manifest, 0.95, scores=scores,
                              out=tmp_path / "sure.json", delta=0.05)
    stored = Manifest.model_validate_json((tmp_path / "sure.json").read_text()).selective
    assert stored is not None and stored.delta == 0.05 and sure["delta"] == 0.05
    assert point["delta"] is None and sure["threshold"] > point["threshold"]
    assert sure["coverage"] < point["coverage"]


def test_eval_reports_the_coverage_a_guarantee_leaves() -> None:
    from training.evaluate import GUARANTEE_DELTA, Predictions, calibration_figures

    taxonomy = load_taxonomy("banking77")
    scores, gold = synthetic(n=1000, k=len(taxonomy.labels), true_t=0.3, seed=5)
    names = taxonomy.label_names
    predictions = Predictions([names[i] for i in scores.argmax(1)], [0.0] * 1000, [],
                              scores=list(scores))
    figures = calibration_figures([names[g] for g in gold], predictions, taxonomy, 0.95)
    oof = figures["out_of_fold"]
    sure = oof["guaranteed"]
    assert sure["delta"] == GUARANTEE_DELTA and set(sure["by_target"]) == {"0.95", "0.98", "0.99"}
    # the guarantee costs coverage: never more than the estimated threshold's at 95 %
    assert 0 <= sure["by_target"]["0.95"]["coverage"] <= oof["coverage"]
    assert sure["by_target"]["0.99"]["coverage"] <= sure["by_target"]["0.95"]["coverage"]
    # what a stated target gets on held-out folds: the precision target's own figures, and a
    # stricter target routes fewer tickets, never more than the estimate it guarantees
    estimated = oof["estimated"]["by_target"]
    assert set(estimated) == {"0.95", "0.98", "0.99"}
    assert estimated["0.95"] == {"coverage": oof["coverage"], "precision": oof["precision"]}
    assert estimated["0.99"]["coverage"] <= estimated["0.98"]["coverage"] <= oof["coverage"]
    for target, held in estimated.items():
        assert sure["by_target"][target]["coverage"] <= held["coverage"]
    # the coverage figures carry their bootstrap intervals into the report
    low, high = oof["coverage_at_precision_interval"]["0.99"]
    assert low <= oof["coverage_at_precision"]["0.99"] <= high
    from training.evaluate import _coverage_cell
    assert _coverage_cell(oof, "0.99").endswith(f"({low:.0%}–{high:.0%})")


def test_calibrate_refuses_a_missing_model_or_out_clearly(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from thinfleet.cli import main

    assert main(["calibrate", "--model", str(tmp_path / "none.gguf"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "no model file" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "none.gguf")]) == 2
    assert "--model needs --out" in capsys.readouterr().err
