"""Routing speed, side by side, in one process: same model file, same machine, same tickets.

Systems (each repetition runs them in turn, A/B/C/D, so drift hits them alike):

* ``article``   the reference article's way: a fresh context per ticket, the full system prompt
                (the label catalog) plus the ticket evaluated every time, free greedy JSON
                generation (``{"issue_classification": "..."}``) parsed afterwards;
* ``server``    llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``,
                same model, same threads), driven by a plain HTTP client with the article's
                prompt: ``/v1/completions``, greedy, stop at ``}``, JSON parsed afterwards. Its
                ``Llama`` keeps the longest common token prefix of consecutive prompts in the KV
                cache, so it gets prefix reuse for free; what it lacks is the label trie;
* ``server_tuned`` the same server the way a careful user would drive it (issue 16: the ratio
                must not flatter thinfleet): thinfleet's own catalog prompt (the same prefix as
                ``trie``, so the server's prefix reuse covers it), the answer as a plain label
                after ``Category:``, stop at the newline, ``max_tokens`` = the longest label's
                tokens + 1, greedy;
* ``trie``      thinfleet's engine with the base model: prefix cache + label trie;
* ``head``      thinfleet's engine with the shipped fine-tuned router: compact prefix cache +
                LoRA adapter + label head (one forward pass, no decoding);
* ``floor``     each ticket's own tokens in one ``llama_decode`` with one logits row (measured
                in the same run): no generating system can be cheaper on this hardware;
* ``floor_head`` each ticket's own tokens through the model's blocks, no output row at all: no
                label-head router can be cheaper (``measure_floor``).

Reported: median over repetitions of each run's p50 and p95 per-ticket latency, tickets/s
(1 / mean latency, one thread of work), and ratios to the article's way and to each system's
floor (``floor_head`` for label-head routers, ``floor`` for the rest).

    .venv/bin/python -m bench.routing --reps 5 --tickets 12
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.taxonomy import Taxonomy
from thinfleet.demo import SHIPPED_MANIFEST

SAMPLE = Path("data/banking77/sample.csv")
#: the shipped router (its head; the cost of a ticket does not depend on the weights' values)
ROUTER = SHIPPED_MANIFEST


def load_tickets(n: int) -> list[str]:
    """``n`` tickets spread over the sample's intents (every k-th row)."""
    with SAMPLE.open(newline="") as handle:
        rows = [row["text"] for row in csv.DictReader(handle)]
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def fields_taxonomy() -> Taxonomy:
    """Banking77 with the ecommerce taxonomy's two extraction fields (product_name,
    brief_description): the "extraction fields on" variant of every benchmark."""
    from models import load_taxonomy

    return load_taxonomy("banking77").model_copy(
        update={"fields": load_taxonomy("ecommerce").fields})


class ArticleWay:
    """Fresh context per ticket, catalog prompt, free JSON generation parsed afterwards."""

    def __init__(self, model: Path, labels: list[str], threads: int, max_new_tokens: int = 40,
                 fields: tuple[str, ...] = ()):
        from worker.llama import LlamaRuntime

        self.labels = labels
        self.max_new_tokens = max_new_tokens + 40 * len(fields)
        catalog = "\n".join(f"- {label}" for label in labels)
        properties = ", ".join(f"`{name}`" for name in (*fields, "issue_classification"))
        self.system = ("You are an AI designed to assist in interpreting customer support tickets."
                       " Classify the ticket into one of the following categories:\n"
                       f"{catalog}\nReturn the information as a JSON string with "
                       f"{len(fields) + 1} {'property' if not fields else 'properties'}: "
                       f"{properties}.\n\n")
        self.rt = LlamaRuntime(model, n_ctx=2048, n_threads=threads, n_batch=512, n_ubatch=128)

    def route(self, text: str) -> str | None:
        rt = self.rt
        rt.clear()
        prompt = rt.tokenize(f"{self.system}Ticket: {text}\nJSON: ", add_bos=True)
        logits = rt.decode(prompt, 0)
        pos, out = len(prompt), bytearray()
        for _ in range(self.max_new_tokens):
            token = int(np.argmax(logits))
            if rt.is_eog(token):
                break
            out += rt.piece(token)
            if b"}" in out:
                break
            logits = rt.decode([token], pos)
            pos += 1
        try:
            label = json.loads(out[:out.index(b"}") + 1]).get("issue_classification")
        except (ValueError, AttributeError):
            return None
        return label if label in self.labels else None


