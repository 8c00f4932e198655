"""Routing as a choice, not a generation: a token trie over the taxonomy's labels.

Each label becomes the token sequence ``tokenize(" " + label) + [terminator]``; the terminator (a
newline) makes sure no label's path is a prefix of another's. Decoding walks the trie:

* where a node has one child, the token is *forced*: appended without a model evaluation;
* where it branches, the model is evaluated once (together with any forced tokens pending), the
  logits are masked to the children, and the most probable child is taken.

``confidence`` is the product of the masked, renormalised probabilities at the branch points,
i.e. the model's probability of the label's token path given that the answer is one of the
labels. It sums to 1 over the label set (an exact distribution, not a heuristic score).
Algorithm: constrained decoding over a prefix tree, as in "guided generation" (Willard & Louf
2023, arXiv:2307.09702), specialised to a finite set so that no grammar engine is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]


@dataclass
class TrieNode:
    """A node: children by token id; ``label`` is set on the node reached by the terminator."""

    children: dict[int, TrieNode] = field(default_factory=dict)
    label: str | None = None


@dataclass(frozen=True)
class TrieDecision:
    """The outcome of one walk.

    ``tokens``: the label's full token path; ``unevaluated``: its trailing tokens not yet fed to
    the model (a caller that keeps generating must evaluate them first); ``evaluations``: model
    calls made during the walk; ``branch_probs``: the chosen child's probability at each branch.
    """

    label: str
    confidence: float
    tokens: list[int]
    unevaluated: list[int]
    evaluations: int
    branch_probs: list[float]


class LabelTrie:
    """A prefix tree over the token sequences of a closed label set.

    Raises ``ValueError`` if two labels tokenize to the same sequence or the set is empty.
    """

    def __init__(self, sequences: dict[str, Sequence[int]]):
        if not sequences:
            raise ValueError("a label trie needs at least one label")
        self.root = TrieNode()
        self.sequences = {label: list(seq) for label, seq in sequences.items()}
        for label, seq in self.sequences.items():
            node = self.root
            for token in seq:
                node = node.children.setdefault(token, TrieNode())
            if node.label is not None or node.children:
                raise ValueError(f"labels {node.label!r} and {label!r} share a token path")
            node.label = label

    @classmethod
    def build(cls, labels: Sequence[str], tokenize: Callable[[str], list[int]],
              terminator: int) -> LabelTrie:
        """Tokenize each label as a continuation (``" " + label``) and end it with ``terminator``."""
        return cls({label: [*tokenize(" " + label), terminator] for label in labels})

    def branch_points(self) -> int:
        """How many nodes branch (each costs one model evaluation on some path)."""
        stack, count = [self.root], 0
        while stack:
            node = stack.pop()
            count += len(node.children) > 1
            stack.extend(node.children.values())
        return count

    def decode(self, first_logits: Logits, evaluate: Callable[[list[int]], Logits]) -> TrieDecision:
        """Walk the trie greedily.

        ``first_logits`` (shape ``[n_vocab]``) are the model's logits after the prompt;
        ``evaluate(tokens)`` appends ``tokens`` to the sequence and returns the logits after the
        last one. It is called only at branch points that follow at least one new token.
        """
        node, logits = self.root, first_logits
        pending: list[int] = []
        path: list[int] = []
        probs: list[float] = []
        evaluations = 0
        while node.label is None:
            if len(node.children) == 1:
                token = next(iter(node.children))
            else:
                if pending:
                    logits = evaluate(pending)
                    evaluations += 1
                    pending = []
                ids = np.fromiter(node.children, dtype=np.int64)
                masked = logits[ids].astype(np.float64)
                p = np.exp(masked - masked.max())
                p /= p.sum()
                best = int(np.argmax(p))
                token = int(ids[best])
                probs.append(float(p[best]))
            pending.append(token)
            path.append(token)
            node = node.children[token]
        confidence = float(np.prod(probs)) if probs else 1.0
        return TrieDecision(node.label, confidence, path, pending, evaluations, probs)
