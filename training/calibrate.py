"""Calibration and selective routing: confidence that means what it says, and a threshold that
meets a stated precision.

* **Temperature scaling** (Guo et al. 2017, "On Calibration of Modern Neural Networks",
  arXiv:1706.04599): one scalar ``T`` divides the label head's scores before the softmax,
  fitted by minimising the negative log-likelihood on rows that neither trained the model nor
  score it. The argmax, and so accuracy, cannot change.
* **Beta calibration** of the top label's confidence (Kull, Silva Filho and Flach 2017, "Beyond
  sigmoids: How to obtain well-calibrated probabilities from binary classifiers with beta
  calibration", Electron. J. Statist. 11(2)), after the temperature: a 3-parameter map
  ``σ(c + a·ln p − b·ln(1 − p))`` fitted by logistic regression of "the label was right" on
  ``ln p`` and ``−ln(1 − p)``. With ``a, b >= 0`` (the paper's procedure refits without a feature
  whose coefficient comes out negative) it is increasing, so it changes no ranking: accuracy,
  AURC and the set of tickets above a threshold stay; only what the confidence says changes.
  It calibrates exactly what the worker routes on (the top label's confidence), where one
  temperature must fit all 77 labels' probabilities at once.
* **Risk–coverage** (Geifman & El-Yaniv 2017, "Selective Classification for Deep Neural
  Networks", arXiv:1705.08500): sort tickets by confidence; coverage is the share auto-routed
  above a threshold, risk the error rate among them. AURC is the mean risk over every coverage
  ``k/n``.
* **Precision-targeted threshold**: the lowest confidence threshold whose auto-routed tickets
  reach the target precision on calibration rows (most coverage for the precision).
* **Cross-fitting**: with one labelled held-out set, every figure reported "on rows not used to
  fit it" comes from K stratified folds: fit ``T`` and the threshold on K-1 folds, measure on
  the remaining one, pool the K measured folds.

Pure NumPy/SciPy; no model here. Shapes: ``scores`` ``[n, k]`` float, ``gold`` ``[n]`` int.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(scores: Floats, temperature: float = 1.0) -> Floats:
    """Row-wise softmax of ``scores / temperature``; ``[n, k]`` -> ``[n, k]``."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(scores: Floats, gold: npt.NDArray[np.int64], temperature: float) -> float:
    """Mean negative log-likelihood of ``gold`` under ``softmax(scores / T)``."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(gold)), gold]))


def fit_temperature(scores: Floats, gold: npt.NDArray[np.int64]) -> float:
    """The ``T`` in ``TEMPERATURE_BOUNDS`` minimising ``nll`` (bounded scalar search on log T).

    Raises ``ValueError`` for empty input.
    """
    from scipy.optimize import minimize_scalar

    if len(gold) == 0:
        raise ValueError("cannot fit a temperature on no rows")
    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    found = minimize_scalar(lambda log_t: nll(scores, gold, float(np.exp(log_t))),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def expected_calibration_error(correct: npt.NDArray[np.bool_], confidence: Floats,
                               bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): support-weighted mean |accuracy - confidence| over ``bins``
    equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_beta(confidence: Floats, correct: npt.NDArray[np.bool_]) -> tuple[float, float, float]:
    """Beta calibration ``(a, b, c)`` of top-label ``confidence`` ``[n]`` against ``correct``
    ``[n]`` (module doc), by maximum likelihood (scikit-learn's logistic regression, no
    penalty). A feature whose coefficient comes out negative is dropped and the rest refitted
    (Kull et al. 2017, §3.3). Raises ``ValueError`` unless both outcomes occur."""
    from sklearn.linear_model import LogisticRegression

    from worker.engine import BETA_EPS

    if correct.all() or not correct.any():
        raise ValueError("beta calibration needs both right and wrong labels to fit on")
    p = np.clip(np.asarray(confidence, dtype=np.float64), BETA_EPS, 1 - BETA_EPS)
    features = np.c_[np.log(p), -np.log1p(-p)]
    keep = [0, 1]
    while True:
        fit = LogisticRegression(C=np.inf, max_iter=1000).fit(features[:, keep], correct)
        coef = dict(zip(keep, fit.coef_[0], strict=True))
        negative = [k for k in keep if coef[k] < 0]
        if not negative or len(keep) == 1:
            break
        keep = [k for k in keep if k != min(negative, key=lambda k: coef[k])]
    return (max(0.0, float(coef.get(0, 0.0))), max(0.0, float(coef.get(1, 0.0))),
            float(fit.intercept_[0]))


def calibrated_confidence(scores: Floats, temperature: float,
                          beta: tuple[float, float, float] | None) -> Floats:
    """The worker's confidence for raw head ``scores`` ``[n, k]``: the top temperature-scaled
    probability, through ``worker.engine.beta_map`` when ``beta`` is given; ``[n]``."""
    from worker.engine import beta_map

    top = softmax(scores, temperature).max(axis=1)
    return beta_map(top, beta) if beta is not None else top


@dataclass(frozen=True)
class RiskCoverage:
    """The risk–coverage curve of one system: ``coverage[i]``, ``risk[i]`` and the threshold
    ``thresholds[i]`` that auto-routes exactly the ``i+1`` most confident tickets (ties kept
    together), AURC, and coverage at precision 95/98/99 %."""

    coverage: Floats
    risk: Floats
    thresholds: Floats
    aurc: float
    coverage_at: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the curve itself is only plotted)."""
        return {"aurc": self.aurc, "coverage_at_precision": self.coverage_at}


