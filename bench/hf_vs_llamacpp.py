"""Do transformers (training) and llama.cpp (serving) compute the same final hidden state?

The label head is trained on transformers' last hidden state of the dequantized Q4_K_M GGUF and
served on llama.cpp's. This loads both for the same token ids, without and with a LoRA adapter
(a seeded random one, exported with the recipe's own converter), and prints the cosine and the
relative error of the two vectors. Needs the training extras (``make install-train``).

    .venv/bin/python -m bench.hf_vs_llamacpp
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

TEXT = "Classify the query.\n\nTicket: I am still waiting on my card?\nCategory:"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from thinfleet.devstack import base_model_file
    from training.export import convert_adapter
    from training.finetune import save_base_config
    from worker.llama import LlamaRuntime

    torch.manual_seed(0)
    base = base_model_file()
    hf = AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name,
                                              dtype=torch.float32)
    hf.config.architectures = [type(hf).__name__]
    plain = LlamaRuntime(base, n_ctx=256, n_threads=2, embeddings=True)
    ids = plain.tokenize(TEXT, add_bos=True)
    cpp_base = plain.decode_hidden(ids, 0)
    with torch.no_grad():
        hf_base = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()
    peft = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        peft.save_pretrained(str(work / "adapter-hf"))
        save_base_config(hf.config, work / "base-config")
        adapter = convert_adapter(work / "adapter-hf", work / "base-config", work / "a.gguf")
        lora = LlamaRuntime(base, n_ctx=256, n_threads=2, lora_path=adapter, embeddings=True)
        cpp_lora = lora.decode_hidden(ids, 0)
    with torch.no_grad():
        hf_lora = peft.base_model.model.model(
            input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()

    def compare(a: np.ndarray, b: np.ndarray) -> str:
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        return f"cosine {cos:.4f}, relative error {np.linalg.norm(a - b) / np.linalg.norm(a):.3f}"

    print(f"base:        transformers vs llama.cpp: {compare(hf_base, cpp_base)}")
    print(f"with LoRA:   transformers vs llama.cpp: {compare(hf_lora, cpp_lora)}")
    print(f"LoRA effect: transformers base vs LoRA:  {compare(hf_base, hf_lora)}")


if __name__ == "__main__":
    main()
