"""``thinfleet calibrate``: fit a head router's temperature and precision-targeted threshold on
labelled rows it was not trained on, and record both in its manifest.

The rows go through the worker's own engine (same prompt, same llama.cpp path) with the head's
raw scores kept. Then (``training.calibrate``):

1. the **final** temperature is fitted by NLL on all rows, then the beta map of the top
   label's temperature-scaled probability on the same rows (``fit_beta``), and the **final**
   threshold is the lowest calibrated confidence that reaches the precision target on those
   rows: the three go into the manifest and the worker serves them;
2. the **reported** figures (ECE after, coverage and precision at the target) are out-of-fold:
   K stratified folds, each measured with a temperature and threshold fitted on the other K-1,
   so no figure in the manifest was measured on a row that fitted it.

The manifest's file sha256 changes (it is a new manifest); its model files do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Calibration, Manifest, SelectiveRouting
from models.taxonomy import Taxonomy
from training.calibrate import (
    calibrated_confidence,
    cross_fit,
    expected_calibration_error,
    fit_beta,
    fit_temperature,
    softmax,
    threshold_for_precision,
)
from worker.acquire import sha256_file


def open_head_engine(manifest_path: Path, taxonomy: Taxonomy, threads: int | None = None
                     ) -> Any:
    """A ``worker.engine.RoutingEngine`` serving the head router of ``manifest_path`` as the
    worker does (its files staged and verified, calibration ignored: temperature 1); the caller
    closes it. Raises ``ValueError`` for a manifest without a head, ``ModelUnavailable`` when
    the model does not load."""
    from thinfleet.devstack import stage_model_dir
    from worker.cpus import plan_threads
    from worker.engine import LabelHead, RoutingEngine

    manifest = Manifest.model_validate_json(manifest_path.read_text())
    if manifest.head is None or manifest.decoder != "head":
        raise ValueError(f"{manifest_path} has no label head")
    staged = stage_model_dir(manifest_path).parent
    return RoutingEngine(
        staged / manifest.base_model.path, taxonomy,
        n_threads=threads or plan_threads(1).threads,
        max_ticket_tokens=manifest.max_ticket_tokens,
        adapter_path=staged / manifest.adapter.path if manifest.adapter else None,
        head=LabelHead.load(staged / manifest.head.path), prompt_style=manifest.prompt_style)


def head_scores(manifest_path: Path, taxonomy: Taxonomy, texts: list[str],
                threads: int | None = None) -> np.ndarray:
    """The label head's raw scores ``[n, n_labels]`` for ``texts``, through the worker's engine
    (calibration ignored: temperature 1). Raises ``ValueError`` for a manifest without a head."""
    from training.evaluate import predict_engine

    engine = open_head_engine(manifest_path, taxonomy, threads)
    try:
        return np.stack(predict_engine(engine, texts).scores)
    finally:
        engine.close()


def calibrate_manifest(manifest_path: Path, taxonomy: Taxonomy, rows: list[tuple[str, str]],
                       data_path: Path, precision_target: float, folds: int = 5,
                       seed: int = 13, out: Path | None = None,
                       scores: np.ndarray | None = None, beta: bool = True) -> dict[str, Any]:
    """Fit and record calibration and selective routing (see the module's doc); writes the
    manifest to ``out`` (default: in place) and returns a summary. ``scores`` skips the engine
    (tests). Raises ``ValueError`` for a manifest without a head, ``KeyError`` for a gold
    label outside the taxonomy."""
    if not 0 < precision_target < 1:
        raise ValueError(f"the precision target must be in (0, 1), got {precision_target}")
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    index = {label: i for i, label in enumerate(taxonomy.label_names)}
    gold = np.array([index[label] for _, label in rows])
    if scores is None:
        scores = head_scores(manifest_path, taxonomy, [text for text, _ in rows])
    correct = scores.argmax(axis=1) == gold
    temperature = fit_temperature(scores, gold)
    beta_map = fit_beta(softmax(scores, temperature).max(axis=1), correct) if beta else None
    calibrated = calibrated_confidence(scores, temperature, beta_map)
    threshold = threshold_for_precision(correct, calibrated, precision_target)
    fit = cross_fit(scores, gold, precision_target, folds, seed, beta=beta)
    source = (f"{data_path.name} (sha256 {sha256_file(data_path)[:16]}), {len(rows)} rows "
              "the model was not trained on")
    manifest.calibration = Calibration(
        method="temperature+beta" if beta_map else "temperature",
        temperature=temperature, beta=list(beta_map) if beta_map else None,
        fitted_on=source, rows=len(rows),
        scheme=(f"temperature fitted by NLL on all {len(rows)} rows"
                + (", then the top label's beta map on the same rows" if beta_map else "")
                + f"; ece_after is out-of-fold ({folds} stratified folds, seed {seed}: fitted "
                f"on {folds - 1}, measured on the fifth)"),
        ece_before=expected_calibration_error(correct, softmax(scores, 1.0).max(axis=1)),
        ece_after=expected_calibration_error(correct, fit.confidence))
    manifest.selective = SelectiveRouting(
        precision_target=precision_target, threshold=threshold,
        coverage=float(fit.routed.mean()),
        precision=float(correct[fit.routed].mean()) if fit.routed.any() else None)
    target = out or manifest_path
    target.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return {"manifest": str(target), "accuracy": float(correct.mean()),
            **manifest.calibration.model_dump(), **manifest.selective.model_dump(),
            "fold_temperatures": fit.temperatures, "fold_thresholds": fit.thresholds,
            "fold_betas": fit.betas}
