"""``thinfleet soup``: the uniform soup of routers trained from the same start.

The LoRA mean is checked exactly on small adapters written with gguf-py (pure arithmetic), and
end to end on the shipped routers: the soup of a router with itself serves its labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from models.manifest import Manifest
from thinfleet.demo import SHIPPED_MANIFEST
from training.soup import soup_adapters, soup_heads, soup_routers, write_adapter

STAGE1 = Path("models/trained/banking77-gemma3-270m-lora")
ROBUST = Path("models/trained/banking77-gemma3-270m-lora-robust")
#: the soup shipped before the R-Drop pair, still stored (README, "Fine-tuning")
SOUP = Path("models/trained/banking77-gemma3-270m-lora-soup")
#: the shipped router: the accounts pair, a soup of the R-Drop stage 2 with the accounts grammar
#: and a second training order of the R-Drop stage 2
SHIPPED = SHIPPED_MANIFEST.parent
#: the router shipped before it, a soup of R-Drop stage-2 training orders
RDROP_PAIR = Path("models/trained/banking77-gemma3-270m-lora-rdrop-pair")
RDROP_ROBUST = Path("models/trained/banking77-gemma3-270m-lora-rdrop-robust")
RDROP_ACCOUNTS = Path("models/trained/banking77-gemma3-270m-lora-rdrop-accounts")
#: what a training run measures of itself (its time and token count): not part of its recipe
MEASURED = frozenset({"train_seconds", "train_tokens"})


def unmeasured(recipe: dict, drop: frozenset[str] = frozenset()) -> dict:
    """``recipe`` without what the run measured, the keys in ``drop`` and unset flags (None:
    absent from manifests written before the flag existed)."""
    return {k: v for k, v in recipe.items() if k not in MEASURED | drop and v is not None}


def read_update(path: Path, target: str) -> np.ndarray:
    """``alpha / r * B @ A`` of ``target`` in the adapter at ``path``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    t = {x.name: np.asarray(x.data, dtype=np.float32) for x in reader.tensors}
    a, b = t[f"{target}.lora_a"], t[f"{target}.lora_b"]
    return alpha / a.shape[0] * b @ a


def test_the_soup_update_is_the_mean_of_the_updates(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    target = "blk.0.attn_q.weight"
    paths = [write_adapter(tmp_path / f"a{i}.gguf", 8.0, {
        f"{target}.lora_a": rng.normal(size=(4, 12)), f"{target}.lora_b": rng.normal(size=(6, 4))})
        for i in range(3)]
    soup = soup_adapters(paths, tmp_path / "soup.gguf")
    expected = np.mean([read_update(p, target) for p in paths], axis=0)
    got = read_update(soup, target)
    assert got.shape == (6, 12)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)


def test_adapters_of_another_shape_are_refused(tmp_path: Path) -> None:
    target = "blk.0.attn_q.weight"
    a = write_adapter(tmp_path / "a.gguf", 8.0, {f"{target}.lora_a": np.ones((4, 12)),
                                                f"{target}.lora_b": np.ones((6, 4))})
    b = write_adapter(tmp_path / "b.gguf", 8.0, {f"{target}.lora_a": np.ones((2, 12)),
                                                f"{target}.lora_b": np.ones((6, 2))})
    with pytest.raises(ValueError, match="another alpha, rank"):
        soup_adapters([a, b], tmp_path / "soup.gguf")


def test_heads_are_averaged_and_must_share_labels(tmp_path: Path) -> None:
    labels = np.array(["a", "b"])
    for i, w in enumerate((1.0, 3.0)):
        np.savez(tmp_path / f"h{i}.npz", weight=np.full((2, 3), w), bias=np.full(2, w),
                 labels=labels)
    soup_heads([tmp_path / "h0.npz", tmp_path / "h1.npz"], tmp_path / "soup.npz")
    head = np.load(tmp_path / "soup.npz")
    assert (head["weight"] == 2.0).all() and (head["bias"] == 2.0).all()
    np.savez(tmp_path / "h2.npz", weight=np.zeros((2, 3)), bias=np.zeros(2),
             labels=np.array(["a", "c"]))
    with pytest.raises(ValueError, match="other labels"):
        soup_heads([tmp_path / "h0.npz", tmp_path / "h2.npz"], tmp_path / "bad.npz")


