"""The Celery application and the worker's boot sequence.

Start a worker with ``thinfleet worker`` (which checks Redis first) or plainly with
``celery -A worker.app worker -Q thinfleet.route -E``. Boot has two phases:

1. **Parent** (``worker_init``): plan threads, load the taxonomy, acquire the model
   (S3 -> sha256 -> per-host cache, under a file lock), start the metrics endpoint. Any failure
   raises ``SystemExit`` with the reason: the worker never starts consuming. No decode happens in
   the parent, because OpenMP state does not survive fork.
2. **Each child** (``worker_process_init``): map the GGUF and evaluate the prefix
   (``worker.tasks.init_child``).

Celery settings that make a lost worker lose nothing: ``acks_late`` with prefetch 1,
``reject_on_worker_lost`` (a killed child's ticket is requeued), ``acks_on_timeout=False`` (so is
a hard-timed-out one; Celery >= 5.7 knows the setting, older ones ignore it silently, so the
worker refuses to boot on them), a visibility timeout above the longest time a ticket can be
held (``WorkerSettings.visibility_timeout_s``), an attempt cap counted in Redis
(``worker.tasks``), and a hardened Redis transport (``worker.transport``: poison bytes on the
queue are dead-lettered, a refused requeue stays unacked).
"""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery import Celery, signals
from celery.app.defaults import DEFAULTS as CELERY_DEFAULTS

from models import keys
from worker.bootstrap import prepare_process
from worker.settings import WorkerSettings

settings = WorkerSettings()
METRICS_DIR = prepare_process(settings.metrics_dir)

from worker import metrics, probes, tasks  # noqa: E402  (after PROMETHEUS_MULTIPROC_DIR is set)
from worker.logs import configure_logging  # noqa: E402

configure_logging(settings.log_level, settings.log_json)
log = structlog.get_logger("thinfleet.worker")

#: Settings the delivery guarantee depends on; a Celery that does not know one ignores it silently.
REQUIRED_CELERY_SETTINGS = ("task_acks_on_timeout", "task_reject_on_worker_lost")
_unknown = [name for name in REQUIRED_CELERY_SETTINGS if name not in CELERY_DEFAULTS]
if _unknown:
    raise SystemExit(f"thinfleet worker refused to start: this Celery does not know {_unknown} "
                     "(it would ack timed-out tickets and lose them); install celery>=5.7")

app = Celery("thinfleet", broker=settings.broker_url())
app.conf.update(
    broker_transport="worker.transport:Transport",
    broker_use_ssl=settings.broker_use_ssl(),
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_default_queue=keys.ROUTE_QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A hard time limit kills the child; by default Celery then *acks* the message and the
    # ticket is gone (celery/celery#9596). Requeue it instead: the attempt cap in Redis
    # dead-letters a ticket that keeps timing out.
    task_acks_on_timeout=False,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=settings.task_soft_time_limit_s,
    task_time_limit=settings.task_time_limit_s,
    # A ticket held by a worker that died whole comes back after visibility_timeout, found by a
    # sweep every unacked_restore_interval s. kombu's default sweep scans only every 10th call
    # (throttle 10 x 10 s): tickets sat up to 100 s past the timeout. Throttle 1: every sweep.
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                              "unacked_restore_interval": settings.unacked_restore_interval_s,
                              "unacked_restore_throttle": 1},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=settings.broker_connection_max_retries,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
    worker_proc_alive_timeout=settings.proc_alive_timeout_s,
    worker_cancel_long_running_tasks_on_connection_loss=True,
)
tasks.register(app, settings)

#: Liveness and readiness of this worker parent (``/healthz``, ``/readyz``; see worker.probes).
PROBES = probes.Probes(settings.liveness_stale_s, ready_children=lambda: 0.0,
                      stall_s=settings.stall_s)


@signals.task_received.connect
def _received(**_: Any) -> None:
    PROBES.received()


@signals.heartbeat_sent.connect
def _heartbeat(**_: Any) -> None:
    PROBES.beat()


@signals.worker_init.connect
def _parent_boot(sender: Any = None, **_: Any) -> None:
    concurrency = int(getattr(sender, "concurrency", None) or settings.concurrency)
    try:
        tasks.init_parent(settings, concurrency)
    except Exception as exc:
        log.error("worker_boot_failed", error=str(exc), error_type=type(exc).__name__)
        raise SystemExit(f"thinfleet worker refused to start: {exc}") from exc
    if settings.metrics_port:
        registry = metrics.multiprocess_registry()
        probe_redis = settings.redis_client(socket_timeout=2, socket_connect_timeout=2)
        registry.register(probes.QueueCollector(probe_redis))
        PROBES.queue_depth = lambda: probes.queue_depth(probe_redis)
        ready_registry = metrics.multiprocess_registry()
        PROBES.ready_children = lambda: probes.ready_children(ready_registry)
        try:
            probes.serve(settings.metrics_port, probes.make_app(registry, PROBES),
                         settings.metrics_host)
            log.info("http_serving", host=settings.metrics_host, port=settings.metrics_port,
                     dir=str(METRICS_DIR), paths=list(probes.PROBE_PATHS))
        except OSError as exc:
            log.warning("metrics_port_unavailable", port=settings.metrics_port, error=str(exc))


@signals.worker_process_init.connect
def _child_boot(**_: Any) -> None:
    tasks.init_child()


@signals.task_prerun.connect
def _task_start(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    tasks.bind_log_context(task_id, args)


@signals.task_postrun.connect
def _task_end(**_: Any) -> None:
    tasks.clear_log_context()


@signals.worker_process_shutdown.connect
def _child_exit(**_: Any) -> None:
    tasks.close_child()
    metrics.mark_child_dead(os.getpid())


def run(argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv`` and return its exit code (``app.worker_main`` drops
    it, so a worker that died of an unrecoverable error exited 0 and an ``on-failure``
    supervisor did not restart it)."""
    from celery.bin.celery import celery as celery_cli

    celery_cli.params[0].default = app
    try:
        code = celery_cli.main(args=argv, standalone_mode=False)
    finally:
        celery_cli.params[0].default = None
    return int(code or 0)
