"""Deterministic stratified train/validation splits of labelled tickets.

The validation rows shipped in ``data/banking77/validation.csv`` come from ``stratified_split``
with its defaults, so fine-tuning (which trains on the complement) never sees them.
Uses scikit-learn's ``train_test_split`` (stratified, fixed ``random_state``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.model_selection import train_test_split

DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SEED = 13


def read_labelled_csv(path: Path, text_column: str = "text", label_column: str = "category"
                      ) -> list[tuple[str, str]]:
    """Read ``(text, label)`` rows from a CSV with a header. Raises ``KeyError`` on a missing column."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row[text_column], row[label_column]) for row in csv.DictReader(handle)]


def stratified_split(rows: list[tuple[str, str]], validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                     seed: int = DEFAULT_SEED) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split ``rows`` into ``(train, validation)``, stratified by label, reproducibly for a seed."""
    labels = [label for _, label in rows]
    train, validation = train_test_split(
        rows, test_size=validation_fraction, stratify=labels, random_state=seed)
    return list(train), list(validation)


def per_label_sample(rows: list[tuple[str, str]], per_label: int) -> list[tuple[str, str]]:
    """The first ``per_label`` rows of each label, in input order."""
    seen: dict[str, int] = {}
    out = []
    for text, label in rows:
        if seen.get(label, 0) < per_label:
            seen[label] = seen.get(label, 0) + 1
            out.append((text, label))
    return out
