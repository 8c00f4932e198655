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
* **A router without scores** (the label trie, whose confidence is the probability of the one
  path it walked): no temperature can be fitted, since that needs every label's score; the beta
  map needs only the confidence and whether the label was right, so it is fitted alone
  (``cross_fit_confidence``), with the same threshold rule and cross-fitting.

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


def fit_head_calibration(scores: Floats, gold: npt.NDArray[np.int64], beta: bool = True
                         ) -> tuple[float, tuple[float, float, float] | None]:
    """A label head's calibration on raw ``scores`` ``[n, k]``: the temperature by NLL, then
    (with ``beta``) the beta map of the top temperature-scaled probability. Returns
    ``(T, beta map or None)``; raises ``ValueError`` as ``fit_beta`` does."""
    t = fit_temperature(scores, gold)
    if not beta:
        return t, None
    correct = np.asarray(scores).argmax(axis=1) == gold
    return t, fit_beta(softmax(scores, t).max(axis=1), correct)


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


#: resamples and level of ``coverage_intervals``' percentile bootstrap
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def coverage_intervals(correct: npt.NDArray[np.bool_], confidence: Floats, seed: int = 13,
                       level: float = BOOTSTRAP_LEVEL, n_resamples: int = BOOTSTRAP_RESAMPLES
                       ) -> dict[str, tuple[float, float]] | None:
    """Percentile-bootstrap intervals (Efron & Tibshirani 1993, "An Introduction to the
    Bootstrap", ch. 13) of ``risk_coverage``'s coverage at 95/98/99 % precision: the tickets
    ``(correct, confidence)`` (``[n]`` each) are resampled in pairs with replacement
    ``n_resamples`` times (``scipy.stats.bootstrap``), and each interval is the central
    ``level`` of the resampled coverages, keyed as ``RiskCoverage.coverage_at``. They measure
    how much the figure moves with the rows that score it, not the noise of refitting a
    calibration or of retraining; on 1,001 rows the 99 % point rests on the few confident
    errors, and its interval is tens of points wide. ``None`` for fewer than two tickets."""
    from scipy.stats import bootstrap

    if len(correct) < 2:
        return None

    def coverages(ok: npt.NDArray[np.bool_], conf: Floats) -> Floats:
        at = risk_coverage(ok.astype(bool), conf).coverage_at
        return np.array([at[f"{target:.2f}"] for target in PRECISION_TARGETS])

    result = bootstrap((np.asarray(correct), np.asarray(confidence, dtype=np.float64)),
                       coverages, paired=True, vectorized=False, n_resamples=n_resamples,
                       confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {f"{target:.2f}": (float(lo), float(hi))
            for target, lo, hi in zip(PRECISION_TARGETS, low, high, strict=True)}


def threshold_for_precision(correct: npt.NDArray[np.bool_], confidence: Floats,
                            target: float, delta: float | None = None) -> float:
    """The lowest confidence threshold whose auto-routed tickets have precision >= ``target``
    (so the most coverage for it). Returns a value above every confidence (route nothing
    automatically) when no threshold reaches the target.

    With ``delta``, the precision is guaranteed rather than estimated
    (``guaranteed_threshold``): with probability >= 1 - ``delta`` over the calibration rows,
    the chosen threshold's precision on new tickets from the same distribution is >= ``target``.
    """
    if delta is not None:
        return guaranteed_threshold(correct, confidence, target, delta)
    curve = risk_coverage(correct, confidence)
    meets = np.nonzero(1.0 - curve.risk >= target)[0]
    if not meets.size:
        return _above_all(confidence)
    # THRESHOLD_SLACK below the tie group's confidence: the worker computes confidences in
    # float32, and a ticket scored exactly like a calibration row must land on the same side.
    return float(curve.thresholds[meets[np.argmax(curve.coverage[meets])]]) - THRESHOLD_SLACK


def _above_all(confidence: Floats) -> float:
    """A threshold above every confidence: nothing is auto-routed."""
    return float(np.nextafter(np.max(confidence), np.inf)) if len(confidence) else 1.0


def risk_upper_bound(errors: int, covered: int, delta: float) -> float:
    """The exact one-sided (Clopper-Pearson) upper confidence bound, at level 1 - ``delta``, of
    an error rate observed as ``errors`` of ``covered`` independent tickets: the ``b`` with
    ``P(Binomial(covered, b) <= errors) = delta`` (Geifman & El-Yaniv 2017's ``B*``). 1.0 when
    nothing is covered."""
    from scipy.stats import beta

    if covered <= 0:
        return 1.0
    if errors >= covered:
        return 1.0
    return float(beta.ppf(1.0 - delta, errors + 1, covered - errors))


def guaranteed_threshold(correct: npt.NDArray[np.bool_], confidence: Floats, target: float,
                         delta: float) -> float:
    """Selection with guaranteed risk (SGR; Geifman & El-Yaniv 2017, "Selective Classification
    for Deep Neural Networks", arXiv:1705.08500, Algorithm 1): a binary search over the
    calibration rows' confidences, at most ``k = ceil(log2(n + 1))`` tests. Each tested
    threshold's auto-routed rows get the exact upper bound of their error rate at level
    ``delta / k`` (``risk_upper_bound``; a union bound over the ``k`` tests), and the search
    moves to more coverage where that bound is within ``1 - target``, to less where it is not.

    Returns the lowest tested threshold whose bound met it (minus ``THRESHOLD_SLACK``), or one
    above every confidence when none did. With probability >= 1 - ``delta`` over the
    calibration rows (drawn independently from the tickets to come), the auto-routed tickets'
    precision is then >= ``target``. Raises ``ValueError`` for ``delta`` or ``target`` outside
    (0, 1)."""
    if not (0 < delta < 1 and 0 < target < 1):
        raise ValueError(f"delta and target must be in (0, 1), got {delta}, {target}")
    n = len(confidence)
    if n == 0:
        return 1.0
    ranked = np.argsort(np.asarray(confidence, dtype=np.float64), kind="stable")
    order = np.asarray(confidence, dtype=np.float64)[ranked]  # ascending
    wrong = ~np.asarray(correct, dtype=bool)[ranked]
    steps = int(np.ceil(np.log2(n + 1)))  # the most thresholds the search can test
    low, high, best = 0, n - 1, None  # the threshold order[z] auto-routes the rows >= it
    while low <= high:
        z = (low + high) // 2
        covered = order >= order[z]
        if risk_upper_bound(int(wrong[covered].sum()), int(covered.sum()),
                            delta / steps) <= 1.0 - target:
            best, high = float(order[z]), z - 1  # met: try more coverage
        else:
            low = z + 1  # not met: less coverage
    if best is None:
        return _above_all(order)
    return best - THRESHOLD_SLACK


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
              seed: int = 13, beta: bool = True, delta: float | None = None) -> CrossFit:
    """Fit ``T`` (then, with ``beta``, the beta map) and the ``target`` threshold (guaranteed
    at ``delta`` when given: ``threshold_for_precision``) on K-1 folds, apply them to the
    held-out fold. ``scores``: a label head's raw scores ``[n, k]``."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = scores.argmax(axis=1) == gold
    temperatures: list[float] = []

    def fit(rows: npt.NDArray[np.bool_]) -> tuple[Any, tuple[float, float, float] | None]:
        t, b = fit_head_calibration(scores[rows], gold[rows], beta)
        temperatures.append(t)
        return (lambda held: calibrated_confidence(scores[held], t, b)), b

    return _cross_fit(fit, correct, gold, target, folds, seed, temperatures, delta)


def cross_fit_confidence(confidence: Floats, correct: npt.NDArray[np.bool_],
                         gold: npt.NDArray[np.int64], target: float, folds: int = 5,
                         seed: int = 13, delta: float | None = None) -> CrossFit:
    """The same cross-fitting for a router that gives only its top label's ``confidence``
    ``[n]`` (the label trie: its path probability, ``worker.trie``): the beta map alone (no
    temperature: that needs every label's score) and the threshold fitted on K-1 folds,
    applied to the held-out one. ``gold`` ``[n]`` only stratifies the folds. Raises
    ``ValueError`` when a fold's fitting rows are all right or all wrong (``fit_beta``)."""
    from worker.engine import beta_map

    confidence = np.asarray(confidence, dtype=np.float64)

    def fit(rows: npt.NDArray[np.bool_]) -> tuple[Any, tuple[float, float, float] | None]:
        b = fit_beta(confidence[rows], correct[rows])
        return (lambda held: beta_map(confidence[held], b)), b

    return _cross_fit(fit, correct, gold, target, folds, seed, [], delta)


def _cross_fit(fit: Any, correct: npt.NDArray[np.bool_], gold: npt.NDArray[np.int64],
               target: float, folds: int, seed: int, temperatures: list[float],
               delta: float | None = None) -> CrossFit:
    """The fold loop of ``cross_fit`` and ``cross_fit_confidence``: ``fit(rows)`` returns the
    calibrated confidence of a row mask under a calibration fitted on ``rows``, and its beta
    map (or None)."""
    fold = stratified_folds(gold, folds, seed)
    confidence = np.zeros(len(gold))
    routed = np.zeros(len(gold), dtype=bool)
    thresholds, betas = [], []
    for k in range(folds):
        fitting, held = fold != k, fold == k
        calibrate, b = fit(fitting)
        threshold = threshold_for_precision(correct[fitting], calibrate(fitting), target,
                                            delta)
        confidence[held] = calibrate(held)
        routed[held] = confidence[held] >= threshold
        thresholds.append(threshold)
        if b is not None:
            betas.append(b)
    return CrossFit(confidence, routed, temperatures, thresholds, betas)
