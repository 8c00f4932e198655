"""Merge a router's LoRA adapter into its base model and re-quantize (Q4_K_M, Q8_0).

The other export the fine-tuning issue asks to measure beside the adapter applied at load:
one GGUF with the adapter folded in, so serving pays no extra LoRA matmuls.

1. ``merge_to_f16``: read the base GGUF and the GGUF LoRA adapter with gguf-py, dequantize
   every base weight, add ``alpha / r * B @ A`` (the LoRA update, Hu et al. 2021, eq. 3) to each
   adapted matrix, write an F16 GGUF with the base's metadata and tokenizer unchanged
   (1-D tensors stay F32);
2. ``quantize``: llama.cpp's own quantizer (``llama_model_quantize``) to Q4_K_M or Q8_0.

The base is itself Q4_K_M, so the merged model is quantized twice: the accuracy cost of that is
what ``thinfleet eval`` on the result measures.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np

from worker.acquire import sha256_file

QuantType = Literal["Q4_K_M", "Q8_0"]


def read_adapter(path: Path) -> tuple[float, dict[str, np.ndarray]]:
    """``(alpha, {tensor name: float32 array})`` of the GGUF LoRA adapter at ``path``
    (``name.lora_a [r, in]``, ``name.lora_b [out, r]``, NumPy order as gguf-py reads them)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    return alpha, {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}


def merge_to_f16(base_gguf: Path, adapter_gguf: Path, out_file: Path) -> Path:
    """Write ``out_file``: ``base_gguf`` with the LoRA ``adapter_gguf`` merged in, as F16.

    Raises ``ValueError`` when an adapter tensor has no base tensor or the shapes disagree.
    """
    import gguf

    base = gguf.GGUFReader(str(base_gguf))
    alpha, tensors = read_adapter(adapter_gguf)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        target, _, part = name.rpartition(".lora_")
        pairs.setdefault(target, {})[part] = value
    arch = str(base.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out_file), arch=arch)
    for field in base.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",
                                                             "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    merged = 0
    for t in base.tensors:
        weights = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        lora = pairs.pop(t.name, None)
        if lora is not None:
            a, b = lora["a"], lora["b"]  # (r, in), (out, r)
            delta = (alpha / a.shape[0]) * (b @ a)
            if delta.shape != weights.shape:
                raise ValueError(f"{t.name}: LoRA update {delta.shape} vs weight {weights.shape}")
            weights = weights + delta
            merged += 1
        writer.add_tensor(t.name, weights if weights.ndim == 1 else weights.astype(np.float16))
    if pairs:
        raise ValueError(f"adapter tensors with no base tensor: {sorted(pairs)[:5]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"merged {merged} LoRA pairs (alpha {alpha}) into {out_file}")
    return out_file


def quantize(src: Path, dst: Path, qtype: QuantType, threads: int = 0) -> Path:
    """Quantize the GGUF ``src`` to ``dst`` with llama.cpp; raises ``RuntimeError`` on failure."""
    import llama_cpp

    from worker.llama import init_backend

    init_backend(quiet=True)  # llama.cpp logs a line per tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[qtype]
    params.nthread = threads
    started = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src} -> {dst} ({qtype})")
    print(f"quantized {dst.name} ({qtype}, {dst.stat().st_size / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - started:.0f} s")
    return dst


def export_merged(manifest_path: Path, out_dir: Path, qtype: QuantType, threads: int = 0) -> Path:
    """A servable model directory with the router's adapter merged and quantized to ``qtype``.

    ``manifest_path`` is a router with an adapter (e.g. the shipped one); ``out_dir`` receives
    ``<name>.gguf``, the label head and a manifest with no adapter (its recipe records the
    export). Returns the new manifest's path. Raises ``ValueError`` for a manifest without an
    adapter.
    """
    import shutil

    from models.manifest import Manifest
    from thinfleet.devstack import stage_model_dir
    from training.export import write_manifest
    from worker.acquire import sha256_file

    source = Manifest.model_validate_json(manifest_path.read_text())
    if source.adapter is None:
        raise ValueError(f"{manifest_path} has no adapter to merge")
    staged = stage_model_dir(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{source.name}-merged-{qtype.lower()}"
    f16 = out_dir / f"{name}.f16.gguf.partial"
    merged = out_dir / f"{name}.gguf"
    try:
        merge_to_f16(staged.parent / source.base_model.path, staged.parent / source.adapter.path,
                     f16)
        quantize(f16, merged, qtype, threads)
    finally:
        f16.unlink(missing_ok=True)
    head = None
    if source.head is not None:
        head = out_dir / source.head.path
        shutil.copyfile(staged.parent / source.head.path, head)
    from models.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(source.taxonomy.name)
    if taxonomy.sha256 != source.taxonomy.sha256:
        raise ValueError(f"taxonomy {source.taxonomy.name} changed since {source.name} was trained")
    recipe = {**source.recipe, "export": f"merged-{qtype}",
              "merged_from": {"manifest_sha256": sha256_file(manifest_path),
                              "base_sha256": source.base_model.sha256,
                              "adapter_sha256": source.adapter.sha256}}
    return write_manifest(out_dir, name=name, base_gguf=merged, taxonomy=taxonomy, adapter=None,
                          head=head, decoder=source.decoder, prompt_style=source.prompt_style,
                          max_ticket_tokens=source.max_ticket_tokens, data=source.training_data,
                          recipe=recipe, metrics={}, calibration=source.calibration,
                          selective=source.selective)


def cached_merge(manifest_path: Path, qtype: QuantType, cache_root: Path = Path("var/merged")
                 ) -> Path:
    """``export_merged`` once per manifest and quantization: the merged directory is
    ``cache_root/<manifest sha256[:12]>-<qtype>``, reused when its manifest exists (a merge
    takes 20-30 s on 2 cores). Returns the merged manifest's path. Progress goes to stderr, so
    a shell can capture the printed path alone. Raises ``ValueError`` for a manifest without an
    adapter."""
    out = cache_root / f"{sha256_file(manifest_path)[:12]}-{qtype.lower()}"
    if (out / "manifest.json").exists():
        return out / "manifest.json"
    print(f"merging the router's LoRA adapter into its base model ({qtype}) in {out}",
          file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        return export_merged(manifest_path, out, qtype)
