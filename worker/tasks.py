"""The routing task, and the one place that acts on the exception tree's decision.

Process strategy (Celery, prefork, signals) lives in ``worker.app``; this module holds the job
logic and the per-process state it needs:

* ``init_parent`` (once per host, before fork): thread plan, taxonomy, verified model file;
* ``init_child`` (once per child): the ``RoutingEngine`` and a Redis ``ResultPublisher``;
* ``handle_ticket`` (per ticket): count the attempt, validate, route, publish exactly once.

Every path out of ``handle_ticket`` ends in exactly one of:

1. a result published on the results stream (or found there already: a redelivery);
2. a dead-letter entry written, with the ``Failure`` that ``models.errors.failure_of`` decided
   (invalid ticket, malformed message and permanent errors at once; transient ones after
   ``max_attempts``), then ``Reject(requeue=False)``, so that Celery and Flower report the
   task as failed rather than successful;
3. the message left for redelivery: a retry published with backoff (Celery's ``retry``), or,
   when Redis refuses even that, ``Reject(requeue=True)``; if Redis cannot take the requeue
   either, the message stays in kombu's ``unacked`` hash and comes back after
   ``visibility_timeout_s`` (``worker.transport``).

Nothing is acked without a result or a dead-letter entry.
"""

from __future__ import annotations

import gc
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import structlog
from celery import Celery, Task
from celery.exceptions import Reject, Retry
from celery.utils.time import get_exponential_backoff_interval
from pydantic import ValidationError

from models import keys
from models.errors import (
    AttemptsExhausted,
    Failure,
    MalformedMessage,
    ModelUnavailable,
    TicketRejected,
    failure_of,
)
from models.schemas import DeadLetterEntry, ModelRef, RoutedResult, TicketEvent, Timings, bounded_ticket
from models.taxonomy import Taxonomy, load_taxonomy
from worker import metrics
from worker.acquire import ModelSpec, resolve_from_settings
from worker.cpus import ThreadPlan, plan_threads
from worker.guard import InjectionGuard, guarded_route
from worker.results import ResultPublisher
from worker.settings import WorkerSettings

log = structlog.get_logger("thinfleet.worker")

@dataclass
class ParentState:
    """What the parent prepares before fork and every child inherits."""

    settings: WorkerSettings
    taxonomy: Taxonomy
    model: ModelSpec
    threads: ThreadPlan
    guard: InjectionGuard | None = None
    #: llama.cpp's model pointer when ``preload_model`` loaded it before the fork
    preloaded: Any = None


@dataclass
class ChildState:
    """What one child routes with."""

    parent: ParentState
    engine: Any  # worker.engine.RoutingEngine (imported in the child only)
    publisher: ResultPublisher
    model_ref: ModelRef
    hostname: str


_PARENT: ParentState | None = None
_CHILD: ChildState | None = None


def init_parent(settings: WorkerSettings, concurrency: int) -> ParentState:
    """Boot phase 1. Raises ``ModelUnavailable`` or ``TaxonomyError``; never decodes."""
    global _PARENT
    threads = plan_threads(concurrency, settings.threads_per_child)
    log.info("thread_plan", cpus=threads.cpus, concurrency=threads.concurrency,
             threads_per_child=threads.threads, source=threads.source)
    taxonomy = load_taxonomy(settings.taxonomy)
    metrics.preinitialise(sorted(set(taxonomy.routes.values())), taxonomy.fallback_route,
                          [f.name for f in taxonomy.fields if not f.extractive])
    model = resolve_from_settings(settings, taxonomy.sha256)
    metrics.MODEL_LOAD_SECONDS.labels("acquire").observe(model.seconds)
    metrics.MODEL_LOAD_LAST_SECONDS.labels("acquire").set(model.seconds)
    log.info("model_acquired", model=model.name, sha256=model.sha256, base=str(model.base),
             adapter=str(model.adapter) if model.adapter else None, decoder=model.decoder,
             temperature=model.temperature, beta=model.beta,
             threshold=taxonomy.threshold_for(model.threshold),
             downloaded=model.downloaded, seconds=round(model.seconds, 3),
             taxonomy=taxonomy.ref, labels=len(taxonomy.labels))
    guard = InjectionGuard.for_taxonomy(taxonomy) if settings.injection_guard else None
    preloaded = None
    if settings.preload_model:  # before the fork (the load starts no thread: no OpenMP)
        from worker.llama import load_model

        preloaded = load_model(model.base, repack=settings.cpu_repack)
        log.info("model_preloaded", base=str(model.base))
    _PARENT = ParentState(settings, taxonomy, model, threads, guard, preloaded)
    # Python's advice for fork without exec (the gc module's docs): objects the parent made
    # are moved out of the collector's reach, so a child's collections do not write to their
    # headers and turn the shared pages they sit on into private copies.
    gc.freeze()
    return _PARENT