PRECISION_TARGETS = (0.95, 0.98, 0.99)
#: How far below the chosen tie group's confidence the threshold is put (float32 rounding).
THRESHOLD_SLACK = 1e-6


def risk_coverage(correct: npt.NDArray[np.bool_], confidence: Floats) -> RiskCoverage:
    """Risk–coverage of ``correct`` (bool ``[n]``) ranked by ``confidence`` (``[n]``).

    A threshold auto-routes every ticket at or above it, so tickets of equal confidence are
    covered together: the curve has one point per distinct confidence.
    """
    order = np.argsort(-confidence, kind="stable")
    conf, ok = confidence[order], correct[order].astype(np.float64)
    n = len(conf)
    errors = np.cumsum(1.0 - ok)
    ends = np.r_[np.nonzero(np.diff(conf))[0], n - 1]  # last index of each tie group
    coverage = (ends + 1) / n
    risk = errors[ends] / (ends + 1)
    aurc = float(np.mean(errors / np.arange(1, n + 1)))
    coverage_at = {}
    for target in PRECISION_TARGETS:
        meets = np.nonzero(1.0 - risk >= target)[0]
        coverage_at[f"{target:.2f}"] = float(coverage[meets].max()) if meets.size else 0.0
    return RiskCoverage(coverage, risk, conf[ends], aurc, coverage_at)


def threshold_for_precision(correct: npt.NDArray[np.bool_], confidence: Floats,
                            target: float) -> float:
    """The lowest confidence threshold whose auto-routed tickets have precision >= ``target``
    (so the most coverage for it). Returns a value above every confidence (route nothing
    automatically) when no threshold reaches the target."""
    curve = risk_coverage(correct, confidence)
    meets = np.nonzero(1.0 - curve.risk >= target)[0]
    if not meets.size:
        return float(np.nextafter(confidence.max(), np.inf))
    # THRESHOLD_SLACK below the tie group's confidence: the worker computes confidences in
    # float32, and a ticket scored exactly like a calibration row must land on the same side.
    return float(curve.thresholds[meets[np.argmax(curve.coverage[meets])]]) - THRESHOLD_SLACK


def stratified_folds(gold: npt.NDArray[np.int64], folds: int, seed: int) -> npt.NDArray[np.int64]:
    """A fold index in ``[0, folds)`` per row, each label spread evenly over the folds."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(gold), dtype=np.int64)
    counts = np.bincount(gold)
    # StratifiedKFold needs every class in every fold only for a warning; singletons are fine.
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = gold if counts.min() >= folds else np.zeros_like(gold)
    for index, (_, test) in enumerate(splitter.split(np.zeros(len(gold)), labels)):
        out[test] = index
    return out


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold figures: each row's calibrated confidence and auto-route decision came from
    a calibration (temperature, and beta map with ``beta``) and threshold fitted without it."""

    confidence: Floats
    routed: npt.NDArray[np.bool_]
    temperatures: list[float]
    thresholds: list[float]
    betas: list[tuple[float, float, float]]


def cross_fit(scores: Floats, gold: npt.NDArray[np.int64], target: float, folds: int = 5,
              seed: int = 13, beta: bool = True) -> CrossFit:
    """Fit ``T`` (then, with ``beta``, the beta map) and the ``target`` threshold on K-1 folds,
    apply them to the held-out fold."""
    fold = stratified_folds(gold, folds, seed)
    predicted = np.asarray(scores).argmax(axis=1)
    correct = predicted == gold
    confidence = np.zeros(len(gold))
    routed = np.zeros(len(gold), dtype=bool)
    temperatures, thresholds, betas = [], [], []
    for k in range(folds):
        fit, held = fold != k, fold == k
        t = fit_temperature(scores[fit], gold[fit])
        b = fit_beta(softmax(scores[fit], t).max(axis=1), correct[fit]) if beta else None
        fit_conf = calibrated_confidence(scores[fit], t, b)
        threshold = threshold_for_precision(correct[fit], fit_conf, target)
        confidence[held] = calibrated_confidence(scores[held], t, b)
        routed[held] = confidence[held] >= threshold
        temperatures.append(t)
        thresholds.append(threshold)
        if b is not None:
            betas.append(b)
    return CrossFit(confidence, routed, temperatures, thresholds, betas)
