"""``thinfleet eval`` end to end on a small slice (real model), and the metric helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training.evaluate import baseline_rows, expected_calibration_error

DATA = Path(__file__).parent.parent / "data" / "banking77"


def test_ece_of_a_calibrated_and_an_overconfident_system() -> None:
    correct = np.array([True, False] * 50)
    assert expected_calibration_error(correct, np.full(100, 0.5)) == pytest.approx(0.0)
    assert expected_calibration_error(correct, np.full(100, 0.99)) == pytest.approx(0.49)


def test_baseline_never_trains_on_evaluation_rows() -> None:
    rows = [("a", "x"), ("b", "y"), ("c", "x")]
    assert baseline_rows(rows, [("b", "y")]) == [("a", "x"), ("c", "x")]


def test_confident_errors_are_the_wrong_labels_surest_first() -> None:
    from training.evaluate import Predictions, confident_errors

    predictions = Predictions(["a", "b", "c", "d"], [0.9, 0.99, 0.5, 0.7], [])
    errors = confident_errors(["t0", "t1", "t2", "t3"], ["a", "x", "y", "z"], predictions, 2)
    assert [(e["text"], e["gold"], e["label"]) for e in errors] == [("t1", "x", "b"),
                                                                     ("t3", "z", "d")]


def test_eval_command_reports_model_beside_baseline(tmp_path: Path) -> None:
    from thinfleet.cli import main

    with (DATA / "sample.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    small = tmp_path / "small.csv"
    with small.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ticket_id", "text", "category"])
        writer.writeheader()
        writer.writerows(rows[::60])  # 11 tickets over many intents
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(small), "--train-data", str(DATA / "validation.csv"),
                 "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["model"]["valid_label_rate"] == 1.0
    assert report["model"]["n"] == report["baseline"]["n"] == 11
    for system in ("model", "baseline"):
        assert 0 <= report[system]["accuracy"] <= 1 and 0 <= report[system]["ece"] <= 1
    errors = report["model"]["confident_errors"]  # the base model is near chance: it errs
    assert errors and all(e["gold"] != e["label"] for e in errors)
    assert [e["confidence"] for e in errors] == sorted((e["confidence"] for e in errors),
                                                       reverse=True)
    text = (out / "eval.md").read_text()
    assert "TF-IDF baseline" in text and "Most confident errors" in text
