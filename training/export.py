"""Export a trained router: PEFT adapter -> GGUF LoRA adapter, plus head and manifest.

The served model is the base Q4_K_M GGUF with the LoRA adapter applied at load
(``llama_adapter_lora_init``), plus the label head (``head.npz``). Training saw the dequantized
Q4_K_M weights, so the adapter was trained against exactly what llama.cpp serves, and the
artifact stays small (~8 MB at rank 16, f16) instead of a 250 MB re-quantized merge.

The converter is llama.cpp's ``convert_lora_to_gguf.py``, taken from the llama-cpp-python
source distribution of the version the worker runs (fetched once from PyPI into
``~/.cache/thinfleet/src``), with its bundled ``gguf-py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from models.manifest import (
    MANIFEST_NAME,
    Calibration,
    DataRef,
    FileRef,
    Manifest,
    SelectiveRouting,
    TaxonomyRef,
)
from models.taxonomy import Taxonomy
from worker.acquire import sha256_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SRC_CACHE = Path.home() / ".cache" / "thinfleet" / "src"
_MEMBERS = ("vendor/llama.cpp/convert_lora_to_gguf.py", "vendor/llama.cpp/convert_hf_to_gguf.py",
            "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


def llama_cpp_source(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The ``vendor/llama.cpp`` directory holding the converters (downloaded once)."""
    root = SRC_CACHE / f"llama_cpp_python-{version}"
    target = root / "vendor" / "llama.cpp"
    if (target / "convert_lora_to_gguf.py").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={version}", "-d", tmp, "-q"], check=True)
        [archive] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            prefix = f"llama_cpp_python-{version}/"
            members = [m for m in tar.getmembers()
                       if any(m.name.startswith(prefix + p) for p in _MEMBERS)]
            tar.extractall(SRC_CACHE, members=members, filter="data")
    return target


def convert_adapter(peft_dir: Path, base_config_dir: Path, out_file: Path) -> Path:
    """Convert a PEFT LoRA adapter to a GGUF adapter (f16).

    Raises ``RuntimeError`` with the converter's last output lines when it fails.
    """
    src = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    done = subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base",
                           str(base_config_dir), "--outtype", "f16", "--outfile", str(out_file),
                           str(peft_dir)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"convert_lora_to_gguf.py failed ({done.returncode}):\n{tail}")
    return out_file


def file_ref(path: Path) -> FileRef:
    """A manifest entry for ``path`` (its name, sha256 and size)."""
    return FileRef(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)


def data_ref(source: Path, train_rows: int, validation_rows: int, split: str) -> DataRef:
    """A manifest entry for the labelled data file."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    return DataRef(source=source.name, sha256=digest, train_rows=train_rows,
                   validation_rows=validation_rows, split=split)


def write_manifest(out_dir: Path, *, name: str, base_gguf: Path, taxonomy: Taxonomy,
                   adapter: Path | None, head: Path | None, decoder: Literal["head", "trie"],
                   prompt_style: Literal["catalog", "compact"],
                   max_ticket_tokens: int, data: DataRef | None, recipe: dict,
                   metrics: dict, calibration: Calibration | None = None,
                   selective: SelectiveRouting | None = None) -> Path:
    """Write ``out_dir/manifest.json``; every file but the base must already be in ``out_dir``."""
    manifest = Manifest(
        name=name, base_model=file_ref(base_gguf),
        adapter=file_ref(adapter) if adapter else None, head=file_ref(head) if head else None,
        decoder=decoder, prompt_style=prompt_style,
        max_ticket_tokens=max_ticket_tokens,
        taxonomy=TaxonomyRef(name=taxonomy.name, sha256=taxonomy.sha256,
                             labels=len(taxonomy.labels)),
        training_data=data, recipe=recipe, metrics=metrics, calibration=calibration,
        selective=selective)
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path
