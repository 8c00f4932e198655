"""The embeddings tax, measured: the label head's hidden state with and without it.

In embeddings mode llama.cpp outputs every token of a batch, so reading the last token's hidden
state with one decode in that mode ran the 262k-row output layer for every ticket token
(``taxed``). The first fix decoded all but the last token with embeddings off and the last
alone with them on (``two_step``: the output layer still ran twice, and the last token paid a
pass of its own). ``LlamaRuntime.decode_hidden`` now decodes the ticket once, embeddings off,
and stops llama.cpp's graph at the final hidden state (``tap``: no output layer at all). On the
validation split, in one process, same model, each ticket through every path in rotating order:

* agreement with ``taxed``: tickets with the same label, the largest confidence difference,
  and the accuracy of each path against the gold intents;
* speed: median and p95 of the ticket's decode time per path, and each path's speed-up over
  ``taxed``.

    .venv/bin/python -m bench.embeddings_tax --tickets 1001 --threads 2
    .venv/bin/python -m bench.embeddings_tax --model adapter    # adapter applied at load
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

VALIDATION = Path("data/banking77/validation.csv")
OUT = Path("var/bench/embeddings_tax.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=1001)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=["merged", "adapter"], default="merged",
                        help="the merged Q4_K_M the fleet serves (default) or base + adapter")
    args = parser.parse_args(argv)

    from models import load_taxonomy
    from models.manifest import Manifest
    from thinfleet.demo import SHIPPED_MANIFEST, merged_router
    from training.calibrate_model import open_engine
    from worker.prompt import encode_ticket

    manifest_path = merged_router() if args.model == "merged" else SHIPPED_MANIFEST
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    engine = open_engine(manifest_path, load_taxonomy(manifest.taxonomy.name),
                              threads=args.threads)
    head = engine.head
    assert head is not None
    with VALIDATION.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:args.tickets]
    rt, base = engine.runtime, engine.prefix_len
    decoders = {"taxed": rt.decode_all_outputs,
                "two_step": lambda ids, pos: two_step(rt, ids, pos),
                "tap": rt.decode_hidden}
    paths = list(decoders)
    times: dict[str, list[float]] = {path: [] for path in paths}
    labels: dict[str, list[str]] = {path: [] for path in paths}
    conf: dict[str, list[float]] = {path: [] for path in paths}
    for i, row in enumerate(rows):
        ids, _ = encode_ticket(rt.tokenize, row["text"], None, engine.max_ticket_tokens)
        for path in paths[i % len(paths):] + paths[:i % len(paths)]:
            started = time.perf_counter()
            hidden = decoders[path](ids, base)
            times[path].append((time.perf_counter() - started) * 1000)
            rt.forget(0, base)
            probs = head.probabilities(hidden)
            labels[path].append(head.labels[int(np.argmax(probs))])
            conf[path].append(float(probs.max()))
    engine.close()
    gold = [row["category"] for row in rows]
    report = {
        "model": args.model, "tickets": len(rows), "threads": args.threads,
        **{f"{path}_{name}": value for path in paths for name, value in (
            ("same_label", sum(a == b for a, b in zip(labels["taxed"], labels[path], strict=True))),
            ("max_confidence_diff", max(abs(a - b) for a, b in
                                        zip(conf["taxed"], conf[path], strict=True))),
            ("accuracy", sum(p == g for p, g in zip(labels[path], gold, strict=True)) / len(rows)),
            ("p50_ms", statistics.median(times[path])),
            ("p95_ms", float(np.percentile(times[path], 95))),
            ("speedup_p50", statistics.median(times["taxed"]) / statistics.median(times[path])))},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def two_step(rt: Any, ids: list[int], pos0: int) -> np.ndarray:
    """The first fix (kept to measure against): all but the last token with embeddings off
    (one logits row), then the last alone in embeddings mode (logits and hidden state)."""
    import llama_cpp

    if len(ids) > 1:
        rt.decode(ids[:-1], pos0)
    llama_cpp.llama_set_embeddings(rt.ctx, True)
    try:
        rt.decode(ids[-1:], pos0 + len(ids) - 1)
        return rt.embedding()
    finally:
        llama_cpp.llama_set_embeddings(rt.ctx, False)


if __name__ == "__main__":
    raise SystemExit(main())
