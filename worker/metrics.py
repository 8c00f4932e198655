"""Prometheus metrics in multiprocess mode (one endpoint per worker host, all children summed).

``PROMETHEUS_MULTIPROC_DIR`` must be set before ``prometheus_client`` is imported, so
``worker.bootstrap.prepare_process`` runs first thing in the worker parent (``worker.app``),
before this module is imported. Histograms follow the Rust reference service
(``inference_response_duration``, ``token_creation_duration``), renamed with thinfleet's prefix
and base units (seconds).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)

_FAST = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_WAIT = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)

ROUTING_SECONDS = Histogram(
    "thinfleet_routing_duration_seconds",
    "Full routing time of one ticket in the worker (validate, prompt, decode, publish).",
    buckets=_FAST)
TOKEN_SECONDS = Histogram(
    "thinfleet_token_generation_duration_seconds",
    "Time spent decoding the answer (label trie and extraction fields) for one ticket.",
    buckets=_FAST)
PROMPT_SECONDS = Histogram(
    "thinfleet_prompt_eval_duration_seconds",
    "Time evaluating one ticket's own tokens after the cached prefix.", buckets=_FAST)
QUEUE_WAIT_SECONDS = Histogram(
    "thinfleet_queue_wait_seconds",
    "Time from the producer's enqueue to the task's start.", buckets=_WAIT)
MODEL_LOAD_SECONDS = Histogram(
    "thinfleet_model_load_seconds",
    "Model acquisition (parent, label 'acquire') and mapping plus prefix warm-up (child, 'load').",
    ["phase"], buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 120.0))
#: The histogram is observed once per boot, before the first scrape, so ``rate()`` over it is
#: always 0 and the dashboard showed NaN; the gauge holds the last value for the panel.
MODEL_LOAD_LAST_SECONDS = Gauge(
    "thinfleet_model_load_last_seconds",
    "The last model acquisition (parent, 'acquire') or child load ('load') of this host, in s.",
    ["phase"], multiprocess_mode="livemax")
TICKETS = Counter(
    "thinfleet_tickets_total", "Tickets settled, by route and status.", ["route", "status"])
DEAD_LETTERS = Counter(
    "thinfleet_dead_letters_total",
    "Tickets sent to the dead-letter stream, by failure kind (models.errors.Failure).",
    ["failure"])
RETRIES = Counter("thinfleet_retries_total", "Tickets scheduled for another attempt.")
REDELIVERIES = Counter(
    "thinfleet_redeliveries_total",
    "Tickets left for redelivery because Redis refused the attempt count, retry or dead-letter.")
TOKENS = Counter("thinfleet_tokens_total", "Tokens evaluated or generated.", ["direction"])
FIELDS_REJECTED = Counter(
    "thinfleet_fields_rejected_total",
    "Generated field values rejected for repeating the prompt (published as Unknown).",
    ["field"])
READY = Gauge("thinfleet_worker_ready", "1 while this child has a model loaded and warm.",
              multiprocess_mode="livesum")


def preinitialise(routes: list[str], fallback_route: str, fields: list[str] | None = None
                  ) -> None:
    """Create every known label set at 0, so that ``increase()`` and ``rate()`` see the first
    event (a counter born at 1 on first use has no earlier sample to compare with, so the
    dead-letter alert missed the first dead letter of each kind on each pod)."""
    from models.errors import Failure

    for failure in Failure:
        DEAD_LETTERS.labels(failure.value)
    for route in routes:
        TICKETS.labels(route=route, status="routed")
    TICKETS.labels(route=fallback_route, status="fallback")
    TICKETS.labels(route="", status="dead_letter")
    TOKENS.labels("in")
    TOKENS.labels("out")
    for name in fields or []:
        FIELDS_REJECTED.labels(name)


def multiprocess_registry() -> CollectorRegistry:
    """A registry that sums every process's metrics from ``PROMETHEUS_MULTIPROC_DIR``.

    Served by the parent (``worker.probes``); children only write their files.
    """
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def mark_child_dead(pid: int) -> None:
    """Let a dead child's live gauges stop counting."""
    multiprocess.mark_process_dead(pid)
