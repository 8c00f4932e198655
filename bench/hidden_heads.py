"""Does the served hidden state hold a better router than the head reads? (issue 13)

Every alternative here reads the same hidden state the label head reads (the last prompt
token's final hidden state, ``[n_embd]``), so it would cost the same decode per ticket plus a
product of at most ``9,002 x n_embd``: the head's accuracy could rise at the same cost if the
features carried more than the head uses. The script routes the training and validation rows
of ``thinfleet train``'s split through the worker's engine once (about 11 min on 2 cores; the
features are cached under ``var/bench/hidden-<manifest sha256 prefix>.npz``) and reports, all
**out-of-fold** on the validation rows (``bench.combine.out_of_fold``: the temperature, and
the weight ``w`` where one is listed, fitted on four folds and measured on the fifth):

* the shipped head;
* k-nearest neighbours over the training rows' features (cosine similarity, weights
  ``exp((s - s_max) / tau)``; Khandelwal et al. 2020's kNN-LM, used as a classifier);
* the head plus ``w`` times the kNN log-probabilities (interpolation);
* a logistic regression refitted on the training features (scikit-learn, L2, ``C``);
* linear discriminant analysis with a shared, shrunk covariance (scikit-learn ``lsqr``),
  alone and added to the head.

The training features come from a model trained on those rows, so they are tighter than a new
ticket's; that is what such a router would serve. Usage::

    python -m bench.hidden_heads --manifest "$(python -c \
        'from thinfleet.demo import merged_router; print(merged_router())')"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.combine import TRAIN, VALIDATION, log_softmax, out_of_fold, row

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)


def hidden_states(manifest: Path, rows: list[tuple[str, str]]) -> np.ndarray:
    """The head's input for each row's text, ``[n, n_embd]`` float32, through the worker's
    engine (``training.calibrate_model.open_engine``)."""
    from tqdm import tqdm

    from models import load_taxonomy
    from models.manifest import Manifest
    from training.calibrate_model import open_engine
    from worker.prompt import encode_ticket

    spec = Manifest.model_validate_json(manifest.read_text())
    engine = open_engine(manifest, load_taxonomy(spec.taxonomy.name))
    rt, out = engine.runtime, np.zeros((len(rows), engine.runtime.n_embd), np.float32)
    try:
        for i, (text, _) in enumerate(tqdm(rows, desc="hidden states", mininterval=10)):
            ids, _ = encode_ticket(rt.tokenize, text, None, engine.max_ticket_tokens)
            try:
                out[i] = rt.decode_hidden(ids, engine.prefix_len)
            finally:
                rt.forget(0, engine.prefix_len)
    finally:
        engine.close()
    return out


def knn_log_probs(similarity: np.ndarray, neighbour_labels: np.ndarray, n_labels: int, k: int,
                  tau: float) -> np.ndarray:
    """kNN label log-probabilities ``[n, n_labels]`` from each row's neighbours sorted by
    similarity (``similarity`` and ``neighbour_labels`` ``[n, >= k]``), with a floor of 1e-4
    before normalising so no label is impossible."""
    s = similarity[:, :k]
    weight = np.exp((s - s[:, :1]) / tau)
    p = np.full((len(s), n_labels), 1e-4)
    for label in range(n_labels):
        p[:, label] += (weight * (neighbour_labels[:, :k] == label)).sum(axis=1)
    return np.log(p / p.sum(axis=1, keepdims=True))


def main() -> None:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    from models import load_taxonomy
    from models.manifest import Manifest
    from thinfleet.devstack import stage_model_dir
    from training.recipe import read_labelled
    from training.split import stratified_split
    from worker.acquire import sha256_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--train-data", type=Path, default=TRAIN)
    args = parser.parse_args()
    spec = Manifest.model_validate_json(args.manifest.read_text())
    taxonomy = load_taxonomy(spec.taxonomy.name)
    train, validation = stratified_split(read_labelled(args.train_data, "text", "category"))
    if sorted(validation) != sorted(read_labelled(VALIDATION, "text", "category")):
        raise SystemExit(f"{VALIDATION} is not the validation split of {args.train_data}")
    cache = Path("var/bench") / f"hidden-{sha256_file(args.manifest)[:12]}.npz"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, train=hidden_states(args.manifest, train),
                 validation=hidden_states(args.manifest, validation))
    with np.load(cache) as features:
        h_train, h_val = features["train"], features["validation"]
    index = {label: i for i, label in enumerate(taxonomy.label_names)}
    y_train = np.array([index[label] for _, label in train])
    gold = np.array([index[label] for _, label in validation])
    if spec.head is None:
        raise SystemExit(f"{args.manifest} has no label head")
    with np.load(stage_model_dir(args.manifest).parent / spec.head.path) as head:
        head_scores = h_val @ head["weight"].T + head["bias"]

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similarity = unit(h_val) @ unit(h_train).T
    nearest = np.argsort(-similarity, axis=1)[:, :50]
    sims, labels = np.take_along_axis(similarity, nearest, axis=1), y_train[nearest]
    n = len(taxonomy.label_names)
    print("| system (out-of-fold) | accuracy | ECE | AURC | coverage at 95 / 98 / 99 % precision |")
    print("| --- | --- | --- | --- | --- |")
    print(row("head (served)", *out_of_fold(lambda w: head_scores, gold), gold))
    for k, tau in ((10, 0.01), (50, 0.01), (50, 0.05)):
        knn = knn_log_probs(sims, labels, n, k, tau)
        print(row(f"kNN, k = {k}, tau = {tau}", *out_of_fold(lambda w, knn=knn: knn, gold), gold))
    knn = knn_log_probs(sims, labels, n, 50, 0.05)
    print(row("head + w · kNN (k = 50, tau = 0.05)", *out_of_fold(
        lambda w: log_softmax(head_scores, 0.7) + w * knn, gold, WEIGHTS), gold))
    for name, model in (("logistic regression refit, C = 0.1", LogisticRegression(C=0.1, max_iter=2000)),
                        ("logistic regression refit, C = 1", LogisticRegression(C=1.0, max_iter=2000)),
                        ("LDA, shrinkage 0.1", LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1)),
                        ("LDA, shrinkage 0.5", LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.5))):
        other = model.fit(h_train, y_train).predict_log_proba(h_val)
        print(row(name, *out_of_fold(lambda w, other=other: other, gold), gold))
        print(row(f"head + w · {name}", *out_of_fold(
            lambda w, other=other: log_softmax(head_scores, 0.7) + w * other, gold, WEIGHTS), gold))


if __name__ == "__main__":
    main()
