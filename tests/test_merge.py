"""``thinfleet merge``: the shipped router's adapter folded into its base and re-quantized.

Real files end to end: the packaged Gemma 3 270M Q4_K_M base, the shipped GGUF adapter and
head, llama.cpp's quantizer, and the merged model served by the same engine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from models import load_taxonomy
from models.manifest import Manifest
from thinfleet.devstack import stage_model_dir
from training.merge import export_merged
from worker.acquire import resolve_model
from worker.settings import WorkerSettings
from worker.tasks import build_engine

#: the stage-1 router (the smallest stored adapter: rank 16)
STAGE1 = Path("models/trained/banking77-gemma3-270m-lora/manifest.json")


def engine_for(manifest: Path):  # type: ignore[no-untyped-def]
    taxonomy = load_taxonomy("banking77")
    spec = resolve_model(model_uri="", model_sha256="0" * 64,
                         manifest_uri=str(stage_model_dir(manifest)), manifest_sha256=None,
                         taxonomy_sha256=taxonomy.sha256,
                         cache_dir=WorkerSettings().model_cache_dir)
    return spec, build_engine(spec, taxonomy, 2, WorkerSettings())


@pytest.mark.skipif(not STAGE1.exists(), reason="no stage-1 router")
def test_merged_router_serves_the_same_labels_without_an_adapter(tmp_path: Path) -> None:
    merged_manifest = export_merged(STAGE1, tmp_path, "Q4_K_M", threads=2)
    manifest = Manifest.model_validate_json(merged_manifest.read_text())
    assert manifest.adapter is None and manifest.head is not None
    assert manifest.recipe["export"] == "merged-Q4_K_M"
    assert not list(tmp_path.glob("*.partial"))
    with Path("data/banking77/validation.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:40:2]
    _, adapter_engine = engine_for(STAGE1)
    spec, merged_engine = engine_for(merged_manifest)
    assert spec.adapter is None
    try:
        agree = sum(adapter_engine.route(r["text"]).label == merged_engine.route(r["text"]).label
                    for r in rows)
        gold = sum(merged_engine.route(r["text"]).label == r["category"] for r in rows)
    finally:
        adapter_engine.close()
        merged_engine.close()
    assert agree >= len(rows) - 2, f"merged and adapter agree on {agree}/{len(rows)}"
    assert gold >= len(rows) * 0.8, f"merged router: {gold}/{len(rows)} correct"


def test_the_shipped_router_is_published_merged_at_its_quantization(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """What ``make demo``, docker-compose's seed and the Helm chart serve: ``thinfleet publish
    --merge`` of the shipped router (``SHIPPED_MANIFEST`` at ``SHIPPED_QUANT``) to a real S3
    endpoint, pulled back and verified as a worker does; it keeps the adapter's calibration and
    threshold, and routes as the adapter does (all but at most one of 20 tickets here; the R-Drop
    pair at Q8_0: 932 of the 1,001 validation rows right both ways)."""
    from thinfleet.cli import main
    from thinfleet.demo import SHIPPED_MANIFEST, SHIPPED_QUANT

    shipped = SHIPPED_MANIFEST.resolve()
    rows_path = Path("data/banking77/validation.csv").resolve()
    monkeypatch.chdir(tmp_path)  # the merge is cached under ./var/merged
    assert main(["publish", str(shipped), "s3://thinfleet-models/shipped", "--merge",
                 SHIPPED_QUANT, "--endpoint-url", s3_endpoint]) == 0
    published = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    taxonomy = load_taxonomy("banking77")
    spec = resolve_model(model_uri="", model_sha256="0" * 64, manifest_uri=published["manifest"],
                         manifest_sha256=published["manifest_sha256"],
                         taxonomy_sha256=taxonomy.sha256, cache_dir=tmp_path / "cache",
                         endpoint_url=s3_endpoint)
    source = Manifest.model_validate_json(shipped.read_text())
    assert source.calibration is not None and source.selective is not None
    assert spec.adapter is None and spec.name == f"{source.name}-merged-{SHIPPED_QUANT.lower()}"
    assert spec.temperature == source.calibration.temperature
    assert spec.beta == tuple(source.calibration.beta or ())
    assert spec.threshold == source.selective.threshold
    with rows_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[1:40:2]
    _, adapter_engine = engine_for(shipped)
    merged_engine = build_engine(spec, taxonomy, 2, WorkerSettings())
    try:
        agree = sum(adapter_engine.route(r["text"]).label == merged_engine.route(r["text"]).label
                    for r in rows)
    finally:
        adapter_engine.close()
        merged_engine.close()
    assert agree >= len(rows) - 1, f"merged and adapter agree on {agree}/{len(rows)}"


def test_a_router_without_an_adapter_is_refused(tmp_path: Path) -> None:
    source = Manifest.model_validate_json(STAGE1.read_text())
    bare = tmp_path / "manifest.json"
    bare.write_text(source.model_copy(update={"adapter": None}).model_dump_json())
    with pytest.raises(ValueError, match="no adapter"):
        export_merged(bare, tmp_path / "out", "Q8_0")
