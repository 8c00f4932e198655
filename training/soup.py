"""A uniform model soup of routers trained from the same start (Wortsman et al. 2022,
arXiv:2203.05482): one router whose LoRA update and head are the means of theirs.

Two stage-2 runs from the same stage 1 pull different ways: the plain adversarial run keeps
clean accuracy, the gold-header run (``--injection-headers``) resists header attacks but loses
a few clean tickets. Their soup costs no training and, at serving time, nothing more than
either (merged, it is one Q4_K_M like any other).

The LoRA mean is exact, not an average of the factors: for routers ``i = 1..n`` with updates
``alpha / r * B_i @ A_i``, the soup stacks the ``A_i`` (rank ``n * r``), puts the ``B_i / n``
side by side and sets alpha to ``n * alpha``, so ``alpha' / r' = alpha / r`` and
``B' @ A' = mean(B_i @ A_i)``. The adapter is ``n`` times larger (rank ``n * r``); served
unmerged it costs ``n`` times the LoRA matmuls, so ship it merged (``thinfleet merge``). The
head is the mean of the heads' weights and biases. The soup has no calibration: fit it with
``thinfleet calibrate`` on rows none of the routers trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.manifest import MANIFEST_NAME, Manifest
from models.schemas import utcnow
from training.export import file_ref
from training.finetune import ADAPTER_FILE, HEAD_FILE
from training.merge import read_adapter


def soup_adapters(adapters: list[Path], out_file: Path, architecture: str = "gemma3") -> Path:
    """Write ``out_file``: the GGUF LoRA adapter whose update is the mean of ``adapters``'.

    ``*.lora_a`` tensors are ``[r, in]`` and ``*.lora_b`` ``[out, r]`` (NumPy order, as gguf-py
    reads them); the result has rank ``n * r`` and alpha ``n * alpha``, stored as F16. Raises
    ``ValueError`` when the adapters' alphas, tensor names or shapes differ.
    """
    read = [read_adapter(p) for p in adapters]
    alpha, first = read[0]
    for path, (a, tensors) in zip(adapters[1:], read[1:], strict=True):
        if a != alpha or tensors.keys() != first.keys() or any(
                tensors[k].shape != first[k].shape for k in first):
            raise ValueError(f"{path}: another alpha, rank or set of adapted tensors than "
                             f"{adapters[0]}")
    n = len(read)
    merged: dict[str, np.ndarray] = {}
    for name in first:
        parts = [tensors[name] for _, tensors in read]
        if name.endswith(".lora_a"):
            merged[name] = np.concatenate(parts, axis=0)
        elif name.endswith(".lora_b"):
            merged[name] = np.concatenate(parts, axis=1) / n
        else:
            raise ValueError(f"{name}: not a LoRA tensor (.lora_a / .lora_b)")
    return write_adapter(out_file, n * alpha, merged, architecture)


def write_adapter(out_file: Path, alpha: float, tensors: dict[str, np.ndarray],
                  architecture: str = "gemma3") -> Path:
    """Write ``out_file``: a GGUF LoRA adapter (``general.type adapter``, the metadata llama.cpp
    reads) with ``alpha`` and ``tensors`` (``name.lora_a [r, in]``, ``name.lora_b [out, r]``)
    stored as F16."""
    import gguf

    writer = gguf.GGUFWriter(str(out_file), architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def soup_heads(heads: list[Path], out_file: Path) -> Path:
    """Write ``out_file`` (``head.npz``: ``weight [labels, hidden]``, ``bias [labels]``,
    ``labels``): the mean of ``heads``. Raises ``ValueError`` when their labels differ."""
    loaded = [np.load(p) for p in heads]
    labels = loaded[0]["labels"]
    for path, head in zip(heads, loaded, strict=True):
        if list(head["labels"]) != list(labels):
            raise ValueError(f"{path}: other labels than {heads[0]}")
    np.savez(out_file, weight=np.mean([h["weight"] for h in loaded], axis=0),
             bias=np.mean([h["bias"] for h in loaded], axis=0), labels=labels)
    return out_file


def soup_routers(router_dirs: list[Path], out_dir: Path, name: str | None = None) -> Path:
    """Write ``out_dir`` (adapter, head, ``manifest.json``): the uniform soup of the head
    routers in ``router_dirs`` (two or more, each a directory with its manifest). Returns the
    manifest's path.

    The manifest is the first router's with the soup's files, ``recipe.soup_of`` naming the
    ingredients (name, adapter sha256 and recipe), and no metrics, calibration or threshold
    (fit them with ``thinfleet eval`` and ``thinfleet calibrate``). Raises ``ValueError`` when there are
    fewer than two routers, or they differ in base model, taxonomy, prompt, decoder or LoRA
    shape, or one has no adapter or head.
    """
    if len(router_dirs) < 2:
        raise ValueError("a soup needs two or more routers")
    manifests = [Manifest.model_validate_json((d / MANIFEST_NAME).read_text())
                 for d in router_dirs]
    first = manifests[0]

    def same(m: Manifest) -> tuple[object, ...]:
        return (m.base_model.sha256, m.taxonomy.sha256, m.prompt_style, m.max_ticket_tokens,
                m.decoder, m.recipe.get("layers"))

    for d, m in zip(router_dirs, manifests, strict=True):
        if m.adapter is None or m.head is None:
            raise ValueError(f"{d}: a soup needs routers with a LoRA adapter and a label head")
        if same(m) != same(first):
            raise ValueError(f"{d}: another base model, taxonomy, prompt, decoder or depth "
                             f"than {router_dirs[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = soup_adapters([d / m.adapter.path for d, m in zip(router_dirs, manifests,
                                                                 strict=True) if m.adapter],
                            out_dir / ADAPTER_FILE)
    head = soup_heads([d / m.head.path for d, m in zip(router_dirs, manifests, strict=True)
                       if m.head], out_dir / HEAD_FILE)
    depth = {k: first.recipe[k] for k in ("layers", "pruned_from_sha256") if k in first.recipe}
    soup = first.model_copy(update={
        "name": name or out_dir.name, "created_at": utcnow(), "adapter": file_ref(adapter),
        "head": file_ref(head), "metrics": {}, "calibration": None, "selective": None,
        "recipe": {**depth, "soup": "uniform (Wortsman et al. 2022, arXiv:2203.05482)",
                   "soup_of": [{"name": m.name, "adapter_sha256": m.adapter.sha256
                                if m.adapter else None, "recipe": m.recipe}
                               for m in manifests]}})
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(soup.model_dump(mode="json"), indent=2) + "\n")
    return path
