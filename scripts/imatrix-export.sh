#!/usr/bin/env bash
# An experiment's export (docs/experiments/security.md, "The twenty-fifth session"), not the
# product's: a router with a LoRA adapter, merged to F16 and quantized to Q4_K_M with an
# importance matrix (llama.cpp's llama-imatrix over serving prompts built from training rows
# only), written as a servable directory beside `thinfleet merge`'s. Measured there: one
# ticket of 1,001 gained, twice; `thinfleet merge` does not use it.
#
#   scripts/imatrix-export.sh MANIFEST MERGED_MANIFEST OUT_DIR [ROWS]
#
# MANIFEST: the router (adapter + head); MERGED_MANIFEST: its plain Q4_K_M from `thinfleet
# merge` (head, calibration and threshold are copied from it); ROWS: training prompts (2000),
# sampled from the training rows of the router's split of $BANKING77 (the shared train.csv).
# Builds llama-imatrix and llama-quantize once (about 8 min on 2 cores) from the llama.cpp
# that the pinned llama-cpp-python vendors, with the Makefile's portable flags, into
# ~/.cache/thinfleet/llama-tools/<version>/.
set -euo pipefail
manifest=$1 merged=$2 out=$3 rows=${4:-2000}
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/.venv/bin/python
version=$($py -c "import llama_cpp; print(llama_cpp.__version__)")
tools=$HOME/.cache/thinfleet/llama-tools/$version
if [ ! -x "$tools/llama-quantize" ] || [ ! -x "$tools/llama-imatrix" ]; then
  src=$(mktemp -d)
  "$root/.venv/bin/pip" download -q --no-deps --no-binary :all: -d "$src" \
    "llama-cpp-python==$version"
  tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  args=$("$root/scripts/llama-cmake-args.sh" | sed 's/-DLLAMA_BUILD_TOOLS=OFF/-DLLAMA_BUILD_TOOLS=ON/')
  # shellcheck disable=SC2086
  cmake -S "$src"/llama_cpp_python-*/vendor/llama.cpp -B "$src/build" $args \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF >/dev/null
  cmake --build "$src/build" -j "$(nproc)" --target llama-quantize llama-imatrix >/dev/null
  mkdir -p "$tools" && cp "$src"/build/bin/llama-{quantize,imatrix} "$tools/"
  rm -rf "$src"
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
$py - "$manifest" "$work" "$rows" <<'EOF'
import os, random, sys
from pathlib import Path
from models import load_taxonomy
from models.manifest import Manifest
from thinfleet.devstack import stage_model_dir
from training.merge import merge_to_f16
from training.recipe import read_labelled
from training.split import stratified_split
from worker.prompt import LABEL_CUE, TICKET_LEAD, build_prefix, fold_ticket_text

manifest, work, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
router = Manifest.model_validate_json(manifest.read_text())
rows = read_labelled(Path(os.environ.get("BANKING77", "../shared/datasets/banking77/train.csv")),
                     "text", "category")
train, _ = stratified_split(rows, router.recipe["validation_fraction"],
                            seed=router.recipe["seed"])  # the recipe's split: training rows only
prefix = build_prefix(load_taxonomy(router.taxonomy.name), router.prompt_style)
(work / "prompts.txt").write_text("".join(
    prefix + TICKET_LEAD + fold_ticket_text(t) + LABEL_CUE + "\n\n"
    for t, _ in random.Random(0).sample(train, n)))
staged = stage_model_dir(manifest)
merge_to_f16(staged.parent / router.base_model.path, staged.parent / router.adapter.path,
             work / "merged.f16.gguf")
EOF
"$tools/llama-imatrix" -m "$work/merged.f16.gguf" -f "$work/prompts.txt" \
  -o "$out/imatrix.gguf" -c 512 -t "$(nproc)" --no-ppl >"$out/imatrix.log" 2>&1
"$tools/llama-quantize" --imatrix "$out/imatrix.gguf" "$work/merged.f16.gguf" \
  "$work/model.gguf" Q4_K_M "$(nproc)" >"$out/quantize.log" 2>&1
$py - "$merged" "$work/model.gguf" "$out" <<'EOF'
import json, shutil, sys
from pathlib import Path
from worker.acquire import sha256_file

merged, gguf, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
m = json.loads(merged.read_text())
shutil.copyfile(merged.parent / m["head"]["path"], out / m["head"]["path"])
name = m["base_model"]["path"].replace(".gguf", "-imatrix.gguf")
shutil.move(gguf, out / name)
m["name"] += "-imatrix"
m["base_model"] = {"path": name, "sha256": sha256_file(out / name),
                   "bytes": (out / name).stat().st_size}
m["recipe"]["export"] += "-imatrix"
(out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
print(out / "manifest.json")
EOF