def init_child() -> ChildState:
    """Boot phase 2 (in the child): map the model, warm the prefix cache, connect to Redis."""
    global _CHILD
    if _PARENT is None:
        raise ModelUnavailable("the worker parent did not acquire a model")
    parent, settings = _PARENT, _PARENT.settings
    engine = build_engine(parent.model, parent.taxonomy, parent.threads.threads, settings,
                          parent.preloaded)
    publisher = ResultPublisher(settings.redis_client(),
                                settings.results_maxlen, settings.dead_letter_maxlen,
                                settings.result_marker_ttl_s)
    _CHILD = ChildState(parent, engine, publisher,
                        ModelRef(name=parent.model.name, sha256=parent.model.sha256),
                        settings.hostname or socket.gethostname())
    metrics.MODEL_LOAD_SECONDS.labels("load").observe(engine.load_ms / 1000)
    metrics.MODEL_LOAD_LAST_SECONDS.labels("load").set(engine.load_ms / 1000)
    metrics.READY.set(1)
    log.info("child_ready", prefix_tokens=engine.prefix_len, load_ms=round(engine.load_ms, 1),
             threads=parent.threads.threads, trie_branch_points=engine.trie.branch_points())
    return _CHILD


def build_engine(spec: ModelSpec, taxonomy: Taxonomy, threads: int,
                 settings: WorkerSettings, preloaded: Any = None) -> Any:
    """A ``RoutingEngine`` for a resolved model (imports llama.cpp: call in a child, or in the
    parent only through ``preload_model``). ``preloaded``: the parent's model pointer.

    A manifest's ``max_ticket_tokens`` and prompt style win over the settings: serving must see
    what training saw.
    """
    from worker.engine import LabelHead, RoutingEngine

    head = (LabelHead.load(spec.head, spec.temperature, spec.beta)
            if spec.head and spec.decoder == "head" else None)
    return RoutingEngine(spec.base, taxonomy, n_threads=threads,
                         max_ticket_tokens=spec.max_ticket_tokens or settings.max_ticket_tokens,
                         n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                         adapter_path=spec.adapter, head=head,
                         prompt_style=spec.prompt_style,  # type: ignore[arg-type]
                         repack=settings.cpu_repack and preloaded is None, model=preloaded,
                         trie_beta=spec.beta if head is None else None)


def close_child() -> None:
    """Release the engine (child shutdown)."""
    global _CHILD
    if _CHILD is not None:
        metrics.READY.set(0)
        _CHILD.engine.close()
        _CHILD = None


def child_state() -> ChildState:
    """The child's state, initialising it on first use (solo and thread pools send no
    ``worker_process_init``)."""
    return _CHILD if _CHILD is not None else init_child()


def _ticket_id(payload: Any) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("ticket_id"), str):
        ticket_id = payload["ticket_id"]
        try:
            ticket_id.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: keep it out of keys and logs
            return None
        return ticket_id[:256]
    return None


