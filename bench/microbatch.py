"""Does micro-batching pay on this CPU? Several tickets as separate sequences in one llama_batch.

The shipped fine-tuned router (adapter + label head) needs one forward pass per ticket over the
ticket's own tokens, after a shared prefix. Here ``k`` waiting tickets become sequences 1..k of
one ``llama_batch`` (each sequence sees the prefix through ``llama_memory_seq_cp`` in the
unified KV cache, and its own tokens through llama.cpp's per-sequence attention mask), one
``llama_decode`` computes all of them, and each ticket's last hidden state goes through the head.
Compared with the same tickets one at a time on the same context, alternating, median of
repetitions; the labels must agree.

    .venv/bin/python -m bench.microbatch --reps 5 --tickets 24 --threads 1,2
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp
import numpy as np

from bench.routing import ROUTER, load_tickets

BATCH_SIZES = (1, 2, 4, 8)


class MultiSeqRouter:
    """The head router's forward pass for up to ``max_k`` tickets per ``llama_decode``."""

    def __init__(self, threads: int, max_k: int, n_ubatch: int):
        from models import load_taxonomy
        from models.manifest import Manifest
        from thinfleet.devstack import stage_model_dir
        from worker.engine import LabelHead
        from worker.llama import LlamaRuntime
        from worker.prompt import build_prefix, encode_ticket

        staged = stage_model_dir(ROUTER)
        manifest = Manifest.model_validate_json(staged.read_text())
        assert manifest.adapter is not None and manifest.head is not None
        taxonomy = load_taxonomy(manifest.taxonomy.name)
        self.head = LabelHead.load(staged.parent / manifest.head.path)
        self.max_ticket_tokens = manifest.max_ticket_tokens
        self.encode = encode_ticket
        prefix = build_prefix(taxonomy, manifest.prompt_style)
        n_batch = max_k * (self.max_ticket_tokens + 8)
        self.rt = LlamaRuntime(staged.parent / manifest.base_model.path,
                               n_ctx=len(prefix) + n_batch + 64, n_threads=threads,
                               n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=max_k + 1,
                               lora_path=staged.parent / manifest.adapter.path, embeddings=True)
        self.prefix_ids = self.rt.tokenize(prefix, add_bos=True)
        self.rt.decode(self.prefix_ids, 0, seq_id=0)
        for seq in range(1, max_k + 1):  # every sequence sees the prefix's cells
            llama_cpp.llama_memory_seq_cp(self.rt.memory, 0, seq, -1, -1)

    def route_many(self, texts: list[str]) -> list[str]:
        """Labels of ``texts`` from one ``llama_decode`` (sequences 1..len(texts))."""
        rt, base = self.rt, len(self.prefix_ids)
        batch = rt._batch
        n = 0
        for seq, text in enumerate(texts, start=1):
            ids, _ = self.encode(rt.tokenize, text, None, self.max_ticket_tokens)
            for i, token in enumerate(ids):
                batch.token[n] = token
                batch.pos[n] = base + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = 1 if i == len(ids) - 1 else 0
                n += 1
        batch.n_tokens = n
        try:
            hidden_rows = rt.decode_batch_hidden()  # one row per ticket, in batch order
            labels = [self.head.labels[int(np.argmax(self.head.probabilities(hidden)))]
                      for hidden in hidden_rows]
        finally:
            for seq in range(1, len(texts) + 1):
                rt.forget(seq, base)
        return labels


def per_ticket_ms(router: MultiSeqRouter, tickets: list[str], k: int) -> tuple[float, list[str]]:
    """Mean ms per ticket routing ``tickets`` in groups of ``k``, and the labels."""
    labels: list[str] = []
    started = time.perf_counter()
    for i in range(0, len(tickets), k):
        labels += router.route_many(tickets[i:i + k])
    return (time.perf_counter() - started) * 1000 / len(tickets), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tickets", type=int, default=24)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ubatch", type=int, default=512)
    args = parser.parse_args()
    tickets = load_tickets(args.tickets)
    print(f"{len(tickets)} tickets, {args.reps} repetitions, shipped router (adapter + head), "
          f"n_ubatch {args.ubatch}; mean ms per ticket, median over repetitions\n")
    print("| threads | " + " | ".join(f"k={k}" for k in BATCH_SIZES) + " | best vs k=1 |")
    print("| --- | " + " | ".join("---" for _ in BATCH_SIZES) + " | --- |")
    for threads in (int(t) for t in args.threads.split(",")):
        router = MultiSeqRouter(threads, max(BATCH_SIZES), args.ubatch)
        _, reference = per_ticket_ms(router, tickets, 1)  # warm-up and the labels to agree with
        runs: dict[int, list[float]] = {k: [] for k in BATCH_SIZES}
        for _ in range(args.reps):
            for k in BATCH_SIZES:
                ms, labels = per_ticket_ms(router, tickets, k)
                agree = sum(a == b for a, b in zip(labels, reference, strict=True))
                if agree < len(tickets) - 1:
                    raise AssertionError(f"k={k}: only {agree}/{len(tickets)} labels agree")
                runs[k].append(ms)
        med = {k: statistics.median(v) for k, v in runs.items()}
        best = min(med, key=lambda k: med[k])
        print(f"| {threads} | " + " | ".join(f"{med[k]:.0f}" for k in BATCH_SIZES) +
              f" | {med[1] / med[best]:.2f}× (k={best}) |", flush=True)
        router.rt.close()


if __name__ == "__main__":
    main()
