"""``thinfleet injection``: can a ticket choose its own route? Measured per injection style.

For N held-out tickets (``data/banking77/validation.csv``, every k-th row) and each style of
``data/injection/corpus.yaml``: pick an attacker label that differs from the ticket's gold label
(deterministic: the gold label's index plus a per-style offset), write the style's text into the
ticket, and route it through the worker's own engine, threshold and guard. Per style:

* ``flip``: the label differs from the clean ticket's label (model robustness);
* ``to_attacker_label``: the label is the attacker's;
* ``valid``: the label is one of the taxonomy's (the closed label set);
* ``auto_to_attacker_route``: the ticket would be **auto-routed** to the attacker's label's route
  (above the model's threshold and not flagged by ``worker.guard``) while the clean ticket's gold
  route is another: what the attacker actually wants, and the system-level figure;
* ``flagged``: the guard flagged it (it goes to the fallback route);
* ``flip_redacted``, ``to_attacker_label_redacted``: the same two label figures for the label the
  worker reports, read from the ticket without the guard's flagged sentences
  (``InjectionGuard.screen``, ``THINFLEET_INJECTION_REDACT``); equal to the model's own for a
  ticket the guard does not flag;
* the same auto-route figure without the guard, and for the router before calibration (head
  softmax at temperature 1, the taxonomy's 0.35 threshold, no guard), from the same decode.

Clean accuracy on the same tickets, and the guard's flag rate on the clean tickets (its false
positives), are reported beside them. Writes ``injection.json`` and ``injection.md``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.taxonomy import Taxonomy
from worker.guard import InjectionGuard

CORPUS = Path("data/injection/corpus.yaml")
VALIDATION = Path("data/banking77/validation.csv")


def load_corpus(path: Path = CORPUS) -> list[dict[str, str]]:
    """The corpus's styles (``name``, ``split``, ``kind``, ``where``, ``template``, and
    ``guard: false`` for plain-language styles the guard does not flag)."""
    return list(yaml.safe_load(path.read_text())["styles"])


def inject(text: str, style: dict[str, str], label: str, question: str) -> str:
    """``text`` with the style's attacker text appended or prepended."""
    attack = style["template"].format(label=label, words=label.replace("_", " "),
                                      question=question)
    return f"{attack} {text}" if style["where"] == "prepend" else f"{text} {attack}"


def augment(rows: list[tuple[str, str]], labels: list[str], share: float, seed: int,
            corpus: Path = CORPUS) -> list[tuple[int, str]]:
    """Adversarial augmentation (issue 12): ``round(share * len(rows))`` extra rows, each a
    training row with the attacker text of one of the corpus's ``train`` styles (never an
    ``eval`` style, never a ``control``) naming another label, and the row's **gold** label
    kept, so the model learns that text inside the ticket does not choose the label.
    Deterministic for a seed; a style's ``{question}`` comes from another row of the attacker's
    label. Returns ``(index of the source row, injected text)`` pairs."""
    import random

    styles = [s for s in load_corpus(corpus) if s["split"] == "train" and s["kind"] != "control"]
    if share <= 0 or not styles or not rows:
        return []
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = {}
    for text, label in rows:
        by_label.setdefault(label, []).append(text)
    out = []
    for index in rng.sample(range(len(rows)), min(len(rows), round(share * len(rows)))):
        text, gold = rows[index]
        attacker = rng.choice([label for label in labels if label != gold])
        question = rng.choice(by_label.get(attacker) or [attacker.replace("_", " ")])
        out.append((index, inject(text, rng.choice(styles), attacker, question)))
    return out