class ServerWay:
    """``python -m llama_cpp.server`` in a subprocess, one HTTP request per ticket.

    Needs the server's dependencies (``pip install -e '.[bench]'``). Raises ``RuntimeError``
    when the server does not come up within ``boot_timeout_s``.
    """

    def __init__(self, model: Path, system: str, labels: list[str], threads: int,
                 max_tokens: int = 40, log: Path = Path("var/bench-server.log"),
                 boot_timeout_s: float = 120.0):
        import subprocess
        import sys
        import urllib.request

        from thinfleet.devstack import free_port

        self.system, self.labels, self.max_tokens = system, labels, max_tokens
        self.url = f"http://127.0.0.1:{free_port()}"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
             "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--n_ctx", "2048",
             "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--n_batch", "512", "--verbose", "False"], stdout=self._log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + boot_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"llama_cpp.server did not start (see {log})") from exc
                time.sleep(0.5)

    def complete(self, prompt: str, max_tokens: int, stop: list[str]) -> str:
        """One greedy ``/v1/completions`` request; the completion's text."""
        import urllib.request

        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "stop": stop}).encode()
        request = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return str(json.loads(response.read())["choices"][0]["text"])

    def route_tuned(self, prefix: str, max_tokens: int) -> Callable[[str], str | None]:
        """The careful user's way (module docstring): ``prefix`` + ticket + ``Category:``,
        stop at the newline, at most ``max_tokens``; the label if the answer is one."""
        from worker.prompt import LABEL_CUE, TICKET_LEAD, fold_ticket_text

        def route(text: str) -> str | None:
            answer = self.complete(f"{prefix}{TICKET_LEAD}{fold_ticket_text(text)}{LABEL_CUE}",
                                   max_tokens, ["\n"]).strip()
            return answer if answer in self.labels else None
        return route

    def route(self, text: str) -> str | None:
        completion = self.complete(f"{self.system}Ticket: {text}\nJSON: ", self.max_tokens,
                                   ["}"])
        try:
            label = json.loads(completion + "}").get("issue_classification")
        except (ValueError, AttributeError):
            return None
        return label if label in self.labels else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 (shutting down a benchmark helper)
            self.proc.kill()
        self._log.close()


def measure_floor(model: Path, threads: int, tickets: list[list[int]]
                  ) -> tuple[list[float], list[float]]:
    """Each ticket's floor on ``model``, ms: (its tokens decoded with one logits row, the least
    a generating system needs for its first answer token; its tokens through the blocks with
    no output row at all, ``LlamaRuntime.prefill``, the least a label-head router needs).

    ``tickets``: token ids of each ticket's part of the prompt. Each is decoded after the BOS
    token alone, in one ``llama_decode`` like the engines' own, and then dropped.
    """
    from worker.llama import LlamaRuntime

    rt = LlamaRuntime(model, n_ctx=1024, n_threads=threads, n_batch=256, n_ubatch=128)
    rt.prefill([rt.bos], 0)
    with_logits, blocks_only = [], []
    for ids in tickets:
        started = time.perf_counter()
        rt.decode(ids, 1)
        with_logits.append((time.perf_counter() - started) * 1000)
        rt.forget(0, 1)
        started = time.perf_counter()
        rt.prefill(ids, 1)
        blocks_only.append((time.perf_counter() - started) * 1000)
        rt.forget(0, 1)
    rt.close()
    return with_logits, blocks_only


