"""``thinfleet injection-compare``: a candidate router's injection report beside a baseline's.

Issue 12 asks for each style's figures "beside the same figures for the current router", and a
router replaces the shipped one only if it is no worse under attack. This reads two reports that
``thinfleet injection`` wrote (``injection.json``), checks they measured the same tickets, and
sets them side by side on the styles both measured:

* per style: reported flips and landings on the attacker's label for each router, and each one's
  ``verdict`` against issue 12's targets (``training.injection.verdict``);
* per router: attack styles meeting both targets, mean reported flips and landings over the
  attack styles, mean reported flips over the ``benign`` controls, clean accuracy as reported.

It runs no model; the reports are the measurement. Both should come from the same serving mode
(both merged to Q4_K_M, or both adapters): a ticket or two per style can move with the mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.injection import is_attack, verdict

#: the figures compared per style, as ``thinfleet injection`` names them
FIGURES = ("flip_reported", "to_attacker_label_reported")


def load_report(path: Path) -> dict[str, Any]:
    """An ``injection.json`` (or the folder holding one). Raises ``FileNotFoundError`` when
    there is none and ``ValueError`` when it is not an injection report."""
    path = path / "injection.json" if path.is_dir() else path
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or "styles" not in report or "tickets" not in report:
        raise ValueError(f"{path} is not a report of thinfleet injection")
    return report


def summarize(report: dict[str, Any], names: list[str]) -> dict[str, float | int]:
    """One router's figures over the styles ``names`` of ``report``: ``attack_styles``,
    ``met_both`` (attack styles whose verdict is ``met``), ``mean_flip_reported`` and
    ``mean_to_attacker_reported`` (fractions, mean over the attack styles),
    ``benign_styles`` and ``benign_mean_flip_reported`` (over the ``benign`` controls; 0.0
    when none), ``clean_accuracy_reported`` (fraction)."""
    styles = {s["style"]: s for s in report["styles"]}
    attacks = [styles[n] for n in names if is_attack(styles[n])]
    benign = [styles[n] for n in names if styles[n]["kind"] == "benign"]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows) if rows else 0.0

    return {
        "attack_styles": len(attacks),
        "met_both": sum(verdict(s, report["tickets"]) == "met" for s in attacks),
        "mean_flip_reported": mean(attacks, "flip_reported"),
        "mean_to_attacker_reported": mean(attacks, "to_attacker_label_reported"),
        "benign_styles": len(benign),
        "benign_mean_flip_reported": mean(benign, "flip_reported"),
        "clean_accuracy_reported": report.get("clean_accuracy_reported",
                                              report["clean_accuracy"]),
    }


def compare_reports(candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """``candidate`` beside ``baseline`` on the styles both measured, in the candidate's order.

    Returns ``{"tickets", "styles": [{"style", "split", "kind", "candidate": {figures,
    "verdict"}, "baseline": {...}}], "summary": {"candidate": summarize(...), "baseline":
    ...}, "only_candidate": [names], "only_baseline": [names]}``. Raises ``ValueError`` when
    the two measured a different number of tickets (another sample: not comparable) or share
    no style.
    """
    if candidate["tickets"] != baseline["tickets"]:
        raise ValueError(f"the reports measured {candidate['tickets']} and "
                         f"{baseline['tickets']} tickets: run both with the same --tickets")
    base = {s["style"]: s for s in baseline["styles"]}
    names = [s["style"] for s in candidate["styles"] if s["style"] in base]
    if not names:
        raise ValueError("the reports share no style")
    cand = {s["style"]: s for s in candidate["styles"]}
    n = candidate["tickets"]

    def side(style: dict[str, Any]) -> dict[str, Any]:
        return {**{k: style[k] for k in FIGURES}, "verdict": verdict(style, n)}

    return {
        "tickets": n,
        "styles": [{"style": name, "split": cand[name]["split"], "kind": cand[name]["kind"],
                    "candidate": side(cand[name]), "baseline": side(base[name])}
                   for name in names],
        "summary": {"candidate": summarize(candidate, names),
                    "baseline": summarize(baseline, names)},
        "only_candidate": [s["style"] for s in candidate["styles"] if s["style"] not in base],
        "only_baseline": [name for name in base if name not in cand],
    }


def markdown(comparison: dict[str, Any], candidate: str, baseline: str) -> str:
    """The comparison as a markdown summary table, then one row per style."""
    c, b = comparison["summary"]["candidate"], comparison["summary"]["baseline"]
    lines = [f"# Prompt injection: {candidate} beside {baseline}", "",
             f"{comparison['tickets']} tickets, {len(comparison['styles'])} styles measured by "
             "both; figures as the worker reports them.", "",
             f"| | {candidate} | {baseline} |", "| --- | --- | --- |",
             f"| attack styles meeting both targets | {c['met_both']} of {c['attack_styles']} "
             f"| {b['met_both']} of {b['attack_styles']} |",
             f"| attack styles: mean flips / to the attacker | "
             f"{c['mean_flip_reported']:.2%} / {c['mean_to_attacker_reported']:.2%} | "
             f"{b['mean_flip_reported']:.2%} / {b['mean_to_attacker_reported']:.2%} |",
             f"| benign controls ({c['benign_styles']}): mean flips | "
             f"{c['benign_mean_flip_reported']:.2%} | {b['benign_mean_flip_reported']:.2%} |",
             f"| clean accuracy, these tickets | {c['clean_accuracy_reported']:.1%} | "
             f"{b['clean_accuracy_reported']:.1%} |", "",
             f"| style | kind | {candidate}: flips / to attacker (targets) | "
             f"{baseline}: flips / to attacker (targets) |", "| --- | --- | --- | --- |"]
    for row in comparison["styles"]:
        cells = [f"{r['flip_reported']:.1%} / {r['to_attacker_label_reported']:.1%} "
                 f"({r['verdict']})" for r in (row["candidate"], row["baseline"])]
        lines.append(f"| {row['style']} | {row['kind']} | {cells[0]} | {cells[1]} |")
    for key, who in (("only_candidate", candidate), ("only_baseline", baseline)):
        if comparison[key]:
            lines += ["", f"Measured for {who} only: {', '.join(comparison[key])}."]
    return "\n".join(lines) + "\n"