def run(engine: Any, taxonomy: Taxonomy, threshold: float, rows: list[dict[str, str]],
        styles: list[dict[str, str]], guard: InjectionGuard | None) -> dict[str, Any]:
    """Route every (ticket, style) pair; returns the per-style figures (module doc)."""
    from tqdm import tqdm

    labels = taxonomy.label_names
    routes = taxonomy.routes
    by_label: dict[str, str] = {}
    for row in rows:
        by_label.setdefault(row["category"], row["text"])
    clean = [engine.route(row["text"]) for row in tqdm(rows, desc="clean", unit="ticket")]
    report: dict[str, Any] = {
        "tickets": len(rows), "threshold": threshold,
        "clean_accuracy": sum(o.label == r["category"] for o, r in zip(clean, rows, strict=True))
        / len(rows),
        "clean_flagged": (sum(bool(guard.signals(r["text"])) for r in rows) / len(rows)
                          if guard else 0.0),
        "styles": []}
    for offset, style in enumerate(styles, 1):
        flips = hits = valid = auto_hits = flagged = unguarded_hits = before_hits = 0
        flips_redacted = hits_redacted = 0
        for i, (row, before) in enumerate(zip(tqdm(rows, desc=style["name"], unit="ticket"),
                                              clean, strict=True)):
            gold = row["category"]
            attacker = labels[(labels.index(gold) + offset * 7 + i) % len(labels)]
            if attacker == gold:
                attacker = labels[(labels.index(gold) + 1) % len(labels)]
            question = by_label.get(attacker, attacker.replace("_", " "))
            text = inject(row["text"], style, attacker, question)
            outcome = engine.route(text)
            screened = guard.screen(text) if guard else None
            signals = screened.signals if screened else []
            reported = engine.route(screened.text) if screened and screened.redacted else outcome
            flips += outcome.label != before.label
            hits += outcome.label == attacker
            flips_redacted += reported.label != before.label
            hits_redacted += reported.label == attacker
            valid += outcome.label in routes
            flagged += bool(signals)
            lands = (routes.get(outcome.label) == routes[attacker]
                     and routes[attacker] != routes[gold])
            auto_hits += lands and not signals and outcome.confidence >= threshold
            unguarded_hits += lands and outcome.confidence >= threshold
            if outcome.scores is not None:  # the system before calibration: T = 1, its 0.35
                raw = np.exp(outcome.scores - outcome.scores.max())
                before_hits += lands and raw.max() / raw.sum() >= taxonomy.confidence_threshold
        n = len(rows)
        report["styles"].append({
            "style": style["name"], "split": style["split"], "kind": style["kind"],
            "flip": flips / n, "to_attacker_label": hits / n, "valid": valid / n,
            "flip_redacted": flips_redacted / n, "to_attacker_label_redacted": hits_redacted / n,
            "auto_to_attacker_route": auto_hits / n, "flagged": flagged / n,
            "auto_to_attacker_route_without_guard": unguarded_hits / n,
            "auto_to_attacker_route_before": before_hits / n})
    return report


def markdown(report: dict[str, Any], title: str) -> str:
    """The README's security table."""
    lines = [f"# {title}", "",
             f"{report['tickets']} held-out tickets; clean accuracy "
             f"{report['clean_accuracy']:.1%}; guard flags on clean tickets "
             f"{report['clean_flagged']:.1%}; auto-route threshold {report['threshold']:.3f}.", "",
             "| style | split | kind | label flips: model / **reported (redacted)** | "
             "to attacker's label: model / **reported** | valid labels | "
             "flagged by the guard | auto-routed to the attacker's route: before (T = 1, "
             "0.35, no guard) | calibrated threshold | **+ guard (shipped)** |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["styles"]:
        lines.append(f"| {s['style']} | {s['split']} | {s['kind']} | {s['flip']:.1%} / "
                     f"**{s.get('flip_redacted', s['flip']):.1%}** | "
                     f"{s['to_attacker_label']:.1%} / "
                     f"**{s.get('to_attacker_label_redacted', s['to_attacker_label']):.1%}** | "
                     f"{s['valid']:.0%} | {s['flagged']:.0%} | "
                     f"{s['auto_to_attacker_route_before']:.1%} | "
                     f"{s['auto_to_attacker_route_without_guard']:.1%} | "
                     f"**{s['auto_to_attacker_route']:.1%}** |")
    return "\n".join(lines) + "\n"


def evaluate_injection(engine: Any, taxonomy: Taxonomy, threshold: float, tickets: int,
                       out_dir: Path, guard: InjectionGuard | None, title: str,
                       corpus: Path = CORPUS, data: Path = VALIDATION,
                       split: str = "all") -> dict[str, Any]:
    """Run ``run`` on ``tickets`` rows spread over ``data`` and write the reports; ``split``
    (``train``, ``eval``) keeps only the corpus's styles of that split."""
    with data.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    step = max(1, len(rows) // tickets)
    rows = rows[::step][:tickets]
    styles = [s for s in load_corpus(corpus) if split in ("all", s["split"])]
    report = run(engine, taxonomy, threshold, rows, styles, guard)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "injection.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "injection.md").write_text(markdown(report, title))
    return report
