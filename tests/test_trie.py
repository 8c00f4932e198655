"""The label trie's decoding logic, with hand-made logits (pure logic: no model)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from worker.trie import LabelTrie

VOCAB = 16
NL = 15


def logits_favouring(*tokens: int, strength: float = 3.0) -> np.ndarray:
    out = np.zeros(VOCAB, dtype=np.float32)
    for token in tokens:
        out[token] = strength
    return out


def test_forced_tokens_cost_no_evaluation() -> None:
    # Two labels sharing 3 tokens, then branching: one evaluation after the forced run.
    trie = LabelTrie({"a": [1, 2, 3, 4, NL], "b": [1, 2, 3, 5, NL]})
    calls: list[list[int]] = []

    def evaluate(tokens: list[int]) -> np.ndarray:
        calls.append(tokens)
        return logits_favouring(5)

    decision = trie.decode(logits_favouring(1), evaluate)
    assert decision.label == "b"
    assert calls == [[1, 2, 3]]
    assert decision.unevaluated == [5, NL]
    assert decision.evaluations == 1


def test_confidence_is_masked_softmax_product() -> None:
    trie = LabelTrie({"x": [1, NL], "y": [2, NL], "z": [3, NL]})
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[[1, 2, 3]] = [2.0, 1.0, 0.0]
    logits[9] = 50.0  # a non-label token the mask must ignore
    decision = trie.decode(logits, lambda tokens: pytest.fail("no evaluation needed"))
    expected = np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + 1.0)
    assert decision.label == "x"
    assert decision.confidence == pytest.approx(expected)


def test_confidence_is_a_distribution_over_labels() -> None:
    # Sum of path probabilities over all labels is 1 when every branch uses the same logits.
    rng = np.random.default_rng(0)
    labels = {"".join(p): [ord(p[0]) % 8, 8 + ord(p[1]) % 6, NL]
              for p in itertools.product("abc", "xy")}
    trie = LabelTrie(labels)
    logits = rng.normal(size=VOCAB).astype(np.float32)
    total = 0.0
    for seq in trie.sequences.values():
        node, p = trie.root, 1.0
        for token in seq:
            kids = list(node.children)
            if len(kids) > 1:
                z = np.exp(logits[kids] - logits[kids].max())
                p *= float(z[kids.index(token)] / z.sum())
            node = node.children[token]
        total += p
    assert total == pytest.approx(1.0)


def test_single_label_path_is_certain() -> None:
    trie = LabelTrie({"only": [4, 5, NL], "other": [6, NL]})
    decision = trie.decode(logits_favouring(4), lambda t: pytest.fail("forced"))
    assert decision.label == "only"
    assert 0.0 < decision.confidence <= 1.0


def test_shared_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="share a token path"):
        LabelTrie({"a": [1, NL], "b": [1, NL]})
    with pytest.raises(ValueError):
        LabelTrie({})


def test_build_adds_terminator_so_prefix_labels_differ() -> None:
    vocab = {" top": [1], " top up": [1, 2]}
    trie = LabelTrie.build(["top", "top up"], lambda text: vocab[text], NL)
    assert trie.sequences == {"top": [1, NL], "top up": [1, 2, NL]}