def run_system(route: Callable[[str], object], tickets: list[str]) -> list[float]:
    """Per-ticket latencies (ms) of one pass over ``tickets``."""
    times = []
    for text in tickets:
        started = time.perf_counter()
        route(text)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tickets", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="0: all available CPUs")
    parser.add_argument("--no-server", action="store_true", help="skip llama_cpp.server")
    parser.add_argument("--fields", action="store_true",
                        help="extraction fields on: product_name and brief_description (the "
                        "ecommerce taxonomy's) generated after the label, by every system")
    parser.add_argument("--manifest", action="append", default=[], metavar="NAME=PATH",
                        help="another head router to compare, e.g. merged=var/merged/manifest.json")
    args = parser.parse_args()

    from models import load_taxonomy
    from thinfleet.devstack import base_model_file, stage_model_dir
    from worker.acquire import resolve_model
    from worker.cpus import available_cpus
    from worker.engine import RoutingEngine
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    threads = args.threads or available_cpus()
    taxonomy = load_taxonomy("banking77")
    pinned_sha256 = taxonomy.sha256  # what the routers' manifests were trained for
    if args.fields:
        taxonomy = fields_taxonomy()
    field_names = tuple(f.name for f in taxonomy.fields)
    model = base_model_file()
    tickets = load_tickets(args.tickets)
    systems: dict[str, Callable[[str], object]] = {}
    article = ArticleWay(model, taxonomy.label_names, threads, fields=field_names)
    systems["article"] = article.route
    server = tuned = None
    if not args.no_server:
        server = ServerWay(model, article.system, taxonomy.label_names, threads,
                           max_tokens=article.max_new_tokens)
        systems["server"] = server.route
        if not args.fields:
            from worker.llama import load_vocab
            from worker.prompt import build_prefix

            vocab = load_vocab(model)
            longest = max(len(vocab.tokenize(" " + label)) for label in taxonomy.label_names)
            # its own server process: alternating two prompts on one server would evict the
            # other's prefix from its cache at every switch
            tuned = ServerWay(model, article.system, taxonomy.label_names, threads,
                              log=Path("var/bench-server-tuned.log"))
            systems["server_tuned"] = tuned.route_tuned(build_prefix(taxonomy, "catalog"),
                                                        longest + 1)
    trie = RoutingEngine(model, taxonomy, n_threads=threads)
    systems["trie"] = trie.route
    heads = {"head": ROUTER} if ROUTER.exists() else {}
    heads.update({name: Path(path) for name, _, path in
                  (item.partition("=") for item in args.manifest)})
    for name, manifest in heads.items():
        spec = resolve_model(model_uri="", model_sha256="0" * 64,
                             manifest_uri=str(stage_model_dir(manifest)), manifest_sha256=None,
                             taxonomy_sha256=pinned_sha256,
                             cache_dir=WorkerSettings().model_cache_dir)
        systems[name] = build_engine(spec, taxonomy, threads, WorkerSettings()).route
    from worker.prompt import encode_ticket

    ticket_ids = [encode_ticket(trie.runtime.tokenize, t, None, 256)[0] for t in tickets]
    runs: dict[str, list[list[float]]] = {name: [] for name in [*systems, "floor", "floor_head"]}
    for route in systems.values():  # warm-up, not timed
        route(tickets[0])
    for rep in range(args.reps):
        for name, route in systems.items():
            runs[name].append(run_system(route, tickets))
        with_logits, blocks_only = measure_floor(model, threads, ticket_ids)
        runs["floor"].append(with_logits)
        runs["floor_head"].append(blocks_only)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{k} p50 {statistics.median(v[-1]):.0f} ms" for k, v in runs.items()), flush=True)

    def summary(name: str) -> dict[str, float]:
        p50 = statistics.median(statistics.median(r) for r in runs[name])
        p95 = statistics.median(float(np.percentile(r, 95)) for r in runs[name])
        mean = statistics.median(statistics.mean(r) for r in runs[name])
        return {"p50": p50, "p95": p95, "tps": 1000 / mean, "mean": mean}

    for process in (server, tuned):
        if process is not None:
            process.close()
    table = {name: summary(name) for name in runs}
    print(f"\n{len(tickets)} Banking77 tickets, {args.reps} repetitions, {threads} threads, "
          f"{'fields ' + ', '.join(field_names) if field_names else 'label-only'}, "
          f"median of per-run figures\n")
    print("| system | p50 ms | p95 ms | tickets/s | speed-up vs article | × its floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in table.items():
        floor = table["floor_head" if name in heads or name == "floor_head" else "floor"]
        print(f"| {name} | {row['p50']:.0f} | {row['p95']:.0f} | {row['tps']:.2f} | "
              f"{table['article']['mean'] / row['mean']:.1f}× | "
              f"{row['mean'] / floor['mean']:.2f} |")


if __name__ == "__main__":
    main()
