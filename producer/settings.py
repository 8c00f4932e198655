"""``ProducerSettings``: the producer process's only configuration object (``THINFLEET_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from models import keys
from models.connection import RedisConnection


class ProducerSettings(RedisConnection):
    """Configuration of a process that enqueues tickets or reads results.

    Redis fields (URL, ACL user, password, TLS CA) come from ``models.connection.RedisConnection``.
    """

    model_config = SettingsConfigDict(env_prefix="THINFLEET_", env_file=".env", extra="ignore")

    max_ticket_bytes: int = keys.DEFAULT_MAX_TICKET_BYTES
    dedupe_window_s: int = Field(default=keys.DEFAULT_DEDUPE_WINDOW_S, ge=1)
    max_queue_depth: int = Field(default=2000, ge=1, description="backfill pauses above this")
    backpressure_poll_s: float = Field(default=0.5, gt=0)
    redis_timeout_s: float = Field(default=5.0, gt=0)
