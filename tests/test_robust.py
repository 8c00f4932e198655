"""Issue 12 on the real model: the shipped router keeps a ticket's label when the ticket forges
the prompt's format, instructions or label names, in styles its training never saw."""

from __future__ import annotations

import csv
from pathlib import Path

from models import load_taxonomy
from models.manifest import Manifest
from training.injection import inject, load_corpus
from worker.engine import LabelHead, RoutingEngine

ROOT = Path(__file__).parent.parent
ROBUST = ROOT / "models" / "trained" / "banking77-gemma3-270m-lora-robust"
STAGE1 = ROOT / "models" / "trained" / "banking77-gemma3-270m-lora"


def engine_for(router: Path, model_file: Path) -> RoutingEngine:
    manifest = Manifest.model_validate_json((router / "manifest.json").read_text())
    return RoutingEngine(model_file, load_taxonomy("banking77"), n_threads=2,
                         max_ticket_tokens=manifest.max_ticket_tokens,
                         adapter_path=router / "adapter.gguf",
                         head=LabelHead.load(router / "head.npz"),
                         prompt_style=manifest.prompt_style)


def attacked(engine: RoutingEngine, rows: list[dict[str, str]]) -> tuple[int, int, int]:
    """(label flips, labels landing on the attacker's, routes) over every held-out attack
    style (not the controls) applied to ``rows``."""
    labels = engine.taxonomy.label_names
    styles = [s for s in load_corpus() if s["split"] == "eval" and s["kind"] != "control"]
    flips = hits = total = 0
    for i, row in enumerate(rows):
        clean = engine.route(row["text"]).label
        for k, style in enumerate(styles):
            attacker = labels[(labels.index(row["category"]) + 7 * k + i + 1) % len(labels)]
            if attacker == row["category"]:
                attacker = labels[(labels.index(attacker) + 1) % len(labels)]
            label = engine.route(inject(row["text"], style, attacker, attacker)).label
            flips += label != clean
            hits += label == attacker
            total += 1
    return flips, hits, total


def test_adversarial_training_keeps_labels_under_unseen_injection_styles(model_file: Path
                                                                         ) -> None:
    with (ROOT / "data" / "banking77" / "validation.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[::100]  # 11 tickets spread over the intents
    robust = engine_for(ROBUST, model_file)
    try:
        flips, hits, total = attacked(robust, rows)
    finally:
        robust.close()
    before = engine_for(STAGE1, model_file)
    try:
        flips_before, hits_before, _ = attacked(before, rows)
    finally:
        before.close()
    # measured on 200 tickets (README, "Security"): 0.0-11.5 % per style to the attacker's
    # label, 2.3 % over these styles; the router before adversarial training: 10-37.5 %
    assert hits <= 0.06 * total, (hits, total)
    assert hits < hits_before and flips < flips_before, (hits, hits_before, flips, flips_before)