def dead_letter(state: ChildState, payload: Any, task_id: str | None, exc: BaseException,
                attempts: int, failure: Failure, node: str | None = None) -> None:
    """Publish a dead-letter entry with the reason and the ``failure`` kind, count it, and forget
    the attempts. Raises redis-py's errors when Redis refuses the entry (the caller then leaves
    the message for redelivery)."""
    ticket, size, truncated = bounded_ticket(payload)
    if isinstance(exc, MalformedMessage) and exc.excerpt is not None:  # bytes off the queue
        ticket, size = exc.excerpt, exc.size_bytes
        truncated = size is not None and size > len(exc.excerpt)
    entry = DeadLetterEntry(
        ticket_id=_ticket_id(payload), task_id=task_id,
        reason=(str(exc) or type(exc).__name__)[:keys.DEAD_LETTER_EXCERPT_CHARS],
        error_type=type(exc).__name__, failure=failure, retryable=failure.retryable,
        attempts=attempts, ticket=ticket, ticket_bytes=size, ticket_truncated=truncated,
        worker=node or state.hostname)
    entry_id = state.publisher.dead_letter(entry)
    metrics.DEAD_LETTERS.labels(failure.value).inc()
    metrics.TICKETS.labels(route="", status="dead_letter").inc()
    if task_id:
        state.publisher.clear_attempts(task_id)
    log.warning("ticket_dead_lettered", reason=entry.reason, error_type=entry.error_type,
                failure=failure.value, attempts=attempts, entry_id=entry_id)


def leave_for_redelivery(state: ChildState, exc: BaseException) -> Reject:
    """The ``Reject(requeue=True)`` to raise when nothing could be settled (Redis refused the
    attempt count, the retry or the dead-letter entry). Waits ``retry_backoff_s`` first so that
    a Redis outage does not become a hot redelivery loop."""
    metrics.REDELIVERIES.inc()
    log.warning("ticket_left_for_redelivery", error=str(exc)[:500], error_type=type(exc).__name__)
    time.sleep(state.parent.settings.retry_backoff_s)
    return Reject(f"left for redelivery: {type(exc).__name__}: {exc}"[:500], requeue=True)


def settle_failure(task: Task, state: ChildState, payload: Any, exc: BaseException,
                   attempt: int) -> NoReturn:
    """Act on ``failure_of(exc)``: dead-letter, or retry with backoff (see the module's doc).

    Raises Celery's ``Retry`` after scheduling another attempt, ``Reject(requeue=True)`` when
    Redis refused the retry or the dead-letter entry, and ``Reject(requeue=False)`` after
    dead-lettering (Celery then reports the task as failed, and removes the message).
    """
    settings = state.parent.settings
    node = task.request.hostname
    failure = failure_of(exc)
    if failure is not Failure.TRANSIENT or attempt >= settings.max_attempts:
        try:
            dead_letter(state, payload, task.request.id, exc, attempt, failure, node)
        except Exception as refused:
            raise leave_for_redelivery(state, refused) from refused
        # Settled: the entry is written. Reject without requeue so that Celery reports the
        # task as failed (Flower's FAILURE, a task-failed event) instead of a SUCCESS with
        # result None; the message is removed exactly as an ack would remove it.
        raise Reject(f"dead-lettered ({failure.value}): {exc}"[:500], requeue=False)
    countdown = get_exponential_backoff_interval(
        factor=int(max(1, settings.retry_backoff_s)), retries=attempt - 1,
        maximum=int(settings.retry_backoff_max_s), full_jitter=False)
    log.warning("ticket_retry", error=str(exc)[:500], error_type=type(exc).__name__,
                attempt=attempt, countdown_s=countdown)
    try:
        retry = task.retry(exc=exc, countdown=countdown, max_retries=None)
    except Retry:
        raise
    except Exception as refused:  # Celery's Reject(requeue=False): the retry was not published
        raise leave_for_redelivery(state, refused) from refused
    metrics.RETRIES.inc()
    raise retry


