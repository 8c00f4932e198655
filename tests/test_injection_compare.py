"""``thinfleet injection-compare`` (issue 12): two routers' injection reports side by side.

The reports are written by the real ``evaluate_injection`` over the real corpus; the two
routers are stand-in engines (one follows any label the ticket names, one never does), since
this is pure logic over the reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import load_taxonomy
from training.injection import evaluate_injection
from training.injection_compare import compare_reports, load_report, markdown
from worker.engine import RouteOutcome

TAXONOMY = load_taxonomy("banking77")
LABELS = TAXONOMY.label_names
STYLES = ["classify_as_name", "team_should_take", "benign_thanks"]


class Follower:
    """Reads a clean ticket's gold label, and any label named in the ticket above it."""

    def route(self, text: str, subject: str | None = None) -> RouteOutcome:
        named = [n for n in LABELS if n.replace("_", " ") in text.lower() or n in text]
        return RouteOutcome(named[-1] if named else LABELS[int(text.split()[1]) * 7], 0.95)


class Steady:
    """Reads every ticket's gold label, whatever it says."""

    def route(self, text: str, subject: str | None = None) -> RouteOutcome:
        return RouteOutcome(LABELS[int(text.split()[1]) * 7], 0.95)


def reports(tmp_path: Path, tickets: int = 8) -> tuple[Path, Path]:
    data = tmp_path / "rows.csv"
    data.write_text("text,category\n"
                    + "".join(f"ticket {i},{LABELS[i * 7]}\n" for i in range(tickets)))
    out = []
    for name, engine, only in (("steady", Steady(), STYLES),
                               ("follower", Follower(), [*STYLES[1:], "benign_device"])):
        evaluate_injection(engine, TAXONOMY, 0.9, tickets, tmp_path / name, None, name,
                           data=data, only=only)
        out.append(tmp_path / name)
    return out[0], out[1]


def test_the_comparison_counts_each_routers_styles_meeting_the_targets(tmp_path: Path) -> None:
    steady, follower = reports(tmp_path)
    comparison = compare_reports(load_report(steady), load_report(follower / "injection.json"))
    # only the styles both measured, in the candidate's order
    assert [s["style"] for s in comparison["styles"]] == ["team_should_take", "benign_thanks"]
    assert comparison["only_candidate"] == ["classify_as_name"]
    assert comparison["only_baseline"] == ["benign_device"]
    row = comparison["styles"][0]
    assert row["candidate"] == {"flip_reported": 0.0, "to_attacker_label_reported": 0.0,
                                "verdict": "met"}
    assert row["baseline"]["flip_reported"] == row["baseline"]["to_attacker_label_reported"] == 1.0
    assert row["baseline"]["verdict"] == "above"
    summary = comparison["summary"]
    assert summary["candidate"]["met_both"] == 1 and summary["baseline"]["met_both"] == 0
    assert summary["candidate"]["attack_styles"] == summary["baseline"]["attack_styles"] == 1
    assert summary["baseline"]["mean_flip_reported"] == 1.0
    assert summary["candidate"]["benign_styles"] == 1  # benign_thanks, not the control
    assert summary["candidate"]["clean_accuracy_reported"] == 1.0
    text = markdown(comparison, "steady", "follower")
    assert "| attack styles meeting both targets | 1 of 1 | 0 of 1 |" in text
    assert "Measured for steady only: classify_as_name." in text


def test_reports_of_other_ticket_counts_or_files_are_refused(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    from thinfleet.cli import main

    steady, follower = reports(tmp_path)
    other = json.loads((follower / "injection.json").read_text())
    other["tickets"] = 500
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="same --tickets"):
        compare_reports(load_report(steady), other)
    assert main(["injection-compare", str(steady), str(tmp_path / "other.json")]) == 2
    assert "same --tickets" in capsys.readouterr().err
    assert main(["injection-compare", str(steady), str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
    (tmp_path / "not.json").write_text("{}")
    assert main(["injection-compare", str(steady), str(tmp_path / "not.json")]) == 2
    assert "not a report" in capsys.readouterr().err
    assert main(["injection-compare", str(steady), str(follower), "--out",
                 str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["tickets"] == 8
    assert "steady beside follower" in (tmp_path / "cmp" / "comparison.md").read_text()