@pytest.mark.skipif(not (STAGE1 / "manifest.json").exists(), reason="no shipped router")
def test_a_router_souped_with_itself_serves_its_labels(tmp_path: Path) -> None:
    from tests.test_merge import engine_for

    path = soup_routers([STAGE1, STAGE1], tmp_path / "soup")
    manifest = Manifest.model_validate_json(path.read_text())
    assert manifest.calibration is None and manifest.selective is None
    assert [s["name"] for s in manifest.recipe["soup_of"]] == [STAGE1.name, STAGE1.name]
    with Path("data/banking77/validation.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:30:3]
    _, original = engine_for(STAGE1 / "manifest.json")
    _, souped = engine_for(path)
    try:
        for row in rows:
            a, b = original.route(row["text"]), souped.route(row["text"])
            assert a.label == b.label, row["text"]
    finally:
        original.close()
        souped.close()


def test_routers_of_another_taxonomy_or_base_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    source = json.loads((ROBUST / "manifest.json").read_text())
    source["taxonomy"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(source))
    with pytest.raises(ValueError, match="another base model, taxonomy"):
        soup_routers([ROBUST, other], tmp_path / "soup")
    with pytest.raises(ValueError, match="two or more"):
        soup_routers([ROBUST], tmp_path / "soup")


def test_the_former_router_is_a_calibrated_soup_of_the_stored_stage_2() -> None:
    """The soup shipped before the R-Drop pair (``make soup``): its manifest names its two
    ingredients, the stored stage-2 router, pinned by its adapter's sha256, and the gold-header
    run, by its recipe; and it carries the calibration and threshold fitted on the soup itself,
    not an ingredient's."""
    shipped = Manifest.model_validate_json((SOUP / "manifest.json").read_text())
    robust = Manifest.model_validate_json((ROBUST / "manifest.json").read_text())
    first, second = shipped.recipe["soup_of"]
    assert robust.adapter is not None and first["name"] == ROBUST.name
    assert first["adapter_sha256"] == robust.adapter.sha256
    assert second["name"] == "stage2-goldheaders-1ep"
    assert (second["recipe"]["injection_headers"], second["recipe"]["injection_header_gold"]) == (
        0.6, 0.5)
    assert shipped.calibration is not None and shipped.selective is not None
    assert shipped.calibration != robust.calibration
    assert shipped.selective.threshold != robust.selective.threshold  # type: ignore[union-attr]


def test_the_r_drop_pair_is_a_calibrated_soup_of_r_drop_training_orders() -> None:
    """The router shipped before the accounts pair (``make var/soup/rdrop-pair/manifest.json``):
    the soup of the stored R-Drop stage 2, pinned by its adapter's sha256, and the same recipe run
    with other training orders (``--order-seed N``, each pinned by its recipe and adapter
    digest); it carries the calibration and the threshold fitted on the soup itself."""
    pair = Manifest.model_validate_json((RDROP_PAIR / "manifest.json").read_text())
    first_router = Manifest.model_validate_json((RDROP_ROBUST / "manifest.json").read_text())
    first, *others = pair.recipe["soup_of"]
    assert first_router.adapter is not None and first["name"] == RDROP_ROBUST.name
    assert first["adapter_sha256"] == first_router.adapter.sha256
    orders = [other["recipe"]["order_seed"] for other in others]
    assert others and len(set(orders)) == len(orders)
    assert first["recipe"]["seed"] not in orders  # the first order is the split's seed
    # the same recipe but the order: same stage 1, split and flags
    for other in others:
        assert len(other["adapter_sha256"]) == 64
        assert (unmeasured(other["recipe"], frozenset({"order_seed"}))
                == unmeasured(first["recipe"]))
    assert pair.calibration is not None and pair.selective is not None
    assert pair.calibration != first_router.calibration


def test_the_shipped_router_is_a_calibrated_soup_of_the_accounts_stage_2_and_an_r_drop_order(
) -> None:
    """The shipped router (``make router``): the soup of the stored R-Drop stage 2 with the
    accounts grammar, pinned by its adapter's sha256, whose recipe is the stored R-Drop stage 2's
    plus the accounts flags alone; and the R-Drop stage 2's second training order (order 14),
    recovered exactly from the R-Drop pair's rank-32 soup, whose recorded digest it names. It
    carries the calibration and threshold fitted on the soup itself."""
    shipped = Manifest.model_validate_json((SHIPPED / "manifest.json").read_text())
    accounts = Manifest.model_validate_json((RDROP_ACCOUNTS / "manifest.json").read_text())
    rdrop = Manifest.model_validate_json((RDROP_ROBUST / "manifest.json").read_text())
    pair = Manifest.model_validate_json((RDROP_PAIR / "manifest.json").read_text())
    first, second = shipped.recipe["soup_of"]
    assert accounts.adapter is not None and first["name"] == RDROP_ACCOUNTS.name
    assert first["adapter_sha256"] == accounts.adapter.sha256
    assert first["recipe"] == accounts.recipe

    accounts_flags = frozenset({"injection_accounts", "injection_account_gold"})
    assert (first["recipe"]["injection_accounts"], first["recipe"]["injection_account_gold"]) == (
        0.3, 0.5)
    assert unmeasured(first["recipe"], accounts_flags) == unmeasured(rdrop.recipe, accounts_flags)
    # the second ingredient: the R-Drop pair's second order, nothing else changed
    recorded = pair.recipe["soup_of"][1]
    assert second["recipe"]["order_seed"] == recorded["recipe"]["order_seed"] == 14
    assert recorded["adapter_sha256"] in second["recipe"]["recovered_from"]
    assert unmeasured(second["recipe"], frozenset({"recovered_from"})) == unmeasured(recorded["recipe"])
    assert shipped.calibration is not None and shipped.selective is not None
    assert shipped.calibration != accounts.calibration
    assert shipped.selective.threshold != accounts.selective.threshold  # type: ignore[union-attr]