def unpack_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The one ticket payload of a task message: exactly one positional argument, no keyword
    arguments. Raises ``MalformedMessage`` otherwise (and for the marker that
    ``worker.transport`` puts on bytes that were not a task message at all)."""
    marker = kwargs.get(keys.MALFORMED_KWARG)
    if marker is not None:
        marker = marker if isinstance(marker, dict) else {}
        size = marker.get("bytes")
        raise MalformedMessage(str(marker.get("reason", "malformed queue item")),
                               excerpt=str(marker.get("excerpt", "")),
                               size_bytes=size if isinstance(size, int) else None)
    if len(args) != 1 or kwargs:
        raise MalformedMessage(
            f"a routing task takes exactly one positional argument (the ticket) and no keyword "
            f"arguments; got {len(args)} positional and {sorted(kwargs)[:8]} keyword")
    return args[0]


def validate(payload: Any, max_ticket_bytes: int) -> TicketEvent:
    """Parse the task's payload into a ``TicketEvent``; raises ``TicketRejected`` with why."""
    if not isinstance(payload, dict):
        raise TicketRejected(f"ticket payload is {type(payload).__name__}, expected an object")
    try:
        return TicketEvent.model_validate(payload, context={"max_ticket_bytes": max_ticket_bytes})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'ticket'}: {e['msg']}"
                             for e in exc.errors())
        raise TicketRejected(f"invalid ticket: {problems}") from exc


def route_event(state: ChildState, event: TicketEvent, attempt: int, started: float,
                node: str | None = None) -> RoutedResult:
    """Run the engine on a validated ticket and build its ``RoutedResult``."""
    settings = state.parent.settings
    guarded = guarded_route(state.engine.route, state.parent.guard, event.text, event.subject,
                            redact=settings.injection_redact,
                            check_names=settings.injection_name_check,
                            head=state.engine.head)
    outcome, flags = guarded.outcome, guarded.flags
    taxonomy = state.parent.taxonomy
    route, fallback = taxonomy.route_for(outcome.label, outcome.confidence,
                                         model_threshold=state.parent.model.threshold)
    if flags:  # the ticket tried to choose its route: a human decides (worker.guard)
        route, fallback = taxonomy.fallback_route, True
        log.warning("injection_suspected", flags=flags, label=outcome.label,
                    redacted_chars=guarded.removed_chars)
    queue_wait_ms = None
    if event.enqueued_at is not None:
        enqueued = event.enqueued_at if event.enqueued_at.tzinfo else event.enqueued_at.replace(
            tzinfo=UTC)
        queue_wait_ms = max(0.0, (datetime.now(UTC) - enqueued).total_seconds() * 1000)
    return RoutedResult(
        ticket_id=event.ticket_id, label=outcome.label, route=route,
        confidence=min(1.0, max(0.0, outcome.confidence)),
        status="fallback" if fallback else "routed", fields=outcome.fields, flags=flags,
        rejected_fields=outcome.rejected_fields,
        taxonomy=taxonomy.ref, model=state.model_ref,
        timings=Timings(queue_wait_ms=queue_wait_ms, prompt_eval_ms=outcome.prompt_eval_ms,
                        decode_ms=outcome.decode_ms,
                        total_ms=(time.perf_counter() - started) * 1000),
        tokens_in=outcome.tokens_in, tokens_out=outcome.tokens_out,
        worker=node or state.hostname, attempt=attempt)


