"""How much should the reading without the label names weigh? (issue 12)

The worker's label-name check (``worker.guard.guarded_route``) reads a ticket that names a label
twice, as written and with the naming sentences erased, and reports the label of the two
readings' logarithmic opinion pool. The pool is weighted: ``argmax((1 - w) * s_full + w *
s_erased)`` over the raw head scores (Genest and Zidek 1986's weighted logarithmic pool);
``w = 0.5`` is the plain geometric mean. A larger ``w`` trusts the reading the attacker's words
cannot reach; it also trusts it for a genuine ticket whose own sentence named a label.

This script routes, through the worker's engine, once:

* the 1,001 validation tickets (both readings for the ones that name a label), for clean
  accuracy as reported;
* the injection command's 200 tickets with every held-out plain-language attack style the
  guard does not flag (``--split eval --plain``; the same attacker labels as
  ``thinfleet injection``), both readings;

and caches the raw scores under ``var/bench/name-check-<manifest sha256 prefix>.npz``, per
text, so a corpus that gains a batch routes only that batch's tickets. Then, for
each ``w`` in ``WEIGHTS``, it reports per style the reported label flips and the rate landing on
the attacker's label (against the clean ticket's reported label under the same ``w``), and the
clean accuracy as reported. Styles are grouped by the corpus's batches (``BATCHES``): the
choice of ``w`` was made on the styles before ``old_bank_called`` and checked on batch eight;
batch nine (from ``ps_line``) was written after both, held out from every choice; batch ten
(from ``writing_regarding``) was written before the header grammar of the training corpus.
Usage::

    python -m bench.name_check --manifest "$(python -c \\
        'from thinfleet.demo import merged_router; print(merged_router())')"
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from training.injection import (
    CORPUS,
    VALIDATION,
    attacker_label,
    inject,
    is_attack,
    load_corpus,
    sample_index,
)
from worker.guard import InjectionGuard, named_units

WEIGHTS = (0.5, 0.6, 0.67, 0.75, 0.85, 1.0)
#: the report's groups of styles, each named with its first style (the corpus's comments): the
#: styles the rule family was chosen on, then the batches written after that choice
BATCHES = (("chosen on", None), ("batch eight", "old_bank_called"), ("batch nine", "ps_line"),
           ("batch ten", "writing_regarding"))
TICKETS = 200


def tickets(labels: list[str]) -> dict[str, Any]:
    """Every ticket the report reads: the validation rows, then the injection command's
    ``TICKETS`` rows with each held-out plain-language attack style (its attacker labels).
    Returns ``texts`` and, per text, ``style`` (index into ``styles``, -1 for a validation
    row), ``gold`` and ``attacker`` label indices (-1: none), and ``sample`` (the validation
    rows the styles use)."""
    with VALIDATION.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    corpus = load_corpus(CORPUS)
    kept = [(offset, s) for offset, s in enumerate(corpus, 1)
            if s["split"] == "eval" and s.get("guard") is False and is_attack(s)
            and s["kind"] != "control"]
    index = sample_index(len(rows), TICKETS)
    sample = [rows[i] for i in index]
    by_label: dict[str, str] = {}
    for row in sample:
        by_label.setdefault(row["category"], row["text"])
    out: dict[str, Any] = {
        "texts": [r["text"] for r in rows], "style": [-1] * len(rows),
        "gold": [labels.index(r["category"]) for r in rows], "attacker": [-1] * len(rows),
        "sample": index, "styles": [s["name"] for _, s in kept]}
    for k, (offset, style) in enumerate(kept):
        for i, row in enumerate(sample):
            gold = row["category"]
            attacker = attacker_label(labels, gold, offset, i)
            question = by_label.get(attacker, attacker.replace("_", " "))
            out["texts"].append(inject(row["text"], style, attacker, question))
            out["style"].append(k)
            out["gold"].append(labels.index(gold))
            out["attacker"].append(labels.index(attacker))
    return out


def erasure_kind(guard: InjectionGuard, text: str) -> int:
    """How ``InjectionGuard.erase_label_names`` erases ``text``: 0 it names no label, 1 whole
    units (sentences, lines) go because others name none, 2 names only, in a ticket of several
    units that all name one, 3 names only, in a one-unit ticket (the guard's own
    ``named_units``)."""
    if guard.label_names is None:
        return 0
    spans = [m.span() for m in guard.label_names.finditer(text)]
    if not spans:
        return 0
    units, named = named_units(text, spans)
    return 1 if len(named) < len(units) else (2 if len(units) > 1 else 3)


def readings(manifest: Path) -> dict[str, Any]:
    """Raw head scores of every ticket of ``tickets``, ``full`` and ``erased``
    (``[n, n_labels]`` float32; ``erased`` rows are NaN where a ticket names no label), with
    ``tickets``' arrays but the texts. Cached per manifest and text: a corpus that gains a
    batch routes only the new batch's tickets."""
    from models import load_taxonomy
    from models.manifest import Manifest

    spec = Manifest.model_validate_json(manifest.read_text())
    taxonomy = load_taxonomy(spec.taxonomy.name)
    data = tickets(taxonomy.label_names)
    texts: list[str] = data.pop("texts")
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
    cache = Path("var/bench") / f"name-check-{digest}.npz"
    known: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if "texts" in stored:  # a cache from before texts were stored is read again
            known = {str(x): (f, e) for x, f, e in
                     zip(stored["texts"], stored["full"], stored["erased"], strict=True)}
    missing = [x for x in dict.fromkeys(texts) if x not in known]
    if missing:
        known.update(_route(manifest, taxonomy, missing))
    full = np.stack([known[x][0] for x in texts]).astype(np.float32)
    erased = np.stack([known[x][1] for x in texts]).astype(np.float32)
    arrays = {"full": full, "erased": erased, **{k: np.array(v) for k, v in data.items()}}
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, texts=np.array(texts), **arrays)  # type: ignore[arg-type]
    return arrays


