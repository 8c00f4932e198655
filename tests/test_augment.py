"""Adversarial augmentation for training (issue 12): pure logic over the real corpus."""

from __future__ import annotations

from training.injection import augment, load_corpus

ROWS = [("where is my card", "card_arrival"), ("my transfer is late", "transfer_timing"),
        ("why was I charged a fee", "card_payment_fee_charged"),
        ("my card was swallowed", "card_swallowed")] * 25
LABELS = sorted({label for _, label in ROWS})


def test_augmented_rows_keep_the_gold_label_and_use_only_training_styles() -> None:
    extra = augment(ROWS, LABELS, 0.5, seed=13)
    assert len(extra) == 50
    eval_markers = ["[admin]", "Assistant:", "FYI the right intent", "developer mode",
                    "queue thx", "### Category", "Dear classifier", "Also, "]
    for index, text in extra:
        source, gold = ROWS[index]
        assert source in text and text != source          # the ticket, with attacker text
        assert not any(marker in text for marker in eval_markers)
        attack = text.replace(source, "")
        assert gold not in attack                         # the attacker names another label
    train_styles = [s for s in load_corpus() if s["split"] == "train"]
    assert train_styles and all(s["split"] != "eval" for s in train_styles)


def test_augmentation_is_deterministic_and_off_by_default() -> None:
    assert augment(ROWS, LABELS, 0.3, seed=1) == augment(ROWS, LABELS, 0.3, seed=1)
    assert augment(ROWS, LABELS, 0.0, seed=1) == []


def test_composed_attacks_keep_the_gold_label_and_reuse_no_eval_wording() -> None:
    import re

    extra = augment(ROWS, LABELS, 1.0, seed=5, grammar_share=1.0)
    assert len(extra) == len(ROWS) and len({text for _, text in extra}) > 40
    # every eval style's fixed words (its template without placeholders), none in training
    fixed = [part.strip() for s in load_corpus() if s["split"] == "eval"
             for part in re.split(r"\{\w+\}", s["template"]) if len(part.strip()) >= 6]
    for index, text in extra:
        source, gold = ROWS[index]
        attack = text.replace(source, "")
        assert source in text and gold.replace("_", " ") not in attack
        assert not any(part in attack for part in fixed), attack
    # a share of 0 leaves the styles' rows as they were (make train-robust reproduces)
    assert augment(ROWS, LABELS, 0.5, seed=13, grammar_share=0.0) == augment(ROWS, LABELS, 0.5,
                                                                             seed=13)
