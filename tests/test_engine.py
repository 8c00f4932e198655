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


ROUTER = Path(__file__).parent.parent / "models" / "trained" / "banking77-gemma3-270m-lora"


def test_hidden_state_without_the_embeddings_tax_is_the_same(model_file: Path) -> None:
    """Issue 16: reading the last token's hidden state through the eval callback (one decode,
    embeddings off, the graph stopped before the output layer) gives the shipped router the
    same labels and confidences as one decode in embeddings mode (which ran the output layer
    for every ticket token)."""
    import numpy as np

    from worker.engine import LabelHead
    from worker.prompt import encode_ticket

    taxonomy = load_taxonomy("banking77")
    head = LabelHead.load(ROUTER / "head.npz")
    engine = RoutingEngine(model_file, taxonomy, n_threads=2, adapter_path=ROUTER / "adapter.gguf",
                           head=head, prompt_style="compact", max_ticket_tokens=64)
    try:
        rt, base = engine.runtime, engine.prefix_len
        for text in sample_texts(12):
            outcome = engine.route(text)
            ids, _ = encode_ticket(rt.tokenize, text, None, engine.max_ticket_tokens)
            taxed = head.probabilities(rt.decode_all_outputs(ids, base))
            rt.forget(0, base)
            assert head.labels[int(np.argmax(taxed))] == outcome.label
            # Same batch, same kernels; only the last block's FFN runs on one row instead of
            # all of them (llama.cpp selects the output rows there), so float rounding only.
            assert outcome.confidence == pytest.approx(float(taxed.max()), abs=1e-4)
    finally:
        engine.close()


def test_hidden_state_over_several_batches_and_then_logits(model_file: Path) -> None:
    """A ticket longer than one batch is decoded in chunks without outputs and the hidden state
    read from the last; the graph stopped before the output layer leaves the KV cache complete
    (logits decoded after it match a context that never stopped)."""
    import numpy as np

    from worker.llama import LlamaRuntime

    text = " ".join(sample_texts(8))
    tapped = LlamaRuntime(model_file, n_ctx=512, n_threads=2, n_batch=32, n_ubatch=16,
                          embeddings=True)
    plain = LlamaRuntime(model_file, n_ctx=512, n_threads=2, n_batch=32, n_ubatch=16,
                         embeddings=True)
    try:
        ids = tapped.tokenize(text, add_bos=True)[:100]
        assert len(ids) > 3 * 32
        hidden = tapped.decode_hidden(ids, 0)
        reference = plain.decode_all_outputs(ids, 0)
        assert hidden.shape == (tapped.n_embd,)
        np.testing.assert_allclose(hidden, reference, atol=1e-3)
        # the next token's logits: the KV cache the stopped graph wrote is the same
        after_tap = tapped.decode([ids[1]], len(ids)).copy()
        after_plain = plain.decode([ids[1]], len(ids))
        assert int(np.argmax(after_tap)) == int(np.argmax(after_plain))
        np.testing.assert_allclose(after_tap, after_plain, atol=1e-2)
    finally:
        tapped.close()
        plain.close()


def test_head_the_model_cannot_serve_is_refused_at_boot(model_file: Path) -> None:
    """A label head of another width (e.g. trained for another base) stops the worker's boot
    with the reason, instead of failing every ticket."""
    import numpy as np

    from models.errors import ModelUnavailable
    from worker.engine import LabelHead

    taxonomy = load_taxonomy("banking77")
    n = len(taxonomy.label_names)
    head = LabelHead(np.zeros((n, 320), np.float32), np.zeros(n, np.float32),
                     list(taxonomy.label_names))
    with pytest.raises(ModelUnavailable, match="320-wide"):
        RoutingEngine(model_file, taxonomy, n_threads=2, head=head, prompt_style="compact",
                      max_ticket_tokens=64)