def _route(manifest: Path, taxonomy: Any,
           texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both readings' raw head scores of each of ``texts`` through the worker's engine."""
    from tqdm import tqdm

    from thinfleet.devstack import stage_model_dir
    from worker.acquire import resolve_model
    from worker.cpus import plan_threads
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    settings = WorkerSettings()
    resolved = resolve_model(model_uri="", model_sha256=settings.model_sha256,
                             manifest_uri=str(stage_model_dir(manifest)), manifest_sha256=None,
                             taxonomy_sha256=taxonomy.sha256,
                             cache_dir=settings.model_cache_dir)
    engine = build_engine(resolved, taxonomy, plan_threads(1).threads, settings)
    guard = InjectionGuard.for_taxonomy(taxonomy)
    out = {}
    try:
        for text in tqdm(texts, desc="readings", mininterval=30):
            assert not guard.signals(text), text  # plain language only: no redaction
            full = np.asarray(engine.route(text).scores, np.float32)
            erased = np.full_like(full, np.nan)
            second = guard.erase_label_names(text)
            if second is not None:
                erased = np.asarray(engine.route(*second).scores, np.float32)
            out[text] = (full, erased)
    finally:
        engine.close()
    return out


def reported(full: np.ndarray, erased: np.ndarray, w: float) -> np.ndarray:
    """The reported label index per row under weight ``w``, ``[n]``: the full reading's own
    label, or the weighted pool's where the ticket names a label."""
    named = ~np.isnan(erased).any(axis=1)
    pooled = np.where(named[:, None], (1 - w) * full + w * np.nan_to_num(erased), full)
    return np.argmax(pooled, axis=1)


def batch_of(styles: list[str]) -> list[int]:
    """The index into ``BATCHES`` of each of ``styles`` (in corpus order); a batch whose first
    style is missing is empty."""
    starts = [styles.index(first) if first in styles else len(styles)
              for _, first in BATCHES[1:]]
    return [sum(k >= start for start in starts) for k in range(len(styles))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    args = parser.parse_args()
    d = readings(args.manifest)
    styles = [str(s) for s in d["styles"]]
    batch = batch_of(styles)
    clean = d["style"] == -1
    n_clean = int(clean.sum())
    named = ~np.isnan(d["erased"]).any(axis=1)
    print(f"{n_clean} validation tickets, {int((named & clean).sum())} name a label; "
          f"{len(styles)} styles x {TICKETS} tickets")
    print("| w | clean accuracy, reported | named tickets changed | "
          + " | ".join(f"{name} ({batch.count(b)}): flips / to attacker, mean; meeting both"
                       for b, (name, _) in enumerate(BATCHES)) + " |")
    print("| --- | --- | --- |" + " --- |" * len(BATCHES))
    per_style: dict[float, list[tuple[float, float]]] = {}
    base = reported(d["full"], d["erased"], 0.5)
    for w in WEIGHTS:
        label = reported(d["full"], d["erased"], w)
        accuracy = float((label[clean] == d["gold"][clean]).mean())
        changed = int((label[clean] != base[clean]).sum())
        clean_label = label[clean][d["sample"]]
        rates = []
        for k in range(len(styles)):
            rows = d["style"] == k
            flips = float((label[rows] != clean_label).mean())
            hits = float((label[rows] == d["attacker"][rows]).mean())
            rates.append((flips, hits))
        per_style[w] = rates

        def summary(part: list[tuple[float, float]]) -> str:
            if not part:
                return "-"
            met = sum(f <= 0.02 and h <= 0.01 for f, h in part)
            return (f"{100 * np.mean([f for f, _ in part]):.2f} / "
                    f"{100 * np.mean([h for _, h in part]):.2f} %; {met} of {len(part)}")

        cells = [summary([r for r, g in zip(rates, batch, strict=True) if g == b])
                 for b in range(len(BATCHES))]
        print(f"| {w} | {100 * accuracy:.1f} % | {changed} | " + " | ".join(cells) + " |")
    print()
    print("| style | " + " | ".join(f"w = {w}" for w in WEIGHTS) + " |")
    print("| --- |" + " --- |" * len(WEIGHTS))
    for k, name in enumerate(styles):
        cells = [f"{100 * per_style[w][k][0]:.1f} / {100 * per_style[w][k][1]:.1f}"
                 for w in WEIGHTS]
        print(f"| {name} ({BATCHES[batch[k]][0]}) | " + " | ".join(cells) + " |")

    by_kind(args.manifest, d, batch)


KINDS = {1: "whole sentences erased", 2: "names only, every sentence names one",
         3: "names only, one sentence"}


def by_kind(manifest: Path, d: dict[str, Any], batch: list[int]) -> None:
    """Print, per ``erasure_kind``, the attacked tickets (per ``BATCHES`` group, ``batch``
    giving each style's) and the genuine ones: how often the model alone and the pool (``w =
    0.5``) flip the clean ticket's reported label and land on the attacker's."""
    from models import load_taxonomy
    from models.manifest import Manifest

    taxonomy = load_taxonomy(Manifest.model_validate_json(manifest.read_text()).taxonomy.name)
    guard = InjectionGuard.for_taxonomy(taxonomy)
    kind = np.array([erasure_kind(guard, t) for t in tickets(taxonomy.label_names)["texts"]])
    model = np.argmax(d["full"], axis=1)
    pool = reported(d["full"], d["erased"], 0.5)
    clean = d["style"] == -1
    n_clean = int(clean.sum())
    clean_label = pool[clean][d["sample"]]
    attacked = np.where(~clean)[0]
    base = clean_label[(attacked - n_clean) % len(d["sample"])]
    print()
    group = np.array(batch)[d["style"][attacked]]
    print("| erasure | genuine tickets: right, model / pool | "
          + " | ".join(f"attacked, {name}: tickets; flips, model / pool; to attacker, model / pool"
                       for name, _ in BATCHES) + " |")
    print("| --- | --- |" + " --- |" * len(BATCHES))
    for k, name in KINDS.items():
        genuine = clean & (kind == k)
        right = (f"{int((model[genuine] == d['gold'][genuine]).sum())} / "
                 f"{int((pool[genuine] == d['gold'][genuine]).sum())} of {int(genuine.sum())}")
        cells = []
        for part in (group == b for b in range(len(BATCHES))):
            rows = part & (kind[attacked] == k)
            idx, ref = attacked[rows], base[rows]
            cells.append(f"{len(idx)}; {int((model[idx] != ref).sum())} / "
                         f"{int((pool[idx] != ref).sum())}; "
                         f"{int((model[idx] == d['attacker'][idx]).sum())} / "
                         f"{int((pool[idx] == d['attacker'][idx]).sum())}")
        print(f"| {name} | {right} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
