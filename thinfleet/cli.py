"""The ``thinfleet`` command: a thin CLI over the producer and worker libraries.

    thinfleet worker   [--concurrency N]          start a Celery worker (after checking Redis)
    thinfleet fetch-model                         pull and verify the model into the cache, exit
    thinfleet probe    ready|live                 ask the local worker's /readyz or /healthz
    thinfleet enqueue  [--text T | stdin]         enqueue one ticket, print its receipt
    thinfleet backfill FILE [--text-column ...]   enqueue a CSV/JSONL file, resumably
    thinfleet results  [--follow] [--dead-letter] print stream entries as JSON lines
    thinfleet route    TEXT --wait                enqueue and wait for the routed result
    thinfleet schema   [--out DIR]                export the JSON Schemas of the contract
    thinfleet calibrate --manifest M --precision P  fit the calibration and threshold into M
                        (--model GGUF --out DIR: a bare model's trie, into a new manifest)
    thinfleet injection --manifest M              prompt injection per style, with the guard
    thinfleet soup     M1 M2 --out DIR            average routers trained from the same start
    thinfleet demo                                the whole fleet on real Banking77 tickets

Exit codes: 0 ok, 1 the system failed (unreachable Redis, worker boot refused), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from models import keys
from models.errors import ThinfleetError, TicketRejected


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False), flush=True)


def cmd_worker(args: argparse.Namespace) -> int:
    import redis

    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    try:
        settings.redis_client(socket_connect_timeout=3, socket_timeout=3).ping()
    except (redis.RedisError, OSError) as exc:
        print(f"thinfleet worker: Redis is unreachable at {settings.redacted_url()}: {exc} "
              "(set THINFLEET_REDIS_URL, _USERNAME, _PASSWORD, _TLS_CA_FILE)", file=sys.stderr)
        return 1
    from worker.app import run

    concurrency = args.concurrency or settings.concurrency
    argv = ["worker", "--pool", "prefork", "--concurrency", str(concurrency),
            "--queues", keys.ROUTE_QUEUE, "--task-events", "--loglevel", settings.log_level,
            "--without-gossip", "--without-mingle"]
    hostname = args.hostname or settings.hostname
    if hostname:
        argv += ["--hostname", str(hostname)]
    code = run(argv)
    if code:
        print(f"thinfleet worker: exited with status {code} (see the log above)", file=sys.stderr)
    return code


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from models.taxonomy import load_taxonomy
    from worker.acquire import resolve_from_settings
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    taxonomy = load_taxonomy(settings.taxonomy)
    spec = resolve_from_settings(settings, taxonomy.sha256)
    _print_json({"model": spec.name, "sha256": spec.sha256, "base": str(spec.base),
                 "adapter": str(spec.adapter) if spec.adapter else None,
                 "head": str(spec.head) if spec.head else None, "downloaded": spec.downloaded,
                 "seconds": round(spec.seconds, 3), "taxonomy": taxonomy.ref})
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from worker.probes import LIVENESS_PATH, READINESS_PATH
    from worker.settings import WorkerSettings

    path = READINESS_PATH if args.which == "ready" else LIVENESS_PATH
    url = f"http://127.0.0.1:{WorkerSettings().metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout_s) as response:
            print(response.read().decode().strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode().strip(), file=sys.stderr)
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
    return 1


def _producer():  # type: ignore[no-untyped-def]
    from producer import Producer

    return Producer()


def cmd_enqueue(args: argparse.Namespace) -> int:
    text = args.text if args.text is not None else sys.stdin.read()
    ticket = {"ticket_id": args.ticket_id or f"cli-{uuid.uuid4()}", "text": text}
    if args.subject:
        ticket["subject"] = args.subject
    receipt = _producer().submit(ticket)
    _print_json(receipt.__dict__)
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from producer.backfill import ColumnMap, backfill

    columns = ColumnMap(text=args.text_column, ticket_id=args.id_column or None,
                        subject=args.subject_column, metadata=tuple(args.metadata_column or ()))
    report = backfill(_producer(), Path(args.file), columns,
                      max_queue_depth=args.max_queue_depth, restart=args.restart)
    for row, reason in report.rejected:
        print(f"{args.file}: row {row} rejected: {reason}", file=sys.stderr)
    summary = {k: v for k, v in report.__dict__.items() if k not in ("task_ids", "rejected")}
    summary["rejected"] = len(report.rejected)
    _print_json(summary)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    producer = _producer()
    stream = keys.DEAD_LETTER_STREAM if args.dead_letter else keys.RESULTS_STREAM
    start = args.start_id or ("$" if args.follow and not args.from_start else "0-0")
    if start == "$":
        start = producer.stream_tail_ids()[stream]
    entries = producer.follow(stream, start, block_ms=1000, stop_when_idle=not args.follow)
    for shown, entry in enumerate(entries, 1):
        _print_json({"id": entry.entry_id, **entry.document})
        if args.count and shown >= args.count:
            break
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    producer = _producer()
    ticket = {"ticket_id": args.ticket_id or f"cli-{uuid.uuid4()}", "text": args.text}
    if not args.wait:
        _print_json(producer.submit(ticket).__dict__)
        return 0
    outcome = producer.route(ticket, timeout_s=args.timeout_s)
    _print_json(outcome.model_dump(mode="json"))
    return 0 if outcome.__class__.__name__ == "RoutedResult" else 1


def cmd_schema(args: argparse.Namespace) -> int:
    from models.schemas import DeadLetterEntry, RoutedResult, TicketEvent
    from models.taxonomy import Taxonomy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in (TicketEvent, RoutedResult, DeadLetterEntry, Taxonomy):
        path = out / f"{model.__name__}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
        print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models import load_taxonomy
    from thinfleet.devstack import base_model_file
    from training.finetune import Recipe
    from training.recipe import run_recipe

    tuned = {name: getattr(args, name)
             for name in ("epochs", "lora_lr", "head_lr", "label_smoothing",
                          "validation_fraction", "field_loss_weight", "injection_augment",
                          "injection_grammar", "injection_benign", "injection_headers",
                          "injection_header_gold", "injection_accounts",
                          "injection_account_gold",
                          "init_from", "layers",
                          "distill_from", "distill_weight", "distill_temperature",
                          "weight_average_decay", "lora_alpha", "lora_dropout",
                          "rdrop_weight", "order_seed")
             if getattr(args, name) is not None}
    recipe = Recipe(lora_r=args.lora_r, batch_size=args.batch_size,
                    max_ticket_tokens=args.max_ticket_tokens, seed=args.seed, **tuned)
    base = Path(args.base_model) if args.base_model else base_model_file()
    manifest = run_recipe(Path(args.data), load_taxonomy(args.taxonomy), Path(args.out), base,
                          recipe, text_column=args.text_column, label_column=args.label_column,
                          skip_training=args.skip_training,
                          stop_after_steps=args.stop_after_steps)
    print((Path(args.out) / "eval.md").read_text())
    print(f"manifest: {manifest}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from models import load_taxonomy
    from thinfleet.devstack import stage_model_dir
    from training.evaluate import evaluate, markdown_report
    from training.recipe import read_fields, read_labelled
    from worker.acquire import resolve_model
    from worker.cpus import plan_threads
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    settings = WorkerSettings()
    taxonomy = load_taxonomy(args.taxonomy)
    if args.manifest:
        spec = resolve_model(model_uri="", model_sha256=settings.model_sha256,
                             manifest_uri=str(stage_model_dir(Path(args.manifest))),
                             manifest_sha256=None, taxonomy_sha256=taxonomy.sha256,
                             cache_dir=settings.model_cache_dir)
    else:
        from thinfleet.devstack import base_model_file
        from worker.acquire import sha256_file

        model = Path(args.model) if args.model else base_model_file()
        spec = resolve_model(model_uri=str(model), model_sha256=sha256_file(model),
                             manifest_uri="", manifest_sha256=None,
                             taxonomy_sha256=taxonomy.sha256, cache_dir=settings.model_cache_dir)
    engine = build_engine(spec, taxonomy, plan_threads(1).threads, settings)
    rows = read_labelled(Path(args.data), args.text_column, args.label_column)
    train_rows = read_labelled(Path(args.train_data), args.train_text_column,
                               args.train_label_column)
    report = evaluate(engine, spec.name, taxonomy, rows, train_rows, Path(args.data).name,
                      Path(args.out), threshold=taxonomy.threshold_for(spec.threshold),
                      precision_target=args.precision,
                      gold_fields=read_fields(Path(args.data), [f.name for f in taxonomy.fields]))
    print(markdown_report(report))
    print(f"reports: {Path(args.out) / 'eval.json'}, {Path(args.out) / 'eval.md'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from models import load_taxonomy
    from training.calibrate_model import base_manifest, calibrate_manifest
    from training.recipe import read_labelled
    from worker.settings import WorkerSettings

    taxonomy = load_taxonomy(args.taxonomy)
    rows = read_labelled(Path(args.data), args.text_column, args.label_column)
    if args.model:  # a bare GGUF: a trie manifest of its own, in --out
        if not args.out:
            print("thinfleet calibrate: --model needs --out, the directory for its new "
                  "manifest", file=sys.stderr)
            return 2
        try:
            manifest = base_manifest(Path(args.model), taxonomy, Path(args.out),
                                     WorkerSettings().max_ticket_tokens)
        except FileNotFoundError as exc:
            print(f"thinfleet calibrate: {exc}", file=sys.stderr)
            return 2
        out = manifest
    else:
        manifest = Path(args.manifest)
        out = Path(args.out or manifest)
    summary = calibrate_manifest(manifest, taxonomy, rows, Path(args.data),
                                 args.precision, folds=args.folds, out=out,
                                 beta=not args.no_beta, delta=args.delta)
    _print_json(summary)
    return 0


def cmd_injection(args: argparse.Namespace) -> int:
    from models import load_taxonomy
    from thinfleet.devstack import stage_model_dir
    from training.injection import evaluate_injection
    from worker.acquire import resolve_model
    from worker.cpus import plan_threads
    from worker.guard import InjectionGuard
    from worker.settings import WorkerSettings
    from worker.tasks import build_engine

    settings = WorkerSettings()
    taxonomy = load_taxonomy(args.taxonomy)
    spec = resolve_model(model_uri="", model_sha256=settings.model_sha256,
                         manifest_uri=str(stage_model_dir(Path(args.manifest))),
                         manifest_sha256=None, taxonomy_sha256=taxonomy.sha256,
                         cache_dir=settings.model_cache_dir)
    engine = build_engine(spec, taxonomy, plan_threads(1).threads, settings)
    guard = None if args.no_guard else InjectionGuard.for_taxonomy(taxonomy)
    title = f"Prompt injection: {spec.name}" + (" without the guard" if args.no_guard else "")
    evaluate_injection(engine, taxonomy, taxonomy.threshold_for(spec.threshold), args.tickets,
                       Path(args.out), guard, title, split=args.split, plain=args.plain,
                       only=args.style)
    print((Path(args.out) / "injection.md").read_text())
    return 0


def cmd_injection_compare(args: argparse.Namespace) -> int:
    from training.injection_compare import compare_reports, load_report, markdown

    try:
        reports = [load_report(Path(p)) for p in (args.candidate, args.baseline)]
        comparison = compare_reports(*reports)
    except (FileNotFoundError, ValueError) as exc:
        print(f"thinfleet injection-compare: {exc}", file=sys.stderr)
        return 2
    text = markdown(comparison, args.candidate_name or Path(args.candidate).name,
                    args.baseline_name or Path(args.baseline).name)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
        (out / "comparison.md").write_text(text)
    print(text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from training.merge import export_merged

    path = export_merged(Path(args.manifest), Path(args.out), args.quant, args.threads)
    _print_json({"manifest": str(path)})
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from training.soup import soup_routers

    path = soup_routers([Path(m).parent for m in args.manifests], Path(args.out))
    _print_json({"manifest": str(path)})
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from thinfleet.devstack import stage_model_dir, upload_model_dir
    from worker.acquire import sha256_file

    manifest = Path(args.manifest)
    if args.merge:
        from training.merge import cached_merge

        manifest = cached_merge(manifest, args.merge)
    staged = stage_model_dir(manifest)
    bucket, _, prefix = args.destination.removeprefix("s3://").partition("/")
    uri = upload_model_dir(args.endpoint_url, staged, bucket, prefix.rstrip("/"))
    _print_json({"manifest": uri, "manifest_sha256": sha256_file(staged)})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from thinfleet.demo import run_demo

    return run_demo(Path(args.sample) if args.sample else None, workers=args.concurrency,
                    timeout_s=args.timeout_s, model=args.model, job=args.job,
                    router=Path(args.router) if args.router else None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and ``--help`` docs)."""
    parser = argparse.ArgumentParser(prog="thinfleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="start a routing worker (Celery, prefork)")
    p.add_argument("--concurrency", type=int, default=0, help="children (default: settings)")
    p.add_argument("--hostname", help="Celery node name, e.g. worker1@%%h")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("fetch-model", help="download and verify the configured model into the "
                       "cache, then exit (a Kubernetes initContainer)")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("probe", help="ask the local worker's /readyz or /healthz (HEALTHCHECK)")
    p.add_argument("which", choices=["ready", "live"])
    p.add_argument("--timeout-s", type=float, default=3.0)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("enqueue", help="enqueue one ticket (text from --text or stdin)")
    p.add_argument("--text")
    p.add_argument("--ticket-id")
    p.add_argument("--subject")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("backfill", help="enqueue a CSV or JSONL file of tickets, resumably")
    p.add_argument("file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="ticket_id", help="'' to derive ids from row numbers")
    p.add_argument("--subject-column")
    p.add_argument("--metadata-column", action="append", help="carry a column as metadata")
    p.add_argument("--max-queue-depth", type=int, help="pause while the queue is deeper")
    p.add_argument("--restart", action="store_true", help="ignore the resume checkpoint")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("results", help="print results (or dead letters) as JSON lines")
    p.add_argument("--follow", action="store_true", help="keep waiting for new entries")
    p.add_argument("--from-start", action="store_true", help="with --follow: replay first")
    p.add_argument("--dead-letter", action="store_true", help="read the dead-letter stream")
    p.add_argument("--start-id", help="stream id to read after")
    p.add_argument("--count", type=int, default=0, help="stop after N entries")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("route", help="enqueue TEXT and (with --wait) print its routed result")
    p.add_argument("text")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--ticket-id")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("schema", help="write the contract's JSON Schemas")
    p.add_argument("--out", default="models/schemas")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("train", help="fine-tune a routing model (LoRA + label head), export, "
                       "evaluate, write its manifest")
    p.add_argument("data", help="labelled CSV or JSONL")
    p.add_argument("--taxonomy", default="banking77")
    p.add_argument("--out", required=True, help="output directory (its name names the model)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--epochs", type=float, help="passes over the training rows "
                   "(default: the recipe's)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lora-lr", type=float, help="LoRA learning rate (default: the recipe's)")
    p.add_argument("--head-lr", type=float, help="head learning rate (default: the recipe's)")
    p.add_argument("--label-smoothing", type=float,
                   help="cross-entropy label smoothing, 0..1 (default: the recipe's)")
    p.add_argument("--max-ticket-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=13,
                   help="the validation split, the calibration folds and (unless --order-seed "
                        "is given) the training randomness")
    p.add_argument("--order-seed", type=int,
                   help="the training randomness alone: data order, injected copies, dropout; "
                        "the split stays --seed's (e.g. a second soup ingredient)")
    p.add_argument("--validation-fraction", type=float,
                   help="share of rows kept out of training for validation and calibration "
                        "(default: the recipe's, 0.1)")
    p.add_argument("--field-loss-weight", type=float,
                   help="weight of the extraction fields' loss when the data has the "
                        "taxonomy's field columns (default: the recipe's, 1.0)")
    p.add_argument("--injection-augment", type=float,
                   help="add this share of training rows again with an injection of a train "
                        "style of data/injection/corpus.yaml, gold label kept (issue 12)")
    p.add_argument("--injection-grammar", type=float,
                   help="the share of those rows whose attack is composed from the corpus's "
                        "plain-language grammar instead (default 0)")
    p.add_argument("--injection-benign", type=float,
                   help="the share of those rows that carry only harmless words from the "
                        "corpus's benign grammar, no attack: consistency training (default 0)")
    p.add_argument("--injection-headers", type=float,
                   help="the share of the attacked rows that take a header naming the "
                        "attacker's label, run into the ticket, from the corpus's "
                        "grammar.headers (default 0)")
    p.add_argument("--injection-header-gold", type=float,
                   help="the share of those headers that name the row's gold label instead "
                        "(default 0)")
    p.add_argument("--injection-accounts", type=float,
                   help="the share of the attacked rows that take a second-hand or earlier "
                        "account naming the attacker's label, a sentence of its own, from the "
                        "corpus's grammar.accounts (default 0)")
    p.add_argument("--injection-account-gold", type=float,
                   help="the share of those accounts that name the row's gold label instead "
                        "(default 0)")
    p.add_argument("--weight-average-decay", type=float,
                   help="export an exponential moving average of the LoRA and head weights "
                        "with this decay per step, e.g. 0.99 (default 0: the last step's)")
    p.add_argument("--lora-alpha", type=int,
                   help="LoRA alpha; the update is scaled by alpha / r (default: the recipe's, "
                        "32)")
    p.add_argument("--lora-dropout", type=float,
                   help="dropout on the LoRA inputs (default: the recipe's, 0.05)")
    p.add_argument("--rdrop-weight", type=float,
                   help="R-Drop: run each batch twice under dropout and add this weight times "
                        "the two passes' symmetric KL divergence (default 0: off; about twice "
                        "the cost of a step)")
    p.add_argument("--init-from", help="start from a trained router directory (adapter.gguf, "
                                       "head.npz) instead of zeros (a router of another depth "
                                       "than --layers: its kept blocks' adapter, a new head)")
    p.add_argument("--layers", type=int,
                   help="layer pruning: keep the first LAYERS transformer blocks; the manifest "
                        "serves a GGUF with that many blocks (issue 16)")
    p.add_argument("--distill-from", help="distillation: a teacher router's manifest.json; the "
                   "student also learns its soft labels (issue 16)")
    p.add_argument("--distill-weight", type=float,
                   help="weight of the distillation term, 0..1 (default: the recipe's, 0.5)")
    p.add_argument("--distill-temperature", type=float,
                   help="softening temperature of the distillation term (default: 2.0)")
    p.add_argument("--base-model", help="base GGUF (default: the packaged Gemma 3 270M)")
    p.add_argument("--skip-training", action="store_true", help="re-export OUT/work only")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and stop after this step; run the same command again to "
                   "resume (training always resumes from OUT/work/checkpoint.pt)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model beside the TF-IDF similarity baseline")
    p.add_argument("--data", default="data/banking77/validation.csv")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="category")
    p.add_argument("--manifest", help="a model manifest (default: the base model, trie decoding)")
    p.add_argument("--model", help="a bare GGUF instead of a manifest")
    p.add_argument("--taxonomy", default="banking77")
    p.add_argument("--train-data", default="../shared/datasets/banking77/train.csv",
                   help="rows to fit the baseline (evaluation rows are removed)")
    p.add_argument("--train-text-column", default="text")
    p.add_argument("--train-label-column", default="category")
    p.add_argument("--out", default="var/eval")
    p.add_argument("--precision", type=float, default=0.98,
                   help="precision target of the out-of-fold selective-routing figures")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("injection", help="measure prompt injection per style of "
                       "data/injection/corpus.yaml against a router")
    p.add_argument("--manifest", required=True)
    p.add_argument("--taxonomy", default="banking77")
    p.add_argument("--tickets", type=int, default=200)
    p.add_argument("--no-guard", action="store_true", help="measure without worker.guard")
    p.add_argument("--split", choices=["all", "train", "eval"], default="all",
                   help="only the corpus's train or eval styles (default: all)")
    p.add_argument("--plain", action="store_true",
                   help="only the plain-language styles the guard does not flag (guard: false)")
    p.add_argument("--style", action="append", metavar="NAME",
                   help="only this corpus style (repeatable)")
    p.add_argument("--out", default="var/injection")
    p.set_defaults(func=cmd_injection)

    p = sub.add_parser("injection-compare", help="two routers' injection reports side by "
                       "side, against issue 12's targets (runs no model)")
    p.add_argument("candidate", help="the candidate's injection.json, or its folder")
    p.add_argument("baseline", help="the baseline's (e.g. the shipped router's), measured "
                   "with the same --tickets")
    p.add_argument("--candidate-name", help="its column's name (default: the folder's)")
    p.add_argument("--baseline-name", help="its column's name (default: the folder's)")
    p.add_argument("--out", help="also write comparison.json and comparison.md here")
    p.set_defaults(func=cmd_injection_compare)

    p = sub.add_parser("calibrate", help="fit a router's calibration (a head's temperature "
                       "and beta map, a trie's beta map) and the threshold that meets a "
                       "precision target; write both into its manifest")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--manifest")
    which.add_argument("--model", help="a bare GGUF served with the label trie: writes a new "
                       "manifest for it in --out")
    p.add_argument("--data", default="data/banking77/validation.csv",
                   help="labelled rows the model was not trained on")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="category")
    p.add_argument("--taxonomy", default="banking77")
    p.add_argument("--precision", type=float, default=0.98, help="precision target, e.g. 0.98")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the figures")
    p.add_argument("--delta", type=float, help="guarantee the precision target with "
                   "probability 1 - DELTA (e.g. 0.05; selection with guaranteed risk, Geifman "
                   "& El-Yaniv 2017) instead of meeting it on the calibration rows")
    p.add_argument("--no-beta", action="store_true",
                   help="temperature only (no beta map of the top label's confidence)")
    p.add_argument("--out", help="where to write the manifest (default: in place; with "
                   "--model, the directory of the new manifest)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("merge", help="fold a router's LoRA adapter into its base model and "
                       "quantize it (Q4_K_M or Q8_0): a one-file model with its own manifest")
    p.add_argument("manifest", help="a router manifest with an adapter")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quant", choices=["Q4_K_M", "Q8_0"], default="Q4_K_M")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("soup", help="average two or more routers trained from the same start "
                       "(exact mean of their LoRA updates and heads; then eval and calibrate)")
    p.add_argument("manifests", nargs="+", help="the routers' manifests")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_soup)

    p = sub.add_parser("publish", help="upload a model (manifest and files) to S3")
    p.add_argument("manifest")
    p.add_argument("destination", help="s3://bucket/prefix")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS)")
    p.add_argument("--merge", choices=["Q4_K_M", "Q8_0"],
                   help="publish the router merged into its base at this quantization "
                   "(thinfleet merge) instead of base + adapter; the shipped one serves Q8_0")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("demo", help="run the fleet on the Banking77 sample and summarise")
    p.add_argument("--job", choices=["banking77", "ecommerce"], default="banking77",
                   help="banking77: 603 Banking77 tickets, 77 intents; ecommerce: the reference "
                        "article's job, 165 held-out tickets with product_name and "
                        "brief_description")
    p.add_argument("--sample", help="tickets to route (default: the job's sample)")
    p.add_argument("--concurrency", type=int, default=2, help="worker children")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--model", choices=["shipped", "adapter", "base"], default=None,
                   help="the shipped fine-tuned router merged to Q8_0 (banking77's default), "
                   "the same router with its adapter applied at load (ecommerce's default), "
                   "or the bare base model")
    p.add_argument("--router", help="another router manifest to serve instead of the job's "
                   "shipped one, e.g. models/trained/banking77-gemma3-270m-12blocks/manifest.json")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``thinfleet`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TicketRejected as exc:
        print(f"thinfleet {args.command}: rejected: {exc}", file=sys.stderr)
        return 2
    except (ThinfleetError, TimeoutError) as exc:
        print(f"thinfleet {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
