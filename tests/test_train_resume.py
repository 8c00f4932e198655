"""Issue 13: a stopped training run resumes where it stopped and ends with the same weights.

Needs the training extras (``make install-train``: torch, transformers, peft); skipped without
them, as in CI, which does not install them. Real model: Gemma 3 270M Q4_K_M, dequantized by
transformers, a handful of steps on real Banking77 rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from models import load_taxonomy
from training.finetune import (
    CHECKPOINT_FILE,
    HEAD_FILE,
    Recipe,
    TrainingInterrupted,
    train,
)

SAMPLE = Path(__file__).parent.parent / "data" / "banking77" / "sample.csv"


def rows(n: int) -> list[tuple[str, str]]:
    with SAMPLE.open(newline="") as handle:
        data = [(r["text"], r["category"]) for r in csv.DictReader(handle)]
    return data[::len(data) // n][:n]


def weights(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    head = np.load(out / HEAD_FILE)
    found = {"head.weight": head["weight"], "head.bias": head["bias"]}
    found.update(load_file(str(next((out / "adapter-hf").glob("*.safetensors")))))
    return found


@pytest.mark.parametrize(("decay", "rdrop"), [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5)],
                         ids=["last-step", "weight-average", "r-drop"])
def test_a_stopped_run_resumes_to_the_same_weights(tmp_path: Path, model_file: Path,
                                                  decay: float, rdrop: float) -> None:
    """With weight averaging too: the moving average is in the checkpoint. With R-Drop too:
    its dropout masks come from the RNG state the checkpoint carries."""
    taxonomy = load_taxonomy("banking77")
    recipe = Recipe(epochs=1.0, batch_size=4, lora_r=4, lora_alpha=8, max_ticket_tokens=24,
                    checkpoint_every_steps=100, warmup_fraction=0.2,
                    weight_average_decay=decay, rdrop_weight=rdrop)
    data = rows(24)  # 6 steps
    whole = train(model_file, taxonomy, data, tmp_path / "whole", recipe, progress=False,
                  validation_rows=data[:8])
    assert whole.steps == 6
    # With averaging, the last step's weights are measured too (the same run's baseline).
    last = json.loads((tmp_path / "whole" / "train.json").read_text())
    assert (last["last_step_validation_accuracy"] is None) == (decay == 0)
    with pytest.raises(TrainingInterrupted, match="after step 2"):
        train(model_file, taxonomy, data, tmp_path / "split", recipe, progress=False,
              stop_after_steps=2)
    assert (tmp_path / "split" / CHECKPOINT_FILE).exists()
    with pytest.raises(ValueError, match="another recipe"):
        train(model_file, taxonomy, data, tmp_path / "split",
              Recipe(**{**recipe.__dict__, "seed": 14}), progress=False)
    resumed = train(model_file, taxonomy, data, tmp_path / "split", recipe, progress=False)
    assert resumed.tokens == whole.tokens
    assert not (tmp_path / "split" / CHECKPOINT_FILE).exists()
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)


def test_order_seed_sets_the_training_randomness_alone(tmp_path: Path,
                                                        model_file: Path) -> None:
    """``order_seed`` (a second soup ingredient): the seed's own value trains exactly the
    default run; another value trains other weights from the same rows."""
    taxonomy = load_taxonomy("banking77")
    recipe = Recipe(epochs=1.0, batch_size=4, lora_r=4, lora_alpha=8, max_ticket_tokens=24,
                    checkpoint_every_steps=100, warmup_fraction=0.2, lora_dropout=0.1)
    data = rows(16)  # 4 steps
    runs = {}
    for name, seed in (("default", None), ("same", recipe.seed), ("other", 14)):
        train(model_file, taxonomy, data, tmp_path / name,
              Recipe(**{**recipe.__dict__, "order_seed": seed}), progress=False)
        runs[name] = weights(tmp_path / name)
    for name in runs["default"]:
        np.testing.assert_array_equal(runs["default"][name], runs["same"][name], err_msg=name)
    assert any(not np.array_equal(runs["default"][name], runs["other"][name])
               for name in runs["default"])
