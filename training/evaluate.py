"""``thinfleet eval``: a routing model against labelled tickets, beside a similarity baseline.

The model runs through the worker's own ``RoutingEngine`` (same prompt, same decoding). In the
same invocation, on the same rows, a **similarity-router baseline** is fitted and scored: TF-IDF
character n-grams (``char_wb``, 2-5) with a logistic-regression classifier (scikit-learn), the
"text similarity search" router the reference article's LLM replaced. Its training rows are the
given training file minus every row whose text appears in the evaluation rows.

Metrics (scikit-learn where it has them): accuracy, macro-F1, per-label precision/recall/F1
(worst first), the most frequent confusion pairs, valid-label rate, expected calibration error
(15 equal-width bins, Guo et al. 2017, arXiv:1706.04599), coverage and precision at the
threshold in force, the risk–coverage curve's AURC and coverage at 95/98/99 % precision
(Geifman & El-Yaniv 2017, ``training.calibrate``) with a 95 % percentile-bootstrap interval
over the rows (``training.calibrate.coverage_intervals``: on 1,001 rows the 99 % point moves
by tens of points), p50/p95 latency per ticket, and the model's
most confident errors (``confident_errors``): the tickets a precision target meets first.

When the rows carry gold extraction fields (``gold_fields``), the report also scores each of
the taxonomy's fields (``field_scores``): exact match and token-F1 after SQuAD's answer
normalisation (Rajpurkar et al. 2016, arXiv:1606.05250: lower case, no punctuation or
articles), ROUGE-L F-measure for generative fields (Lin 2004; Google's ``rouge-score``), the
share of predicted ``Unknown``, and, for extractive fields, the share of values found in the
ticket's text; beside a trivial baseline per field (``Unknown`` for extractive fields, the
ticket's first 8 words for generative ones).

The report also holds the model's uncalibrated figures (a head at temperature 1, a trie's own
path probability) and **out-of-fold** figures (``training.calibrate.cross_fit``: temperature,
beta map and threshold fitted on 4/5 of the rows, measured on the fifth; for a trie the beta
map alone, ``cross_fit_confidence``), which are the honest ones when the manifest's
calibration was fitted on these same rows. Two plots are written beside the report: a
reliability diagram and the risk–coverage curves (``reliability.png``, ``risk_coverage.png``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.taxonomy import Taxonomy
from training.calibrate import (
    ECE_BINS,
    PRECISION_TARGETS,
    CrossFit,
    coverage_intervals,
    cross_fit,
    cross_fit_confidence,
    expected_calibration_error,
    risk_coverage,
    softmax,
)

#: the risk level of the guaranteed thresholds the report shows (``thinfleet calibrate --delta``)
GUARANTEE_DELTA = 0.05

__all__ = ["ECE_BINS", "Predictions", "evaluate", "expected_calibration_error", "score"]


@dataclass
class Predictions:
    """Predicted labels and confidences for rows, with per-ticket latency in ms, and the label
    head's raw scores ``[n_labels]`` per row when the model has a head (else empty)."""

    labels: list[str]
    confidences: list[float]
    latencies_ms: list[float]
    scores: list[np.ndarray] = field(default_factory=list)
    #: the label trie's uncalibrated confidence per row when the model has no head (else empty)
    path_confidences: list[float] = field(default_factory=list)
    #: extracted fields per row (name -> value), when the taxonomy has fields
    fields: list[dict[str, str]] = field(default_factory=list)
    #: per row, the generative fields whose value was rejected for repeating the prompt
    rejected: list[list[str]] = field(default_factory=list)


