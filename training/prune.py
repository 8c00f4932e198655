"""Layer pruning: a GGUF with only the first *k* transformer blocks (issue 16).

The router reads one hidden state through a linear head; a narrow job may not need every block
of the base model. ``prune_gguf`` keeps the first ``k`` blocks of a GGUF (``blk.0`` …
``blk.{k-1}``), the embeddings, the final norm and every non-block tensor **byte for byte** (the
Q4_K_M data is copied, not re-quantized), and rewrites ``{arch}.block_count`` to ``k``. llama.cpp
then runs the same first ``k`` blocks and applies the final norm to block ``k``'s output, which
is what ``training.finetune.RouterModel`` trains on with ``recipe.layers = k`` (transformers'
body truncated to ``layers[:k]``, ``config.num_hidden_layers = k``). Gemma 3's
sliding-window/global pattern is per layer index (every 6th block global, in llama.cpp's
``set_swa_pattern(6)`` and transformers' ``layer_types``), so a prefix of blocks keeps it.

The approach follows the layer-dropping studies of pretrained transformers (Sajjad et al. 2023,
"On the effect of dropping layers of pre-trained transformer models", arXiv:2004.03844): keep
the bottom blocks, fine-tune what is left for the task.
"""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def pruned_name(base_gguf: Path, layers: int) -> str:
    """The file name of ``base_gguf`` pruned to ``layers`` blocks:
    ``gemma-3-270m-q4_k_m.gguf`` -> ``gemma-3-270m-q4_k_m-9blocks.gguf``."""
    return f"{base_gguf.stem}-{layers}blocks.gguf"


def block_count(gguf_file: Path) -> int:
    """The ``{arch}.block_count`` of a GGUF file. Raises ``KeyError`` when it has none."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    arch = str(reader.fields["general.architecture"].contents())
    return int(reader.fields[f"{arch}.block_count"].contents())


def prune_gguf(src: Path, dst: Path, layers: int) -> Path:
    """Write ``dst``: ``src`` with only its first ``layers`` transformer blocks.

    Tensors are copied with their quantization unchanged; metadata is copied except
    ``{arch}.block_count`` (set to ``layers``) and ``general.name`` (suffixed with the block
    count). Written to ``dst.partial`` and renamed, so a reader never sees half a file.
    Raises ``ValueError`` unless ``1 <= layers <= block_count(src)``.
    """
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    total = int(reader.fields[f"{arch}.block_count"].contents())
    if not 1 <= layers <= total:
        raise ValueError(f"{src.name} has {total} blocks; cannot keep {layers}")
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = layers
        elif field.name == "general.name":
            value = f"{value} ({layers} of {total} blocks)"
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    kept = [t for t in reader.tensors
            if not (m := _BLOCK.match(t.name)) or int(m.group(1)) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    partial.replace(dst)
    return dst
