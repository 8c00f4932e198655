"""The routing task, and the one place that decides retry versus dead-letter.

Process strategy (Celery, prefork, signals) lives in ``worker.app``; this module holds the job
logic and the per-process state it needs:

* ``init_parent`` (once per host, before fork): thread plan, taxonomy, verified model file;
* ``init_child`` (once per child): the ``RoutingEngine`` and a Redis ``ResultPublisher``;
* ``handle_ticket`` (per ticket): count the attempt, validate, route, publish exactly once.

Decision table (``settle_failure``):

======================================  =========================================
what happened                           what we do
======================================  =========================================
ticket invalid (``TicketRejected``)     dead-letter now, ``retryable=False``
attempt > ``max_attempts``              dead-letter (it crashed or hung its worker)
``TransientError``, Redis errors,       retry with exponential backoff (Celery's
soft time limit, anything else          ``retry``) until the attempt cap, then
                                        dead-letter with the last error
======================================  =========================================
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import structlog
from celery import Celery, Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from pydantic import ValidationError

from models import keys
from models.errors import AttemptsExhausted, ModelUnavailable, TicketRejected, TransientError
from models.schemas import DeadLetterEntry, ModelRef, RoutedResult, TicketEvent, Timings
from models.taxonomy import Taxonomy, load_taxonomy
from worker import metrics
from worker.acquire import ModelSpec, resolve_from_settings
from worker.cpus import ThreadPlan, plan_threads
from worker.results import ResultPublisher
from worker.settings import WorkerSettings

log = structlog.get_logger("thinfleet.worker")

RETRYABLE = (TransientError, redis.ConnectionError, redis.TimeoutError, SoftTimeLimitExceeded)


@dataclass
class ParentState:
    """What the parent prepares before fork and every child inherits."""

    settings: WorkerSettings
    taxonomy: Taxonomy
    model: ModelSpec
    threads: ThreadPlan


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
    model = resolve_from_settings(settings, taxonomy.sha256)
    metrics.MODEL_LOAD_SECONDS.labels("acquire").observe(model.seconds)
    log.info("model_acquired", model=model.name, sha256=model.sha256, base=str(model.base),
             adapter=str(model.adapter) if model.adapter else None, decoder=model.decoder,
             downloaded=model.downloaded, seconds=round(model.seconds, 3),
             taxonomy=taxonomy.ref, labels=len(taxonomy.labels))
    _PARENT = ParentState(settings, taxonomy, model, threads)
    return _PARENT


def init_child() -> ChildState:
    """Boot phase 2 (in the child): map the model, warm the prefix cache, connect to Redis."""
    global _CHILD
    if _PARENT is None:
        raise ModelUnavailable("the worker parent did not acquire a model")
    parent, settings = _PARENT, _PARENT.settings
    engine = build_engine(parent.model, parent.taxonomy, parent.threads.threads, settings)
    publisher = ResultPublisher(settings.redis_client(),
                                settings.results_maxlen, settings.dead_letter_maxlen,
                                settings.result_marker_ttl_s)
    _CHILD = ChildState(parent, engine, publisher,
                        ModelRef(name=parent.model.name, sha256=parent.model.sha256),
                        settings.hostname or socket.gethostname())
    metrics.MODEL_LOAD_SECONDS.labels("load").observe(engine.load_ms / 1000)
    metrics.READY.set(1)
    log.info("child_ready", prefix_tokens=engine.prefix_len, load_ms=round(engine.load_ms, 1),
             threads=parent.threads.threads, trie_branch_points=engine.trie.branch_points())
    return _CHILD


def build_engine(spec: ModelSpec, taxonomy: Taxonomy, threads: int,
                 settings: WorkerSettings) -> Any:
    """A ``RoutingEngine`` for a resolved model (imports llama.cpp: call in a child only).

    A manifest's ``max_ticket_tokens`` and prompt style win over the settings: serving must see
    what training saw.
    """
    from worker.engine import LabelHead, RoutingEngine

    head = LabelHead.load(spec.head) if spec.head and spec.decoder == "head" else None
    return RoutingEngine(spec.base, taxonomy, n_threads=threads,
                         max_ticket_tokens=spec.max_ticket_tokens or settings.max_ticket_tokens,
                         n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                         adapter_path=spec.adapter, head=head,
                         prompt_style=spec.prompt_style,  # type: ignore[arg-type]
                         repack=settings.cpu_repack)


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
        return payload["ticket_id"]
    return None


def dead_letter(state: ChildState, payload: Any, task_id: str | None, exc: BaseException,
                attempts: int, retryable: bool) -> None:
    """Publish a dead-letter entry with the reason, count it, and forget the attempts."""
    entry = DeadLetterEntry(
        ticket_id=_ticket_id(payload), task_id=task_id, reason=str(exc) or type(exc).__name__,
        error_type=type(exc).__name__, retryable=retryable, attempts=attempts,
        ticket=payload if isinstance(payload, dict) else (None if payload is None else str(payload)),
        worker=state.hostname)
    entry_id = state.publisher.dead_letter(entry)
    metrics.DEAD_LETTERS.labels(type(exc).__name__).inc()
    metrics.TICKETS.labels(route="", status="dead_letter").inc()
    if task_id:
        state.publisher.clear_attempts(task_id)
    log.warning("ticket_dead_lettered", reason=entry.reason, error_type=entry.error_type,
                attempts=attempts, entry_id=entry_id)


def settle_failure(task: Task, state: ChildState, payload: Any, exc: BaseException,
                   attempt: int) -> None:
    """The one place that decides retry versus dead-letter (see the module's table).

    Raises celery's ``Retry`` to schedule another attempt; returns after dead-lettering.
    """
    settings = state.parent.settings
    if isinstance(exc, TicketRejected):
        dead_letter(state, payload, task.request.id, exc, attempt, retryable=False)
        return
    if attempt >= settings.max_attempts:
        dead_letter(state, payload, task.request.id, exc, attempt, retryable=True)
        return
    countdown = get_exponential_backoff_interval(
        factor=int(max(1, settings.retry_backoff_s)), retries=attempt - 1,
        maximum=int(settings.retry_backoff_max_s), full_jitter=False)
    metrics.RETRIES.inc()
    log.warning("ticket_retry", error=str(exc), error_type=type(exc).__name__,
                attempt=attempt, countdown_s=countdown)
    raise task.retry(exc=exc, countdown=countdown, max_retries=None)


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
    outcome = state.engine.route(event.text, event.subject)
    taxonomy = state.parent.taxonomy
    route, fallback = taxonomy.route_for(outcome.label, outcome.confidence)
    queue_wait_ms = None
    if event.enqueued_at is not None:
        enqueued = event.enqueued_at if event.enqueued_at.tzinfo else event.enqueued_at.replace(
            tzinfo=UTC)
        queue_wait_ms = max(0.0, (datetime.now(UTC) - enqueued).total_seconds() * 1000)
    return RoutedResult(
        ticket_id=event.ticket_id, label=outcome.label, route=route,
        confidence=min(1.0, max(0.0, outcome.confidence)),
        status="fallback" if fallback else "routed", fields=outcome.fields,
        taxonomy=taxonomy.ref, model=state.model_ref,
        timings=Timings(queue_wait_ms=queue_wait_ms, prompt_eval_ms=outcome.prompt_eval_ms,
                        decode_ms=outcome.decode_ms,
                        total_ms=(time.perf_counter() - started) * 1000),
        tokens_in=outcome.tokens_in, tokens_out=outcome.tokens_out,
        worker=node or state.hostname, attempt=attempt)


def handle_ticket(task: Task, payload: Any) -> dict[str, Any] | None:
    """Route one ticket end to end; returns a small summary (Celery ignores it)."""
    started = time.perf_counter()
    state = child_state()
    settings = state.parent.settings
    task_id = task.request.id
    attempt = state.publisher.count_attempt(task_id)
    structlog.contextvars.bind_contextvars(attempt=attempt)
    if attempt > settings.max_attempts:
        dead_letter(state, payload, task_id, AttemptsExhausted(
            f"gave up after {settings.max_attempts} attempts: the last one did not finish "
            "(worker lost or hard time limit)"), attempt - 1, retryable=True)
        return None
    try:
        event = validate(payload, settings.max_ticket_bytes)
        earlier = state.publisher.already_published(event.ticket_id, state.model_ref.sha256)
        if earlier:
            log.info("ticket_already_published", entry_id=earlier)
            state.publisher.clear_attempts(task_id)
            return {"entry_id": earlier, "duplicate": True}
        result = route_event(state, event, attempt, started, task.request.hostname)
        published = state.publisher.publish_result(result)
    except Retry:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure goes through settle_failure
        settle_failure(task, state, payload, exc, attempt)
        return None
    state.publisher.clear_attempts(task_id)
    elapsed_s = time.perf_counter() - started
    metrics.ROUTING_SECONDS.observe(elapsed_s)
    metrics.PROMPT_SECONDS.observe(result.timings.prompt_eval_ms / 1000)
    metrics.TOKEN_SECONDS.observe(result.timings.decode_ms / 1000)
    if result.timings.queue_wait_ms is not None:
        metrics.QUEUE_WAIT_SECONDS.observe(result.timings.queue_wait_ms / 1000)
    metrics.TICKETS.labels(route=result.route, status=result.status).inc()
    metrics.TOKENS.labels("in").inc(result.tokens_in)
    metrics.TOKENS.labels("out").inc(result.tokens_out)
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
    payload = args[0] if args else None
    structlog.contextvars.bind_contextvars(ticket_id=_ticket_id(payload), task_id=task_id)


def clear_log_context() -> None:
    """Forget the task's log context."""
    structlog.contextvars.clear_contextvars()


def register(app: Celery, settings: WorkerSettings) -> None:
    """Register the routing task on ``app`` under ``keys.ROUTE_TASK``."""

    @app.task(bind=True, name=keys.ROUTE_TASK, acks_late=True, reject_on_worker_lost=True,
              max_retries=None)
    def route_ticket(self: Task, payload: Any) -> dict[str, Any] | None:
        return handle_ticket(self, payload)


def model_path() -> Path | None:
    """The verified base model file of this host (after ``init_parent``)."""
    return _PARENT.model.base if _PARENT else None
