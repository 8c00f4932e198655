"""Fields that cannot say what the ticket does not: span-constrained decoding and the
prompt-echo check (issue 14).

**Extractive fields** (``extractive: true`` in the taxonomy, e.g. ``product_name``) are decoded
greedily under a constraint: every token must continue a span of the ticket's own tokens that
starts at a word, or continue ``Unknown``; the value may end (the newline) only where a span
ends at a word boundary or ``Unknown`` is complete. The value is then, by construction, words
copied from the ticket or ``Unknown``: it cannot name a product the ticket does not mention,
nor repeat the prompt. The same idea as the label trie (``worker.trie``: constrained decoding
over a prefix tree, Willard & Louf 2023, arXiv:2307.09702), over the ticket's suffixes instead
of a fixed label set; it costs one model evaluation per value token, as free generation does.

**Generative fields** (e.g. ``brief_description``) stay free but bounded by ``max_tokens``, and
are checked after decoding: ``echoes_prompt`` rejects a value that copies a run of the prompt's
words (instructions, field descriptions, few-shot examples) that the ticket does not contain,
the failure measured on the base model, which answered every ticket with "the product mentioned
in the ticket, or" and "the issue in a few words".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (letters and digits, inner apostrophes kept)."""
    return _WORD.findall(text.lower())


def _runs(items: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(items[i:i + n]) for i in range(len(items) - n + 1)}


@functools.lru_cache(maxsize=32)
def _text_runs(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """The word runs of a text that does not change per ticket (the prompt): computed once."""
    return frozenset(_runs(words(text), n))


def echoes_prompt(value: str, prompt: str, ticket: str, run_words: int = 3) -> bool:
    """True when ``value`` repeats the prompt instead of the ticket: some run of
    ``min(run_words, len(words(value)))`` consecutive words of the value occurs in ``prompt``
    and not in ``ticket``. An empty value never echoes. ``prompt`` is every text the model saw
    besides the ticket (prefix, field cues)."""
    value_words = words(value)
    if not value_words:
        return False
    n = min(run_words, len(value_words))
    ticket_runs = _runs(words(ticket), n)
    prompt_runs = _text_runs(prompt, n)
    return any(run in prompt_runs and run not in ticket_runs for run in _runs(value_words, n))


@dataclass(frozen=True)
class SpanChoice:
    """The outcome of one extractive decode: ``tokens`` chosen (the newline excluded),
    ``unknown`` when the value is the ``Unknown`` sequence, ``evaluations`` model calls made,
    ``unevaluated`` the chosen tokens not yet fed to the model (a caller that goes on must)."""

    tokens: list[int]
    unknown: bool
    evaluations: int
    unevaluated: list[int]


class SpanDecoder:
    """Greedy decoding restricted to spans of one ticket's tokens, or ``unknown``.

    ``body``: the ticket's own token ids (without the prompt's ``Ticket:`` lead or the label
    cue); ``piece(token) -> bytes``; ``unknown``: the ids of `` Unknown``; ``newline``: the id
    that ends a value. A span starts at a token that begins a word (its piece starts with a
    space, or follows a piece with no letter or digit) and may end where the next piece starts
    a word or is punctuation, or at the end of the body.
    """

    def __init__(self, body: list[int], piece: Callable[[int], bytes], unknown: list[int],
                 newline: int):
        self.body, self.unknown, self.newline = body, unknown, newline
        pieces = [piece(t) for t in body]

        def has_alnum(p: bytes) -> bool:
            return any(chr(b).isalnum() for b in p if b < 128)

        self.starts = [i for i, p in enumerate(pieces)
                       if (p.startswith(b" ") and has_alnum(p))
                       or (i > 0 and has_alnum(p) and not has_alnum(pieces[i - 1]))]
        #: ends_ok[i]: a span may end after token i
        self.ends_ok = [i + 1 == len(pieces) or pieces[i + 1].startswith(b" ")
                        or not pieces[i + 1][:1].isalnum() for i in range(len(pieces))]

    def decode(self, first_logits: Logits, evaluate: Callable[[list[int]], Logits],
               max_tokens: int) -> SpanChoice:
        """Choose a value greedily: at each step the most probable allowed token (a span's or
        ``Unknown``'s next token, or the newline where a value may end). ``first_logits`` are
        the logits after the field's cue; ``evaluate(tokens)`` appends tokens and returns the
        next logits (called once per chosen token, never for the newline). At most
        ``max_tokens`` tokens; a value that reaches it ends there."""
        active = list(self.starts)            # spans still matching, by start position
        on_unknown = bool(self.unknown)      # the Unknown path still matching
        chosen: list[int] = []
        unevaluated: list[int] = []
        logits, evaluations = first_logits, 0
        for k in range(max_tokens + 1):
            allowed: set[int] = {self.body[s + k] for s in active if s + k < len(self.body)}
            if on_unknown and k < len(self.unknown):
                allowed.add(self.unknown[k])
            may_end = k > 0 and (any(self.ends_ok[s + k - 1] for s in active)
                                 or (on_unknown and k == len(self.unknown)))
            if may_end:
                allowed.add(self.newline)
            if k == max_tokens or not allowed:
                break
            ids = np.fromiter(allowed, dtype=np.int64)
            token = int(ids[int(np.argmax(logits[ids]))])
            if token == self.newline:
                break
            chosen.append(token)
            active = [s for s in active if s + k < len(self.body) and self.body[s + k] == token]
            on_unknown = on_unknown and k < len(self.unknown) and self.unknown[k] == token
            if k + 1 < max_tokens:
                logits = evaluate([token])
                evaluations += 1
            else:
                unevaluated = [token]
        unknown = on_unknown and chosen == self.unknown
        return SpanChoice(chosen, unknown, evaluations, unevaluated)
