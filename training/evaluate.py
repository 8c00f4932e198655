"""``thinfleet eval``: a routing model against labelled tickets, beside a similarity baseline.

The model runs through the worker's own ``RoutingEngine`` (same prompt, same decoding). In the
same invocation, on the same rows, a **similarity-router baseline** is fitted and scored: TF-IDF
character n-grams (``char_wb``, 2-5) with a logistic-regression classifier (scikit-learn), the
"text similarity search" router the reference article's LLM replaced. Its training rows are the
given training file minus every row whose text appears in the evaluation rows.

Metrics (scikit-learn where it has them): accuracy, macro-F1, per-label precision/recall/F1
(worst first), the most frequent confusion pairs, valid-label rate, expected calibration error
(15 equal-width bins, Guo et al. 2017, arXiv:1706.04599), coverage and precision at the
taxonomy's fallback threshold, and p50/p95 latency per ticket.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.taxonomy import Taxonomy

ECE_BINS = 15


@dataclass
class Predictions:
    """Predicted labels and confidences for rows, with per-ticket latency in ms."""

    labels: list[str]
    confidences: list[float]
    latencies_ms: list[float]


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE: the support-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def score(gold: list[str], predictions: Predictions, taxonomy: Taxonomy) -> dict[str, Any]:
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
    threshold = taxonomy.confidence_threshold
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
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "per_label_worst_first": per_label,
        "confusion_pairs": [{"gold": g, "predicted": p, "count": c}
                            for (g, p), c in confusions.most_common(15)],
    }


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
    return out


def predict_tfidf(train_rows: list[tuple[str, str]], texts: list[str]) -> Predictions:
    """Fit the TF-IDF + logistic-regression baseline on ``train_rows``; predict ``texts``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
        LogisticRegression(C=20.0, max_iter=2000))
    pipeline.fit([t for t, _ in train_rows], [label for _, label in train_rows])
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


def markdown_report(report: dict[str, Any]) -> str:
    """A human-readable report: the two systems side by side, then the model's details."""
    model, base = report["model"], report["baseline"]
    rows = [("accuracy", "accuracy", "{:.1%}"), ("macro-F1", "macro_f1", "{:.3f}"),
            ("valid labels", "valid_label_rate", "{:.1%}"), ("ECE", "ece", "{:.3f}"),
            ("coverage at threshold", "coverage_at_threshold", "{:.1%}"),
            ("precision at threshold", "precision_at_threshold", "{:.1%}"),
            ("latency p50 (ms)", "latency_ms_p50", "{:.1f}"),
            ("latency p95 (ms)", "latency_ms_p95", "{:.1f}")]
    lines = [f"# Evaluation: {report['model_name']} on {report['data']} ({model['n']} tickets)",
             "", f"Taxonomy {report['taxonomy']}, fallback threshold {model['threshold']}.", "",
             f"| metric | {report['model_name']} | TF-IDF baseline |", "| --- | --- | --- |"]
    for title, key, fmt in rows:
        cells = [fmt.format(x[key]) if x[key] is not None else "-" for x in (model, base)]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Worst labels (model)", "", "| label | F1 | precision | recall | support |",
              "| --- | --- | --- | --- | --- |"]
    for row in model["per_label_worst_first"][:15]:
        lines.append(f"| {row['label']} | {row['f1']:.2f} | {row['precision']:.2f} | "
                     f"{row['recall']:.2f} | {row['support']} |")
    lines += ["", "## Most frequent confusions (model)", "", "| gold | predicted | count |",
              "| --- | --- | --- |"]
    lines += [f"| {c['gold']} | {c['predicted']} | {c['count']} |"
              for c in model["confusion_pairs"][:10]]
    return "\n".join(lines) + "\n"


def evaluate(engine: Any, model_name: str, taxonomy: Taxonomy,
             eval_rows: list[tuple[str, str]], train_rows: list[tuple[str, str]],
             data_name: str, out_dir: Path | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Score ``engine`` and the TF-IDF baseline on ``eval_rows``; write JSON and Markdown.

    Raises ``KeyError`` if a gold label is not in the taxonomy.
    """
    unknown = {label for _, label in eval_rows} - set(taxonomy.label_names)
    if unknown:
        raise KeyError(f"gold labels outside taxonomy {taxonomy.name}: {sorted(unknown)[:5]}")
    texts = [text for text, _ in eval_rows]
    gold = [label for _, label in eval_rows]
    report = {
        "model_name": model_name, "taxonomy": taxonomy.ref, "data": data_name,
        "model": score(gold, predict_engine(engine, texts, progress), taxonomy),
        "baseline": score(gold, predict_tfidf(baseline_rows(train_rows, eval_rows), texts),
                          taxonomy),
        "baseline_name": "tfidf-char-wb-2-5+logreg",
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "eval.md").write_text(markdown_report(report))
    return report