def handle_ticket(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> dict[str, Any] | None:
    """Route one ticket end to end; returns a small summary (Celery ignores it).

    Raises ``Retry`` (a retry was published), ``Reject(requeue=True)`` (left for redelivery),
    ``Reject(requeue=False)`` (dead-lettered; Celery reports it failed); returns after
    publishing a result (the module's doc).
    """
    started = time.perf_counter()
    state = child_state()
    settings = state.parent.settings
    task_id = task.request.id
    raw: Any = args[0] if len(args) == 1 else {"args": list(args), "kwargs": kwargs}
    try:
        attempt = state.publisher.count_attempt(task_id)
    except Exception as exc:  # Redis unreachable or refusing writes: decide nothing yet
        raise leave_for_redelivery(state, exc) from exc
    structlog.contextvars.bind_contextvars(attempt=attempt)
    try:
        payload = raw = unpack_args(args, kwargs)
        if attempt > settings.max_attempts:
            raise AttemptsExhausted(
                f"gave up after {settings.max_attempts} attempts: the last one did not finish "
                "(worker lost or hard time limit)")
        event = validate(payload, settings.max_ticket_bytes)
        earlier = state.publisher.already_published(event.ticket_id, state.model_ref.sha256)
        if earlier:
            log.info("ticket_already_published", entry_id=earlier)
            state.publisher.clear_attempts(task_id)
            return {"entry_id": earlier, "duplicate": True}
        result = route_event(state, event, attempt, started, task.request.hostname)
        published = state.publisher.publish_result(result)
    except (Retry, Reject):
        raise
    except AttemptsExhausted as exc:
        settle_failure(task, state, raw, exc, attempt - 1)
        raise  # not reached: settle_failure always raises here
    except Exception as exc:  # every failure goes through settle_failure
        settle_failure(task, state, raw, exc, attempt)
        raise  # not reached: settle_failure always raises
    try:
        state.publisher.clear_attempts(task_id)
    except Exception as exc:  # noqa: BLE001 - the result is out; a stale counter expires
        log.warning("attempts_not_cleared", error=str(exc)[:200])
    elapsed_s = time.perf_counter() - started
    metrics.ROUTING_SECONDS.observe(elapsed_s)
    metrics.PROMPT_SECONDS.observe(result.timings.prompt_eval_ms / 1000)
    metrics.TOKEN_SECONDS.observe(result.timings.decode_ms / 1000)
    if result.timings.queue_wait_ms is not None:
        metrics.QUEUE_WAIT_SECONDS.observe(result.timings.queue_wait_ms / 1000)
    metrics.TICKETS.labels(route=result.route, status=result.status).inc()
    metrics.TOKENS.labels("in").inc(result.tokens_in)
    metrics.TOKENS.labels("out").inc(result.tokens_out)
    for name in result.rejected_fields:
        metrics.FIELDS_REJECTED.labels(name).inc()
    log.info("ticket_routed", label=result.label, route=result.route,
             confidence=round(result.confidence, 4), status=result.status,
             total_ms=round(elapsed_s * 1000, 1), entry_id=published.entry_id,
             duplicate=published.duplicate)
    return {"entry_id": published.entry_id, "duplicate": published.duplicate}


def bind_log_context(task_id: str | None, args: Any) -> None:
    """Bind ``ticket_id`` and ``task_id`` to every log line until ``clear_log_context``
    (the worker calls these from Celery's ``task_prerun``/``task_postrun`` signals, so Celery's
    own lines about the task carry them too)."""
    structlog.contextvars.clear_contextvars()
    payload = args[0] if args and len(args) == 1 else None
    structlog.contextvars.bind_contextvars(ticket_id=_ticket_id(payload), task_id=task_id)


def clear_log_context() -> None:
    """Forget the task's log context."""
    structlog.contextvars.clear_contextvars()


def register(app: Celery, settings: WorkerSettings) -> None:
    """Register the routing task on ``app`` under ``keys.ROUTE_TASK``."""

    @app.task(bind=True, name=keys.ROUTE_TASK, acks_late=True, reject_on_worker_lost=True,
              max_retries=None)
    def route_ticket(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        # *args/**kwargs: a message with the wrong arguments must reach handle_ticket (and the
        # dead-letter stream), not fail with TypeError before the body runs and be acked.
        try:
            return handle_ticket(self, args, kwargs)
        except (Retry, Reject):
            raise
        except Exception as exc:
            # Only a failure outside the decision gets here (the child could not build its
            # engine, a bug in settle_failure). Celery would ack it (acks_on_failure): requeue.
            log.error("ticket_unsettled", error=str(exc)[:500], error_type=type(exc).__name__)
            raise Reject(f"unsettled: {type(exc).__name__}: {exc}"[:500], requeue=True) from exc


def model_path() -> Path | None:
    """The verified base model file of this host (after ``init_parent``)."""
    return _PARENT.model.base if _PARENT else None
