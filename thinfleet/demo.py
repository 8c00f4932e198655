"""``thinfleet demo``: the whole fleet, end to end, on real tickets.

Two jobs (``--job``): ``banking77`` (the default: 603 real Banking77 tickets, 77 intents, the
shipped Banking77 router) and ``ecommerce`` (the reference article's job: the 165 held-out
tickets of ``data/ecommerce/test.jsonl``, three classes plus ``product_name`` and
``brief_description``, the shipped ``ecommerce`` router; the summary adds field accuracy).

1. Redis: use ``THINFLEET_REDIS_URL`` if it answers, else start a redis-server (installing
   Debian's package if needed).
2. S3: start moto's S3 server and upload the model: by default the shipped fine-tuned router
   (``JOBS``: LoRA adapter and label head over the Gemma 3 270M Q4_K_M base from its PyPI
   package), merged into one file quantized to ``SHIPPED_QUANT`` on first use
   (``thinfleet merge``); ``--model adapter`` serves the adapter applied at
   load instead, ``--model base`` the bare base model.
3. Worker: one ``thinfleet worker`` with N prefork children, pulling the model from S3 into a
   fresh cache (so the S3 path is the one exercised).
4. Backfill the sample, follow the results stream until every ticket is routed or
   dead-lettered, and print throughput, latency, route distribution, accuracy against the
   gold intents, child memory, and a few routed results.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models import keys, load_taxonomy
from models.taxonomy import Taxonomy
from thinfleet import devstack
from worker.acquire import sha256_file

if TYPE_CHECKING:
    from training.merge import QuantType

VAR = Path("var/demo")
SHIPPED_MANIFEST = Path("models/trained/banking77-gemma3-270m-lora-accounts-pair/manifest.json")
#: how the shipped router is merged for serving (``thinfleet merge --quant``): at Q8_0 the
#: accounts pair routes 930 of the 1,001 validation rows and passed issue 12's gate at 400
#: tickets (docs/experiments/security.md, "The accounts pair's gate"); Q8_0 costs a median 4 %
#: more time per ticket than Q4_K_M ("The twenty-seventh session")
SHIPPED_QUANT: QuantType = "Q8_0"


@dataclass(frozen=True)
class DemoJob:
    """What one demo routes: a taxonomy, a sample file and its columns, the shipped router."""

    taxonomy: str
    sample: Path
    id_column: str
    label_column: str
    manifest: Path
    #: how the router is served by default: ``shipped`` (merged into one file quantized to
    #: ``SHIPPED_QUANT``) or ``adapter`` (applied at load)
    serve: str = "shipped"


JOBS = {
    "banking77": DemoJob("banking77", Path("data/banking77/sample.csv"), "ticket_id", "category",
                         SHIPPED_MANIFEST),
    # The ecommerce router is served with its adapter applied at load: merged and quantized
    # again, its product_name exact match fell from 89.1 % to 80.0 % on the same tickets at
    # the same fleet speed (README, "Extraction fields").
    "ecommerce": DemoJob("ecommerce", Path("data/ecommerce/test.jsonl"), "id",
                         "issue_classification",
                         Path("models/trained/ecommerce-gemma3-270m-lora/manifest.json"),
                         serve="adapter"),
}


@contextlib.contextmanager
def _redis(workdir: Path) -> Iterator[str]:
    from producer.settings import ProducerSettings

    url = ProducerSettings().redis_url
    if devstack.redis_reachable(url):
        print(f"using the Redis at {url}")
        yield url
    else:
        with devstack.redis_server(workdir) as started:
            print(f"no Redis at {url}: started redis-server at {started}")
            yield started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def merged_router(manifest: Path = SHIPPED_MANIFEST, qtype: QuantType = SHIPPED_QUANT) -> Path:
    """``training.merge.cached_merge`` of ``manifest`` at ``qtype`` (cached under
    ``var/merged/``); by default the shipped router as the fleet serves it. Progress goes to
    stderr, so ``$(python -c "...print(merged_router())")`` captures the path alone."""
    from training.merge import cached_merge

    return cached_merge(manifest, qtype)


def _upload_model(endpoint: str, which: str, shipped: Path = SHIPPED_MANIFEST) -> dict[str, str]:
    """Upload the demo's model to the local S3; returns the worker's model settings."""
    if which in ("shipped", "adapter") and shipped.exists():
        manifest = merged_router(shipped) if which == "shipped" else shipped
        staged = devstack.stage_model_dir(manifest)
        uri = devstack.upload_model_dir(endpoint, staged, "thinfleet-models",
                                        f"routers/{staged.parent.name}")
        print(f"uploaded the fine-tuned router {staged.parent.name} (manifest, model, head) "
              f"to {uri}")
        return {"THINFLEET_MODEL_MANIFEST": uri, "THINFLEET_MANIFEST_SHA256": sha256_file(staged)}
    model = devstack.base_model_file()
    uri = devstack.upload(endpoint, model, "thinfleet-models", f"base/{model.name}")
    print(f"uploaded the base model {model.name} ({model.stat().st_size / 2**20:.0f} MiB) to "
          f"{uri}")
    return {"THINFLEET_MODEL_URI": uri, "THINFLEET_MODEL_SHA256": sha256_file(model)}


def run_demo(sample: Path | None = None, workers: int = 2, timeout_s: float = 900.0,
             model: str | None = None, job: str = "banking77", router: Path | None = None
             ) -> int:
    """Run the demo of ``job`` (``JOBS``) on ``sample`` (default: the job's) with ``model``
    (``shipped``, ``adapter`` or ``base``; default: the job's ``serve``) of ``router`` (a
    manifest; default: the job's shipped router, e.g. a pruned one instead); returns 0 when
    every sample ticket reached a stream, 1 otherwise."""
    import os

    from producer import Producer, ProducerSettings
    from producer.backfill import ColumnMap, backfill, read_rows

    spec = JOBS[job]
    sample = sample or spec.sample
    model = model or spec.serve
    rows = list(read_rows(sample))
    gold = {str(row[spec.id_column]): row[spec.label_column] for row in rows}
    run = uuid.uuid4().hex[:8]
    shutil.rmtree(VAR / "cache", ignore_errors=True)
    taxonomy = load_taxonomy(spec.taxonomy)
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(_redis(VAR / "redis"))
        endpoint = stack.enter_context(devstack.s3_server())
        env = {**_upload_model(endpoint, model, router or spec.manifest),
               "THINFLEET_REDIS_URL": redis_url,
               "THINFLEET_S3_ENDPOINT_URL": endpoint,
               "THINFLEET_MODEL_CACHE_DIR": str((VAR / "cache").resolve()),
               "THINFLEET_TAXONOMY": spec.taxonomy, "THINFLEET_METRICS_PORT": "0"}
        boot = time.monotonic()
        worker = devstack.start_worker(env, VAR / "worker.log", concurrency=workers)
        stack.callback(worker.stop)
        worker.wait_ready(workers, timeout_s=300)
        print(f"worker ready with {workers} children in {time.monotonic() - boot:.1f} s "
              f"(cold: S3 download + verify + map + prefix); log: {VAR / 'worker.log'}")

        os.environ["THINFLEET_REDIS_URL"] = redis_url
        producer = Producer(ProducerSettings(redis_url=redis_url))
        start_ids = producer.stream_tail_ids()
        started = time.monotonic()
        report = backfill(producer, sample, ColumnMap(ticket_id=spec.id_column,
                                                      metadata=(spec.label_column,),
                                                      id_prefix=f"demo-{run}-"))
        print(f"enqueued {report.submitted} tickets ({len(report.rejected)} rejected) "
              f"in {report.seconds:.1f} s")

        expected = {f"demo-{run}-{tid}": tid for tid in gold}
        results: dict[str, dict] = {}
        dead: dict[str, dict] = {}
        positions = dict(start_ids)
        deadline = time.monotonic() + timeout_s
        while len(results) + len(dead) < len(expected) and time.monotonic() < deadline:
            for entry in producer.read(positions, block_ms=1000, count=500):
                positions[entry.stream] = entry.entry_id
                tid = entry.document.get("ticket_id")
                if tid in expected:
                    (results if entry.stream == keys.RESULTS_STREAM else dead)[tid] = entry.document
        wall_s = time.monotonic() - started
        memory = {pid: devstack.memory_of(pid) for pid in worker.child_pids()}

    _summarise(results, dead, expected, gold, taxonomy.routes, wall_s, workers, memory)
    if taxonomy.fields and results:
        _summarise_fields(results, expected, {str(row[spec.id_column]): row for row in rows},
                          taxonomy)
    return 0 if len(results) + len(dead) == len(expected) else 1


def _summarise_fields(results: dict[str, dict], expected: dict[str, str],
                      rows: dict[str, dict], taxonomy: Taxonomy) -> None:
    """Field accuracy of the routed results against the sample's gold fields, beside the
    trivial baselines (``training.evaluate.field_scores``)."""
    from training.evaluate import field_scores

    routed = list(results)
    names = [f.name for f in taxonomy.fields]
    if not all(name in rows[expected[t]] for t in routed for name in names):
        return
    scores = field_scores([rows[expected[t]]["text"] for t in routed],
                          [{n: rows[expected[t]][n] for n in names} for t in routed],
                          [results[t].get("fields", {}) for t in routed], taxonomy)
    for name, figures in scores.items():
        model, base = figures["model"], figures["baseline"]
        line = (f"field     {name} ({figures['kind']}): exact match {model['exact_match']:.1%}, "
                f"token-F1 {model['token_f1']:.1%}")
        if "rouge_l" in model:
            line += f", ROUGE-L {model['rouge_l']:.1%}"
        trivial = "Unknown" if figures["kind"] == "extractive" else "first 8 words"
        line += (f"  (trivial baseline, {trivial}: exact match {base['exact_match']:.1%}, "
                 f"token-F1 {base['token_f1']:.1%})")
        print(line)
    print("fields of a few results:")
    for tid in routed[:3]:
        print(f"  {rows[expected[tid]]['text'][:70]!r} -> {results[tid].get('fields')}")


def _summarise(results: dict[str, dict], dead: dict[str, dict], expected: dict[str, str],
               gold: dict[str, str], routes: dict[str, str], wall_s: float, workers: int,
               memory: dict[int, dict[str, int]]) -> None:
    n = len(results)
    total = [r["timings"]["total_ms"] for r in results.values()]
    prompt = [r["timings"]["prompt_eval_ms"] for r in results.values()]
    decode = [r["timings"]["decode_ms"] for r in results.values()]
    correct = sum(r["label"] == gold[expected[t]] for t, r in results.items())
    route_ok = sum(r["route"] == routes[gold[expected[t]]] for t, r in results.items())
    print("\n==== thinfleet demo summary ====")
    first = next(iter(results.values()), None)
    if first:
        print(f"model     {first['model']['name']} sha256 {first['model']['sha256'][:12]}… "
              f"taxonomy {first['taxonomy']}")
    print(f"tickets   {len(expected)} sent, {n} routed, {len(dead)} dead-lettered, "
          f"{len(expected) - n - len(dead)} missing")
    if n:
        print(f"speed     {n / wall_s:.2f} tickets/s with {workers} worker children "
              f"({wall_s:.1f} s from first enqueue to last result)")
        print(f"latency   per ticket in the worker: p50 {_percentile(total, .5):.0f} ms, "
              f"p95 {_percentile(total, .95):.0f} ms (prompt eval p50 "
              f"{statistics.median(prompt):.0f} ms, decode p50 {statistics.median(decode):.0f} ms)")
        print(f"accuracy  label {correct}/{n} = {correct / n:.1%}; route {route_ok}/{n} = "
              f"{route_ok / n:.1%} (gold intents of the sample)")
        dist = Counter(r["route"] for r in results.values())
        print("routes    " + ", ".join(f"{k} {v}" for k, v in dist.most_common()))
        auto = [t for t, r in results.items() if r["status"] == "routed"]
        auto_ok = sum(results[t]["route"] == routes[gold[expected[t]]] for t in auto)
        print(f"auto      {len(auto)}/{n} = {len(auto) / n:.1%} auto-routed at "
              f"{auto_ok / max(1, len(auto)):.1%} route precision; {n - len(auto)} below the "
              "model's threshold went to the fallback route (counted as misses above)")
    for pid, mem in memory.items():
        print(f"child {pid}: RSS {mem.get('rss_kib', 0) / 1024:.0f} MiB, PSS "
              f"{mem.get('pss_kib', 0) / 1024:.0f} MiB, peak RSS "
              f"{mem.get('peak_rss_kib', 0) / 1024:.0f} MiB, private "
              f"{mem.get('private_dirty_kib', 0) / 1024:.0f} MiB")
    print("a few routed results:")
    for tid, r in list(results.items())[:5]:
        print(f"  gold={gold[expected[tid]]:<32} -> {r['label']} ({r['confidence']:.2f}) "
              f"route={r['route']}  [{r['timings']['total_ms']:.0f} ms]")
    import json

    if first:
        print(json.dumps(first, indent=None))
    if dead:
        print("dead-lettered:", json.dumps(next(iter(dead.values())))[:400])
