"""The routing engine on the real Gemma 3 270M Q4_K_M model (llama.cpp, CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from models import load_taxonomy
from worker.engine import RoutingEngine

SAMPLE = Path(__file__).parent.parent / "data" / "banking77" / "sample.csv"
KETTLE = ("I just got the kettle I ordered last week and it's not working. I see a light when I "
          "turn it on, but its not getting warm")


def sample_texts(n: int) -> list[str]:
    with SAMPLE.open(newline="") as handle:
        return [row["text"] for _, row in zip(range(n), csv.DictReader(handle), strict=False)]


def test_always_a_valid_label_with_bounded_confidence(banking_engine: RoutingEngine) -> None:
    labels = set(banking_engine.taxonomy.label_names)
    for text in [*sample_texts(12), "?", "asdf qwerty", "<start_of_turn>user\nhi<end_of_turn>"]:
        outcome = banking_engine.route(text)
        assert outcome.label in labels
        assert 0.0 <= outcome.confidence <= 1.0
        assert outcome.tokens_in > 0 and outcome.tokens_out > 0


def test_prefix_cache_gives_the_same_answer_as_a_fresh_context(
        banking_engine: RoutingEngine, model_file: Path) -> None:
    a, b = sample_texts(2)
    first = banking_engine.route(a)
    banking_engine.route(b)
    again = banking_engine.route(a)
    fresh_engine = RoutingEngine(model_file, banking_engine.taxonomy, n_threads=2)
    try:
        fresh = fresh_engine.route(a)
    finally:
        fresh_engine.close()
    assert (first.label, first.confidence) == (again.label, again.confidence)
    assert fresh.label == first.label
    assert fresh.confidence == pytest.approx(first.confidence, abs=1e-6)


def test_forced_tokens_are_not_evaluated(banking_engine: RoutingEngine) -> None:
    outcome = banking_engine.route(sample_texts(1)[0])
    # one evaluation for the ticket, at most one per trie branch point on the path
    assert outcome.evaluations <= 1 + outcome.tokens_out
    assert banking_engine.trie.branch_points() < sum(
        len(s) for s in banking_engine.trie.sequences.values())


def test_long_ticket_is_truncated_not_refused(banking_engine: RoutingEngine) -> None:
    outcome = banking_engine.route("my card was declined again " * 200)
    assert outcome.truncated
    assert outcome.tokens_in <= banking_engine.max_ticket_tokens + 8


def test_extraction_fields_are_bounded_strings(model_file: Path) -> None:
    taxonomy = load_taxonomy("ecommerce")
    engine = RoutingEngine(model_file, taxonomy, n_threads=2)
    try:
        outcome = engine.route(KETTLE)
    finally:
        engine.close()
    assert outcome.label in taxonomy.label_names
    assert set(outcome.fields) == {"product_name", "brief_description"}
    for spec in taxonomy.fields:
        value = outcome.fields[spec.name]
        assert isinstance(value, str) and value and "\n" not in value
        assert len(value) < spec.max_tokens * 32
    json.dumps(outcome.fields)  # always serialisable
