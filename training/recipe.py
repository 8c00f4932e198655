"""The whole recipe in one call: labelled file -> split -> fine-tune -> export -> eval -> manifest.

``thinfleet train`` is a thin CLI over ``run_recipe``. Output directory layout::

    OUT/manifest.json     what the worker loads (every file pinned by sha256)
    OUT/adapter.gguf      LoRA adapter (f16 GGUF), applied at load on the base Q4_K_M GGUF
    OUT/head.npz          the label head
    OUT/<base>-<k>blocks.gguf   with ``recipe.layers = k``: the base model's first k blocks
                          (``training.prune``), the manifest's base model
    OUT/eval.json, .md    validation metrics beside the TF-IDF baseline
    (manifest.json also carries the head's temperature and the threshold for
    ``recipe.precision_target``, fitted on the validation rows, figures out-of-fold:
    ``training.calibrate_model``)
    OUT/work/             PEFT adapter, base config, train.json (not needed to serve)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from models.taxonomy import Taxonomy
from training.export import convert_adapter, data_ref, write_manifest
from training.finetune import ADAPTER_DIR, ADAPTER_FILE, HEAD_FILE, FieldRows, Recipe, train
from training.prune import prune_gguf, pruned_name
from training.split import stratified_split
from worker.acquire import sha256_file


def read_labelled(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """``(text, label)`` rows from a CSV or JSONL file (see ``producer.backfill.read_rows``)."""
    from producer.backfill import read_rows

    return [(str(row[text_column]), str(row[label_column])) for row in read_rows(path)]


def read_fields(path: Path, names: list[str]) -> FieldRows | None:
    """Gold extraction values per row (``name -> value``, missing or empty cells ``Unknown``),
    or None when the file has none of the columns ``names`` (a label-only file)."""
    from producer.backfill import read_rows
    from worker.prompt import UNKNOWN

    if not names:
        return None
    rows = list(read_rows(path))
    if not any(name in row for row in rows for name in names):
        return None
    return [{name: str(row.get(name) or "").strip() or UNKNOWN for name in names} for row in rows]


def _init_ref(recipe: Recipe) -> dict[str, str]:
    """The sha256 of the adapter a continued run started from (``recipe.init_from``)."""
    if not recipe.init_from:
        return {}
    return {"init_from_adapter_sha256": sha256_file(Path(recipe.init_from) / ADAPTER_FILE)}


def evaluate_dir(out_dir: Path, base_gguf: Path, taxonomy: Taxonomy, recipe: Recipe,
                 eval_rows: list[tuple[str, str]], train_rows: list[tuple[str, str]],
                 data_name: str, threads: int, eval_fields: FieldRows | None = None
                 ) -> dict[str, Any]:
    """Evaluate the exported files in ``out_dir`` through the worker's engine."""
    from training.evaluate import evaluate
    from worker.engine import LabelHead, RoutingEngine

    engine = RoutingEngine(base_gguf, taxonomy, n_threads=threads,
                           max_ticket_tokens=recipe.max_ticket_tokens,
                           adapter_path=out_dir / ADAPTER_FILE,
                           head=LabelHead.load(out_dir / HEAD_FILE),
                           prompt_style=recipe.prompt_style)
    try:
        return evaluate(engine, out_dir.name, taxonomy, eval_rows, train_rows, data_name, out_dir,
                        gold_fields=eval_fields)
    finally:
        engine.close()


def run_recipe(data: Path, taxonomy: Taxonomy, out_dir: Path, base_gguf: Path, recipe: Recipe,
               *, text_column: str = "text", label_column: str = "label",
               skip_training: bool = False, stop_after_steps: int | None = None) -> Path:
    """Run the recipe; returns the manifest's path. ``skip_training`` re-exports and
    re-evaluates an existing ``out_dir/work``. Training resumes from ``out_dir/work``'s
    checkpoint when there is one; ``stop_after_steps`` stops it there (``TrainingInterrupted``),
    to split a long CPU run into sessions. Raises ``KeyError`` on unknown labels."""
    from worker.cpus import available_cpus

    rows = read_labelled(data, text_column, label_column)
    unknown = {label for _, label in rows} - set(taxonomy.label_names)
    if unknown:
        raise KeyError(f"labels outside taxonomy {taxonomy.name}: {sorted(unknown)[:5]}")
    fields = read_fields(data, [f.name for f in taxonomy.fields])
    # split row indices (the split depends only on the labels, so it is the one that
    # ``stratified_split(rows)`` gives), to carry each row's fields along
    train_at, eval_at = stratified_split([(str(i), label) for i, (_, label) in enumerate(rows)],
                                         recipe.validation_fraction, seed=recipe.seed)
    train_rows, eval_rows = [rows[int(i)] for i, _ in train_at], [rows[int(i)] for i, _ in eval_at]
    train_fields = [fields[int(i)] for i, _ in train_at] if fields else None
    eval_fields = [fields[int(i)] for i, _ in eval_at] if fields else None
    work = out_dir / "work"
    if not skip_training:
        train(base_gguf, taxonomy, train_rows, work, recipe, validation_rows=eval_rows,
              stop_after_steps=stop_after_steps, train_fields=train_fields)
    convert_adapter(work / ADAPTER_DIR, work / "base-config", out_dir / ADAPTER_FILE)
    shutil.copyfile(work / HEAD_FILE, out_dir / HEAD_FILE)
    served_base, pruned = base_gguf, dict[str, str]()
    if recipe.layers is not None:  # the base the adapter was trained on: its first k blocks
        served_base = prune_gguf(base_gguf, out_dir / pruned_name(base_gguf, recipe.layers),
                                 recipe.layers)
        pruned = {"pruned_from_sha256": sha256_file(base_gguf)}
    report = evaluate_dir(out_dir, served_base, taxonomy, recipe, eval_rows, train_rows,
                          f"{data.name} (stratified validation, seed {recipe.seed})",
                          available_cpus(), eval_fields)
    metrics: dict[str, Any] = {system: {k: v for k, v in report[system].items()
                                        if k not in ("per_label_worst_first", "confusion_pairs")}
                               for system in ("model", "baseline")}
    if "fields" in report:
        metrics["fields"] = report["fields"]
    train_info = json.loads((work / "train.json").read_text())
    path = write_manifest(
        out_dir, name=out_dir.name, base_gguf=served_base, taxonomy=taxonomy,
        adapter=out_dir / ADAPTER_FILE, head=out_dir / HEAD_FILE, decoder="head",
        prompt_style=recipe.prompt_style, max_ticket_tokens=recipe.max_ticket_tokens,
        data=data_ref(data, len(train_rows), len(eval_rows),
                      f"stratified {len(eval_rows)}/{len(rows)}, seed {recipe.seed}"),
        recipe={**train_info["recipe"], **_init_ref(recipe), **pruned,
                "train_seconds": train_info["seconds"],
                "train_tokens": train_info["tokens"], "device": train_info["device"],
                "threads": train_info["threads"]},
        metrics=metrics)
    from training.calibrate_model import calibrate_manifest

    calibrate_manifest(path, taxonomy, eval_rows, data, recipe.precision_target,
                       seed=recipe.seed)
    return path
