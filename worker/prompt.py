"""The one prompt builder, shared by serving, evaluation and training.

A prompt that differs by one token between training and serving silently costs accuracy, so the
fine-tuning recipe (``training/``) imports these functions instead of formatting its own text.

Layout (plain text; the base model has no chat template)::

    <bos>{instructions}                       \\  (the "compact" style stops here)
    Categories:                                |  prefix: identical for every ticket of a
    - {label}[: {description}]                 |  taxonomy, evaluated once per worker child
    [Also extract, one per line:               |  and kept in the KV cache (prefix cache)
    - {field}: {description}]                  |
    <blank line>                               |
    [Ticket: {example}                         |  few-shot examples (catalog style only),
    Category: {label}                          |  in the answer's own format
    {field}: {value}                           |
    <blank line>]                             /
    Ticket: {ticket text, whitespace folded}  \\  ticket part: tokenized on its own, truncated to
    Category:                                 /   max_ticket_tokens, removed from the KV cache after
     {label}\\n                                    answer: label (trie) then each field line
    {field}: {value}\\n

The ticket's text is tokenized with special-token parsing *off*, so a ticket cannot inject
control tokens. Prefix and ticket are tokenized separately and concatenated, so that the prefix's
tokens never depend on the ticket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from models.taxonomy import ExtractionField, Taxonomy

#: ``catalog`` lists every label in the prefix (a base model needs to see its choices; the trie
#: decodes them). ``compact`` keeps only the instructions: a fine-tuned classification head knows
#: the labels, and a short prompt is what makes CPU fine-tuning affordable (~40 tokens a ticket
#: instead of ~650 for Banking77's catalog).
PromptStyle = Literal["catalog", "compact"]

LABEL_CUE = "\nCategory:"
#: the value of a field the ticket does not give (the article's convention)
UNKNOWN = "Unknown"
TICKET_LEAD = "Ticket: "

Tokenize = Callable[[str], list[int]]


def build_prefix(taxonomy: Taxonomy, style: PromptStyle = "catalog") -> str:
    """The taxonomy's shared prefix text (everything before the ticket)."""
    if style == "compact":
        return taxonomy.instructions.strip() + "\n\n"
    lines = [taxonomy.instructions.strip(), "Categories:"]
    for label in taxonomy.labels:
        lines.append(f"- {label.name}: {label.description}" if label.description
                     else f"- {label.name}")
    if taxonomy.fields:
        lines.append("Also extract, one per line:")
        lines.extend(f"- {f.name}: {f.description}" for f in taxonomy.fields)
    text = "\n".join(lines) + "\n\n"
    for example in taxonomy.examples:
        text += (TICKET_LEAD + fold_ticket_text(example.text) + LABEL_CUE + f" {example.label}\n"
                 + "".join(f"{field_cue(f.name)} {example.fields[f.name]}\n"
                           for f in taxonomy.fields) + "\n")
    return text


def fold_ticket_text(text: str, subject: str | None = None) -> str:
    """Fold all whitespace (newlines included) to single spaces; prepend the subject if any."""
    body = " ".join(text.split())
    if subject and subject.strip():
        body = f"{' '.join(subject.split())} | {body}"
    return body


def encode_ticket(tokenize: Tokenize, text: str, subject: str | None,
                  max_ticket_tokens: int) -> tuple[list[int], bool]:
    """Token ids of the ticket part, and whether the ticket was truncated.

    ``tokenize`` must not add BOS and must not parse special tokens. The ticket body is cut to
    ``max_ticket_tokens`` (head kept); the cue that asks for the label is always kept.
    """
    body = tokenize(TICKET_LEAD + fold_ticket_text(text, subject))
    truncated = len(body) > max_ticket_tokens
    return body[:max_ticket_tokens] + tokenize(LABEL_CUE), truncated


def field_cue(name: str) -> str:
    """Text forced before an extraction field's value (after the previous line's newline)."""
    return f"{name}:"


def answer_ids(tokenize: Tokenize, newline: int, label: str, values: dict[str, str],
               fields: Sequence[ExtractionField]) -> tuple[list[int], list[bool]]:
    """The answer the engine builds after the prompt, as token ids, for training: the label's
    tokens (`` {label}`` and a newline, as the label trie has them), then per field its cue
    (``{field}:``), the value's tokens (`` {value}``, whitespace folded, at most the field's
    ``max_tokens``; ``Unknown`` when the value is missing or empty) and a newline.

    Returns ``(ids, is_target)``: ``is_target`` marks each value's tokens and its closing
    newline, the tokens the model must learn to write.
    """
    ids = [*tokenize(" " + label), newline]
    is_target = [False] * len(ids)
    for spec in fields:
        cue = tokenize(field_cue(spec.name))
        value = " ".join(str(values.get(spec.name) or "").split()) or UNKNOWN
        tokens = [*tokenize(" " + value)[:spec.max_tokens], newline]
        ids += cue + tokens
        is_target += [False] * len(cue) + [True] * len(tokens)
    return ids, is_target