def score(gold: list[str], predictions: Predictions, taxonomy: Taxonomy,
          threshold: float | None = None) -> dict[str, Any]:
    """All metrics of one system on one set of rows (see the module docstring)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    labels = taxonomy.label_names
    predicted = predictions.labels
    confidence = np.array(predictions.confidences, dtype=np.float64)
    correct = np.array([g == p for g, p in zip(gold, predicted, strict=True)])
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0)
    per_label = sorted(
        ({"label": label, "precision": float(p), "recall": float(r), "f1": float(f),
          "support": int(s)} for label, p, r, f, s in zip(labels, precision, recall, f1, support,
                                                           strict=True) if s),
        key=lambda row: (row["f1"], row["label"]))
    confusions = Counter((g, p) for g, p in zip(gold, predicted, strict=True) if g != p)
    threshold = taxonomy.confidence_threshold if threshold is None else threshold
    confident = confidence >= threshold
    latencies = np.array(predictions.latencies_ms or [0.0])
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=labels, average="macro",
                                   zero_division=0)),
        "valid_label_rate": float(np.mean([p in set(labels) for p in predicted])),
        "ece": expected_calibration_error(correct, confidence),
        "threshold": threshold,
        "coverage_at_threshold": float(confident.mean()),
        "precision_at_threshold": float(correct[confident].mean()) if confident.any() else None,
        **risk_coverage(correct, confidence).as_dict(),
        "coverage_at_precision_interval": coverage_intervals(correct, confidence),
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "per_label_worst_first": per_label,
        "confusion_pairs": [{"gold": g, "predicted": p, "count": c}
                            for (g, p), c in confusions.most_common(15)],
    }


def confident_errors(texts: list[str], gold: list[str], predictions: Predictions,
                     count: int = 15) -> list[dict[str, Any]]:
    """The ``count`` wrong labels with the highest confidence, highest first: ``text``,
    ``gold``, ``label``, ``confidence`` (the model's, as served). These set the coverage at a
    high precision target; reading them tells a wrong router from a wrong gold label, which
    public data sets have too (Banking77: Ying and Thomas 2022, "Label Errors in BANKING77",
    ACL Insights workshop, estimate that about 14 % of its training utterances may be
    mislabelled)."""
    wrong = [i for i, (g, p) in enumerate(zip(gold, predictions.labels, strict=True)) if g != p]
    wrong.sort(key=lambda i: -predictions.confidences[i])
    return [{"text": texts[i], "gold": gold[i], "label": predictions.labels[i],
             "confidence": float(predictions.confidences[i])} for i in wrong[:count]]


def predict_engine(engine: Any, texts: list[str], progress: bool = True) -> Predictions:
    """Route each text through a ``RoutingEngine``; one ticket at a time, as a worker does."""
    from tqdm import tqdm

    out = Predictions([], [], [])
    for text in tqdm(texts, desc="routing", unit="ticket", disable=not progress):
        started = time.perf_counter()
        outcome = engine.route(text)
        out.latencies_ms.append((time.perf_counter() - started) * 1000)
        out.labels.append(outcome.label)
        out.confidences.append(outcome.confidence)
        out.fields.append(dict(outcome.fields))
        out.rejected.append(list(outcome.rejected_fields))
        if outcome.scores is not None:
            out.scores.append(np.asarray(outcome.scores, dtype=np.float64))
        if outcome.path_confidence is not None:
            out.path_confidences.append(float(outcome.path_confidence))
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016): lower case, punctuation and the
    articles a/an/the removed, whitespace folded."""
    import re
    import string

    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(predicted: str, gold: str) -> float:
    """SQuAD's token-level F1 of two answers after ``normalize_answer``, in [0, 1]."""
    pred, ref = normalize_answer(predicted).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_words(text: str, n: int = 8) -> str:
    """The first ``n`` words of a ticket: the trivial summary baseline."""
    return " ".join(text.split()[:n])


def field_scores(texts: list[str], gold: list[dict[str, str]], predicted: list[dict[str, str]],
                 taxonomy: Taxonomy, rejected: list[list[str]] | None = None
                 ) -> dict[str, Any]:
    """Per extraction field of ``taxonomy``: ``{"model": {...}, "baseline": {...}}`` with
    ``exact_match``, ``token_f1`` (means over rows, SQuAD-normalised), ``rouge_l`` (generative
    fields), ``unknown_rate`` (share of ``Unknown`` values), ``gold_unknown_rate``, and for the
    model ``in_ticket_rate`` (extractive: values found in the ticket, ``Unknown`` counted in)
    and ``rejected_rate`` (generative: values rejected for repeating the prompt). Each
    ``baseline`` is ``Unknown`` (extractive) or the ticket's first 8 words (generative)."""
    from rouge_score import rouge_scorer

    from worker.prompt import UNKNOWN

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out: dict[str, Any] = {}
    for spec in taxonomy.fields:
        refs = [row.get(spec.name, UNKNOWN) for row in gold]
        systems = {"model": [row.get(spec.name, UNKNOWN) for row in predicted],
                   "baseline": [UNKNOWN if spec.extractive else first_words(t) for t in texts]}
        out[spec.name] = {"kind": "extractive" if spec.extractive else "generative"}
        for system, values in systems.items():
            figures: dict[str, Any] = {
                "exact_match": float(np.mean([normalize_answer(p) == normalize_answer(g)
                                              for p, g in zip(values, refs, strict=True)])),
                "token_f1": float(np.mean([token_f1(p, g) for p, g in zip(values, refs,
                                                                          strict=True)])),
                "unknown_rate": float(np.mean([v == UNKNOWN for v in values])),
            }
            if not spec.extractive:
                figures["rouge_l"] = float(np.mean([
                    rouge.score(g, p)["rougeL"].fmeasure for p, g in zip(values, refs,
                                                                         strict=True)]))
            out[spec.name][system] = figures
        model = out[spec.name]["model"]
        model["gold_unknown_rate"] = float(np.mean([g == UNKNOWN for g in refs]))
        if spec.extractive:
            model["in_ticket_rate"] = float(np.mean([
                v == UNKNOWN or v.lower() in " ".join(t.split()).lower()
                for v, t in zip(systems["model"], texts, strict=True)]))
        elif rejected is not None:
            model["rejected_rate"] = float(np.mean([spec.name in r for r in rejected]))
    return out


def calibration_figures(gold: list[str], predictions: Predictions, taxonomy: Taxonomy,
                        precision_target: float, folds: int = 5, seed: int = 13
                        ) -> dict[str, Any]:
    """Uncalibrated and out-of-fold calibrated figures: ECE, AURC, coverage at 95/98/99 %
    precision, and the coverage and precision of a threshold fitted for ``precision_target``
    on the other folds (and, under ``estimated``, for each of 95/98/99 %: what a user who
    states that target gets on tickets the threshold was not fitted on, where the pooled
    out-of-fold curve mixes five folds' calibrations near its top), and the out-of-fold
    coverage of thresholds that *guarantee* 95/98/99 % precision at risk ``GUARANTEE_DELTA``
    (``training.calibrate.guaranteed_threshold``). A
    head model's raw scores are calibrated as ``thinfleet calibrate``
    does (temperature, then beta map; uncalibrated means T = 1); a trie model's path
    confidence by the beta map alone (``cross_fit_confidence``). Raises ``ValueError`` when
    ``predictions`` carry neither."""
    index = {label: i for i, label in enumerate(taxonomy.label_names)}
    gold_idx = np.array([index[g] for g in gold])
    if predictions.scores:
        scores = np.stack(predictions.scores)
        correct = scores.argmax(axis=1) == gold_idx
        raw = softmax(scores, 1.0).max(axis=1)

        def fitted(target: float, delta: float | None = None) -> CrossFit:
            return cross_fit(scores, gold_idx, target, folds, seed, delta=delta)
    elif predictions.path_confidences:
        correct = np.array([g == p for g, p in zip(gold, predictions.labels, strict=True)])
        raw = np.array(predictions.path_confidences, dtype=np.float64)

        def fitted(target: float, delta: float | None = None) -> CrossFit:
            return cross_fit_confidence(raw, correct, gold_idx, target, folds, seed, delta)
    else:
        raise ValueError("no raw scores or path confidences to calibrate")
    fit = fitted(precision_target)
    routed = fit.routed

    def selected(mask: npt.NDArray[np.bool_]) -> dict[str, float | None]:
        return {"coverage": float(mask.mean()),
                "precision": float(correct[mask].mean()) if mask.any() else None}

    estimated, guaranteed = {}, {}
    for target in PRECISION_TARGETS:
        estimated[f"{target:.2f}"] = selected(
            routed if target == precision_target else fitted(target).routed)
        guaranteed[f"{target:.2f}"] = selected(fitted(target, GUARANTEE_DELTA).routed)
    return {
        "uncalibrated": {"ece": expected_calibration_error(correct, raw),
                         **risk_coverage(correct, raw).as_dict(),
                         "coverage_at_precision_interval": coverage_intervals(correct, raw)},
        "out_of_fold": {
            "method": "temperature+beta" if predictions.scores else "beta",
            "folds": folds, "temperatures": fit.temperatures, "thresholds": fit.thresholds,
            "betas": fit.betas,
            "ece": expected_calibration_error(correct, fit.confidence),
            **risk_coverage(correct, fit.confidence).as_dict(),
            "coverage_at_precision_interval": coverage_intervals(correct, fit.confidence),
            "precision_target": precision_target, **selected(routed),
            "estimated": {"by_target": estimated},
            "guaranteed": {"delta": GUARANTEE_DELTA, "by_target": guaranteed}},
        "_curves": {"correct": correct, "raw": raw, "calibrated": fit.confidence},
    }


def plot_calibration(out_dir: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Write ``reliability.png`` (accuracy against confidence, 15 bins) and
    ``risk_coverage.png`` for each named system's ``(correct, confidence)``; returns the file
    names. Uses matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, ECE_BINS + 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, (correct, confidence) in curves.items():
        xs, ys = [], []
        for low, high in itertools.pairwise(edges):
            in_bin = (confidence > low) & (confidence <= high)
            if in_bin.sum() >= 5:
                xs.append(confidence[in_bin].mean())
                ys.append(correct[in_bin].mean())
        ece = expected_calibration_error(correct, confidence)
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence (bin mean)", ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1),
           title="Reliability diagram (15 equal-width bins, >= 5 tickets)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (correct, confidence) in curves.items():
        curve = risk_coverage(correct, confidence)
        ax.plot(curve.coverage, curve.risk, label=f"{name} (AURC {curve.aurc:.4f})")
    for target in (0.95, 0.98, 0.99):
        ax.axhline(1 - target, color="grey", linestyle=":", linewidth=0.8)
        ax.text(0.01, 1 - target, f"{target:.0%} precision", fontsize=7, va="bottom")
    ax.set(xlabel="coverage (share of tickets auto-routed)", ylabel="risk (error rate among them)",
           xlim=(0, 1), ylim=(0, 0.12), title="Risk–coverage")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "risk_coverage.png", dpi=110)
    plt.close(fig)
    return ["reliability.png", "risk_coverage.png"]


def tfidf_pipeline(train_rows: list[tuple[str, str]]) -> Any:
    """The similarity-router baseline, fitted on ``train_rows``: character 2–5-gram TF-IDF
    (word-bounded, sublinear) and logistic regression (scikit-learn ``Pipeline``)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
        LogisticRegression(C=20.0, max_iter=2000))
    return pipeline.fit([t for t, _ in train_rows], [label for _, label in train_rows])


def predict_tfidf(train_rows: list[tuple[str, str]], texts: list[str]) -> Predictions:
    """Fit the TF-IDF + logistic-regression baseline on ``train_rows``; predict ``texts``."""
    pipeline = tfidf_pipeline(train_rows)
    out = Predictions([], [], [])
    for text in texts:
        started = time.perf_counter()
        proba = pipeline.predict_proba([text])[0]
        out.latencies_ms.append((time.perf_counter() - started) * 1000)
        best = int(np.argmax(proba))
        out.labels.append(str(pipeline.classes_[best]))
        out.confidences.append(float(proba[best]))
    return out


def baseline_rows(train_rows: list[tuple[str, str]], eval_rows: list[tuple[str, str]]
                  ) -> list[tuple[str, str]]:
    """``train_rows`` minus every row whose text is among ``eval_rows`` (no leakage)."""
    held_out = {text for text, _ in eval_rows}
    return [row for row in train_rows if row[0] not in held_out]


def _coverage_cell(figures: dict[str, Any], target: str) -> str:
    """``figures``' coverage at the ``target`` precision, with its bootstrap interval when the
    report has one (reports written before the intervals have none)."""
    cell = f"{figures['coverage_at_precision'][target]:.1%}"
    interval = (figures.get("coverage_at_precision_interval") or {}).get(target)
    return f"{cell} ({interval[0]:.0%}–{interval[1]:.0%})" if interval else cell


def markdown_report(report: dict[str, Any]) -> str:
    """A human-readable report: the two systems side by side, calibration, then the details."""
    model, base = report["model"], report["baseline"]
    rows = [("accuracy", "accuracy", "{:.1%}"), ("macro-F1", "macro_f1", "{:.3f}"),
            ("valid labels", "valid_label_rate", "{:.1%}"), ("ECE", "ece", "{:.3f}"),
            ("AURC", "aurc", "{:.4f}"),
            ("coverage at threshold", "coverage_at_threshold", "{:.1%}"),
            ("precision at threshold", "precision_at_threshold", "{:.1%}"),
            ("latency p50 (ms)", "latency_ms_p50", "{:.1f}"),
            ("latency p95 (ms)", "latency_ms_p95", "{:.1f}")]
    lines = [f"# Evaluation: {report['model_name']} on {report['data']} ({model['n']} tickets)",
             "", f"Taxonomy {report['taxonomy']}, auto-route threshold in force "
             f"{model['threshold']:.4f}.", "",
             f"| metric | {report['model_name']} | TF-IDF baseline |", "| --- | --- | --- |"]
    for title, key, fmt in rows:
        cells = [fmt.format(x[key]) if x.get(key) is not None else "-" for x in (model, base)]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    for target in ("0.95", "0.98", "0.99"):
        cells = [_coverage_cell(x, target) for x in (model, base)]
        lines.append(f"| coverage at {float(target):.0%} precision | {cells[0]} | {cells[1]} |")
    fields = report.get("fields")
    if fields:
        lines += ["", "## Extraction fields", "",
                  "| field | kind | metric | model | trivial baseline |",
                  "| --- | --- | --- | --- | --- |"]
        for name, figures in fields.items():
            baseline = ("`Unknown`" if figures["kind"] == "extractive"
                        else "first 8 words of the ticket")
            for title, key in (("exact match", "exact_match"), ("token-F1", "token_f1"),
                               ("ROUGE-L", "rouge_l"), ("`Unknown`", "unknown_rate")):
                if key in figures["model"]:
                    lines.append(f"| {name} | {figures['kind']} | {title} | "
                                 f"{figures['model'][key]:.1%} | "
                                 f"{figures['baseline'][key]:.1%} ({baseline}) |")
            extracted = figures["model"]
            extra = (f"values found in the ticket: {extracted['in_ticket_rate']:.1%}"
                     if "in_ticket_rate" in extracted else "rejected for repeating the prompt: "
                     f"{extracted.get('rejected_rate', 0):.1%}")
            lines.append(f"| {name} | {figures['kind']} | gold `Unknown` / {extra} | "
                         f"{extracted['gold_unknown_rate']:.1%} | |")
    calibration = report.get("calibration")
    if report.get("calibration_skipped"):
        lines += ["", "## Calibration", "", "Not measured on these rows: "
                  f"{report['calibration_skipped']}."]
    if calibration:
        raw, oof = calibration["uncalibrated"], calibration["out_of_fold"]
        head = oof.get("method", "temperature+beta") != "beta"
        lines += ["", f"## Calibration ({'label head' if head else 'label trie'})", "",
                  f"Out-of-fold: {'temperature, beta map' if head else 'beta map'} and a "
                  f"{oof['precision_target']:.0%}-precision threshold fitted on "
                  f"{oof['folds'] - 1}/{oof['folds']} of these rows, "
                  "measured on the rest (cross-fitting).", "",
                  f"| | uncalibrated ({'T = 1' if head else 'path probability'}) | calibrated "
                  f"({'temperature + beta' if head else 'beta'}), out-of-fold |",
                  "| --- | --- | --- |",
                  f"| ECE | {raw['ece']:.3f} | {oof['ece']:.3f} |",
                  f"| AURC | {raw['aurc']:.4f} | {oof['aurc']:.4f} |"]
        for target in ("0.95", "0.98", "0.99"):
            lines.append(f"| coverage at {float(target):.0%} precision | "
                         f"{_coverage_cell(raw, target)} | {_coverage_cell(oof, target)} |")
        for target, figures in oof.get("estimated", {}).get("by_target", {}).items():
            held = "-" if figures["precision"] is None else f"{figures['precision']:.1%}"
            lines.append(f"| coverage (precision) of a threshold fitted for {float(target):.0%} "
                         f"precision on the other folds | – | {figures['coverage']:.1%} "
                         f"({held}) |")
        sure = oof.get("guaranteed")
        for target, figures in (sure or {}).get("by_target", {}).items():
            lines.append(f"| coverage of a threshold guaranteeing {float(target):.0%} precision "
                         f"(risk {sure['delta']:g}) | – | {figures['coverage']:.1%} |")
        precision = "-" if oof["precision"] is None else f"{oof['precision']:.1%}"
        lines += ["", f"A threshold fitted for {oof['precision_target']:.0%} precision on the "
                  f"other folds auto-routed {oof['coverage']:.1%} of held-out tickets at "
                  f"{precision} precision" + (
                      f" (temperatures {', '.join(f'{t:.3f}' for t in oof['temperatures'])})."
                      if oof["temperatures"] else ".")]
    for name in report.get("plots", []):
        lines += ["", f"![{name}]({name})"]
    lines += ["", "## Worst labels (model)", "", "| label | F1 | precision | recall | support |",
              "| --- | --- | --- | --- | --- |"]
    for row in model["per_label_worst_first"][:15]:
        lines.append(f"| {row['label']} | {row['f1']:.2f} | {row['precision']:.2f} | "
                     f"{row['recall']:.2f} | {row['support']} |")
    lines += ["", "## Most frequent confusions (model)", "", "| gold | predicted | count |",
              "| --- | --- | --- |"]
    lines += [f"| {c['gold']} | {c['predicted']} | {c['count']} |"
              for c in model["confusion_pairs"][:10]]
    if model.get("confident_errors"):
        lines += ["", "## Most confident errors (model)", "",
                  "The wrong labels a precision target meets first; some gold labels are "
                  "wrong too.", "", "| confidence | gold | predicted | ticket |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {e['confidence']:.3f} | {e['gold']} | {e['label']} | "
                  f"{' '.join(e['text'].split()).replace('|', '/')[:160]} |"
                  for e in model["confident_errors"]]
    return "\n".join(lines) + "\n"


def evaluate(engine: Any, model_name: str, taxonomy: Taxonomy,
             eval_rows: list[tuple[str, str]], train_rows: list[tuple[str, str]],
             data_name: str, out_dir: Path | None = None, progress: bool = True,
             threshold: float | None = None, precision_target: float = 0.98,
             gold_fields: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Score ``engine`` and the TF-IDF baseline on ``eval_rows``; write JSON, Markdown and the
    two plots. ``threshold`` is the auto-route threshold in force (default: the taxonomy's).
    ``gold_fields`` (one dict per row) adds the extraction fields' scores (``field_scores``).

    Raises ``KeyError`` if a gold label is not in the taxonomy, ``ValueError`` when
    ``gold_fields`` and ``eval_rows`` differ in length.
    """
    unknown = {label for _, label in eval_rows} - set(taxonomy.label_names)
    if unknown:
        raise KeyError(f"gold labels outside taxonomy {taxonomy.name}: {sorted(unknown)[:5]}")
    texts = [text for text, _ in eval_rows]
    gold = [label for _, label in eval_rows]
    predictions = predict_engine(engine, texts, progress)
    baseline = predict_tfidf(baseline_rows(train_rows, eval_rows), texts)
    report: dict[str, Any] = {
        "model_name": model_name, "taxonomy": taxonomy.ref, "data": data_name,
        "model": {**score(gold, predictions, taxonomy, threshold),
                  "confident_errors": confident_errors(texts, gold, predictions)},
        "baseline": score(gold, baseline, taxonomy),
        "baseline_name": "tfidf-char-wb-2-5+logreg",
    }
    if gold_fields is not None and taxonomy.fields:
        if len(gold_fields) != len(eval_rows):
            raise ValueError(f"{len(gold_fields)} rows of gold fields for {len(eval_rows)} rows")
        report["fields"] = field_scores(texts, gold_fields, predictions.fields, taxonomy,
                                        predictions.rejected)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    calibration = None
    if predictions.scores or predictions.path_confidences:
        try:
            calibration = calibration_figures(gold, predictions, taxonomy, precision_target)
        except ValueError as exc:  # e.g. a fold's rows all wrong: no beta map to fit
            report["calibration_skipped"] = str(exc)
    if calibration is not None:
        raw_curves = calibration.pop("_curves")
        report["calibration"] = calibration
        curves["router, uncalibrated"] = (raw_curves["correct"], raw_curves["raw"])
        curves["router, calibrated (out-of-fold)"] = (raw_curves["correct"],
                                                       raw_curves["calibrated"])
    else:
        correct = np.array([g == p for g, p in zip(gold, predictions.labels, strict=True)])
        curves["model"] = (correct, np.array(predictions.confidences))
    base_correct = np.array([g == p for g, p in zip(gold, baseline.labels, strict=True)])
    curves["TF-IDF baseline"] = (base_correct, np.array(baseline.confidences))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report["plots"] = plot_calibration(out_dir, curves)
        (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "eval.md").write_text(markdown_report(report))
        write_predictions(out_dir / "predictions.jsonl", eval_rows, predictions, gold_fields)
    return report


def write_predictions(path: Path, rows: list[tuple[str, str]], predictions: Predictions,
                      gold_fields: list[dict[str, str]] | None = None) -> None:
    """One JSON line per row: text, gold and predicted label, confidence (after the model's
    calibration), and gold and predicted fields when there are any: the errors, to read."""
    with path.open("w", encoding="utf-8") as handle:
        for i, (text, gold) in enumerate(rows):
            line: dict[str, Any] = {"text": text, "gold": gold,
                                    "label": predictions.labels[i],
                                    "confidence": round(predictions.confidences[i], 4)}
            if predictions.fields and predictions.fields[i]:
                line["fields"] = predictions.fields[i]
                if gold_fields is not None:
                    line["gold_fields"] = gold_fields[i]
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
