"""Model manifests: every file pinned, taxonomy hash checked, label head served by the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import load_taxonomy
from models.errors import ModelUnavailable
from training.export import write_manifest
from worker.acquire import resolve_model, sha256_file


def make_model_dir(tmp_path: Path, model_file: Path, taxonomy_name: str = "banking77",
                   bias_index: int = 1) -> Path:
    """A manifest with the real base GGUF and a synthetic head that always prefers one label."""
    taxonomy = load_taxonomy(taxonomy_name)
    out = tmp_path / "model"
    out.mkdir()
    (out / model_file.name).symlink_to(model_file)
    bias = np.zeros(len(taxonomy.labels), dtype=np.float32)
    bias[bias_index] = 5.0
    np.savez(out / "head.npz", weight=np.zeros((len(taxonomy.labels), 640), np.float32),
             bias=bias, labels=np.array(taxonomy.label_names))
    return write_manifest(out, name="synthetic-head", base_gguf=out / model_file.name,
                          taxonomy=taxonomy, adapter=None, head=out / "head.npz",
                          decoder="head", prompt_style="compact", max_ticket_tokens=64,
                          data=None, recipe={}, metrics={})


def resolve(manifest: Path, cache: Path, taxonomy_sha: str, pin: str | None = None):  # type: ignore[no-untyped-def]
    return resolve_model(model_uri="", model_sha256="0" * 64, manifest_uri=str(manifest),
                         manifest_sha256=pin, taxonomy_sha256=taxonomy_sha, cache_dir=cache)


def test_manifest_model_routes_with_its_head(tmp_path: Path, model_file: Path) -> None:
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    taxonomy = load_taxonomy("banking77")
    manifest = make_model_dir(tmp_path, model_file)
    spec = resolve(manifest, tmp_path / "cache", taxonomy.sha256, pin=sha256_file(manifest))
    assert spec.decoder == "head" and spec.head and spec.max_ticket_tokens == 64
    assert spec.sha256 == sha256_file(manifest)
    engine = build_engine(spec, taxonomy, 2, WorkerSettings())
    try:
        outcome = engine.route("I am still waiting on my card?")
        hidden = engine.runtime.last_hidden  # the last token's final hidden state
    finally:
        engine.close()
    assert hidden is not None
    assert hidden.shape == (640,) and np.isfinite(hidden).all() and np.linalg.norm(hidden) > 1
    expected = np.exp(5.0) / (np.exp(5.0) + len(taxonomy.labels) - 1)
    assert outcome.label == taxonomy.label_names[1]
    assert outcome.confidence == pytest.approx(expected, rel=1e-5)
    assert outcome.tokens_out == 0  # the head decides: no decode step at all


def test_manifest_for_another_taxonomy_is_refused(tmp_path: Path, model_file: Path) -> None:
    manifest = make_model_dir(tmp_path, model_file)
    with pytest.raises(ModelUnavailable, match="trained for taxonomy banking77"):
        resolve(manifest, tmp_path / "cache", load_taxonomy("ecommerce").sha256)


def test_tampered_head_is_refused(tmp_path: Path, model_file: Path) -> None:
    manifest = make_model_dir(tmp_path, model_file)
    (manifest.parent / "head.npz").write_bytes(b"not the head")
    with pytest.raises(ModelUnavailable, match="sha256"):
        resolve(manifest, tmp_path / "cache", load_taxonomy("banking77").sha256)


def test_pinned_manifest_must_match(tmp_path: Path, model_file: Path) -> None:
    manifest = make_model_dir(tmp_path, model_file)
    with pytest.raises(ModelUnavailable, match="refusing it"):
        resolve(manifest, tmp_path / "cache", load_taxonomy("banking77").sha256, pin="f" * 64)


def test_malformed_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format": "thinfleet-manifest/1", "name": "x"}))
    with pytest.raises(ModelUnavailable, match="invalid"):
        resolve(path, tmp_path / "cache", load_taxonomy("banking77").sha256)


def test_head_model_still_generates_extraction_fields(tmp_path: Path, model_file: Path) -> None:
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    taxonomy = load_taxonomy("ecommerce")
    manifest = make_model_dir(tmp_path, model_file, "ecommerce")
    spec = resolve(manifest, tmp_path / "cache", taxonomy.sha256)
    engine = build_engine(spec, taxonomy, 2, WorkerSettings())
    try:
        outcome = engine.route("The kettle I ordered arrived but it does not heat up")
    finally:
        engine.close()
    assert outcome.label == "Product Defect or Problem"
    assert set(outcome.fields) == {"product_name", "brief_description"}
    assert all(isinstance(v, str) and v for v in outcome.fields.values())
