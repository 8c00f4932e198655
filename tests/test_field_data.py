"""The ecommerce data and the field-training sequence (issue 14), with the real tokenizer:
what training teaches a field to write is what the span decoder can write."""

from __future__ import annotations

import json
from pathlib import Path

from models import load_taxonomy
from training.finetune import IGNORE, encode_answers
from worker.prompt import encode_ticket
from worker.spans import SpanDecoder

DATA = Path(__file__).parent.parent / "data" / "ecommerce"


def rows(name: str) -> list[dict[str, str]]:
    with (DATA / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_the_data_set_is_what_its_readme_says() -> None:
    train, test = rows("train"), rows("test")
    assert (len(train), len(test)) == (492, 165)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    labels = set(load_taxonomy("ecommerce").label_names)
    for row in train + test:
        assert row["issue_classification"] in labels
        assert row["brief_description"].strip()
        assert row["product_name"] == "Unknown" or row["product_name"] in row["text"]


def test_every_gold_product_is_a_span_the_decoder_can_write(model_file: Path) -> None:
    """The training target of an extractive field (`` {value}`` tokenized on its own) must be
    one of the spans the constrained decoder allows, or training would teach a value that
    serving cannot produce."""
    from worker.llama import load_vocab

    vocab = load_vocab(model_file)
    newline = vocab.tokenize("\n")[0]
    lead = vocab.tokenize("Ticket:")
    cue = vocab.tokenize("\nCategory:")
    for row in rows("train") + rows("test"):
        if row["product_name"] == "Unknown":
            continue
        ids, _ = encode_ticket(vocab.tokenize, row["text"], None, 128)
        body = ids[len(lead):len(ids) - len(cue)]
        decoder = SpanDecoder(body, vocab.piece, vocab.tokenize(" Unknown"), newline)
        value = vocab.tokenize(" " + row["product_name"])
        starts = [s for s in decoder.starts if body[s:s + len(value)] == value]
        assert any(decoder.ends_ok[s + len(value) - 1] for s in starts), row["product_name"]


def test_only_field_values_are_training_targets(model_file: Path) -> None:
    from worker.llama import load_vocab

    vocab = load_vocab(model_file)
    taxonomy = load_taxonomy("ecommerce")
    [(answer, targets)] = encode_answers(
        vocab, taxonomy, [("The kettle is broken", "Product Defect or Problem")],
        [{"product_name": "kettle", "brief_description": "Kettle broken"}])
    wanted = [t for t in targets if t != IGNORE]
    newline = vocab.tokenize("\n")[0]
    assert wanted == [*vocab.tokenize(" kettle"), newline, *vocab.tokenize(" Kettle broken"),
                      newline]
    text = b"".join(vocab.piece(t) for t in answer).decode()
    assert text == (" Product Defect or Problem\nproduct_name: kettle\n"
                    "brief_description: Kettle broken\n")
