"""Span-constrained decoding and the prompt-echo check (worker.spans), as pure logic: a toy
vocabulary and scripted logits. The real model's side is in tests/test_fields.py."""

from __future__ import annotations

import numpy as np
import pytest

from worker.spans import SpanDecoder, echoes_prompt

# a toy vocabulary: id -> piece
PIECES = {0: b"\n", 1: b" the", 2: b" kettle", 3: b" is", 4: b" broken", 5: b".", 6: b" Unknown",
          7: b" toaster", 8: b" kett", 9: b"le", 10: b" my", 11: b" phone"}
VOCAB = len(PIECES)


def logits_preferring(*order: int) -> np.ndarray:
    """Logits where ``order[0]`` scores highest, then ``order[1]``..., all others lowest."""
    out = np.full(VOCAB, -10.0, dtype=np.float32)
    for rank, token in enumerate(order):
        out[token] = 10.0 - rank
    return out


def run(body: list[int], steps: list[np.ndarray], max_tokens: int = 8):  # type: ignore[no-untyped-def]
    decoder = SpanDecoder(body, PIECES.__getitem__, unknown=[6], newline=0)
    fed: list[list[int]] = []
    script = iter(steps[1:])

    def evaluate(tokens: list[int]) -> np.ndarray:
        fed.append(tokens)
        return next(script)

    return decoder.decode(steps[0], evaluate, max_tokens), fed


def test_the_model_cannot_name_a_product_the_ticket_does_not() -> None:
    # the model wants "toaster" (not in the ticket), then would stop: it gets "kettle"
    choice, fed = run([1, 2, 3, 4, 5], [logits_preferring(7, 2, 0), logits_preferring(0, 3)])
    assert choice.tokens == [2] and not choice.unknown
    assert fed == [[2]]


def test_unknown_is_always_allowed() -> None:
    choice, _ = run([1, 2, 3, 4], [logits_preferring(6, 2), logits_preferring(0)])
    assert choice.unknown and choice.tokens == [6]


def test_a_value_ends_only_at_a_word_boundary() -> None:
    # " kett" + "le" is one word: stopping after " kett" is not allowed
    choice, _ = run([10, 8, 9, 3, 4], [logits_preferring(8), logits_preferring(0, 9),
                                        logits_preferring(0)])
    assert choice.tokens == [8, 9]


def test_spans_start_at_words_and_follow_the_ticket() -> None:
    # "le" starts no word; after " my" only " kett" may follow
    choice, _ = run([10, 8, 9, 3], [logits_preferring(9, 10), logits_preferring(11, 8, 0),
                                     logits_preferring(9), logits_preferring(0)])
    assert choice.tokens == [10, 8, 9]


def test_max_tokens_cuts_the_value_and_reports_the_unevaluated_token() -> None:
    choice, fed = run([1, 2, 3, 4], [logits_preferring(1), logits_preferring(2)], max_tokens=2)
    assert choice.tokens == [1, 2]
    assert fed == [[1]] and choice.unevaluated == [2]


def test_an_empty_ticket_allows_only_unknown() -> None:
    choice, _ = run([], [logits_preferring(2, 6), logits_preferring(0)])
    assert choice.unknown


@pytest.mark.parametrize("value,echo", [
    ("the issue in a few words", True),                   # the base model's measured failure
    ("the product mentioned in the ticket, or", True),
    ("Order late and tracking not updating", True),       # copied from a few-shot example
    ("Kettle lights up but does not heat", False),
    ("Kettle not heating", False),
    ("a few words about my kettle", False),               # the ticket itself says it
    ("", False),
])
def test_echoes_prompt(value: str, echo: bool) -> None:
    prompt = ("Identify the product mentioned (Unknown if none), summarize the issue in a few "
              "words. - product_name: the product mentioned in the ticket, or Unknown\n"
              "brief_description: Order late and tracking not updating")
    ticket = "My kettle lights up but does not heat. Here are a few words about my kettle."
    assert echoes_prompt(value, prompt, ticket) is echo
