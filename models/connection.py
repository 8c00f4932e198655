"""How every thinfleet process connects to Redis: URL, ACL credentials and TLS, in one place.

``RedisConnection`` is a settings mixin: ``WorkerSettings`` and ``ProducerSettings`` inherit its
fields, so each process still has exactly one settings class. Fields, as environment variables:

- ``THINFLEET_REDIS_URL``: ``redis://host:6379/0``, or ``rediss://`` for TLS;
- ``THINFLEET_REDIS_USERNAME`` / ``THINFLEET_REDIS_PASSWORD``: a Redis 6+ ACL user (or only a
  password for ``requirepass``). Kept out of the URL so that a Kubernetes Secret can hold the
  password alone; they win over credentials written in the URL;
- ``THINFLEET_REDIS_TLS_CA_FILE``: the CA bundle that signed the server's certificate (``rediss``
  only; default: the system's trust store). Certificates are always verified.

Celery (kombu) and redis-py take TLS options in different shapes; ``broker_url`` /
``broker_use_ssl`` and ``redis_client`` give each its own from the same fields.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from models import keys


class RedisConnection(BaseSettings):
    """Redis connection fields shared by the worker's and the producer's settings."""

    redis_url: str = Field(default=keys.DEFAULT_REDIS_URL, pattern=r"^rediss?://")
    redis_username: str | None = Field(default=None, description="Redis ACL user")
    redis_password: SecretStr | None = Field(default=None, description="ACL or requirepass")
    redis_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle for rediss:// (default: system trust store)")

    @property
    def redis_tls(self) -> bool:
        """True for a ``rediss://`` URL."""
        return self.redis_url.startswith("rediss://")

    def broker_url(self) -> str:
        """``redis_url`` with the ACL credentials written in (what Celery and kombu read)."""
        if self.redis_username is None and self.redis_password is None:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        user = quote(self.redis_username or "", safe="")
        password = quote(self.redis_password.get_secret_value(), safe="") \
            if self.redis_password is not None else ""
        host = parts.hostname or "localhost"
        netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def redacted_url(self) -> str:
        """The URL without any password, for logs and error messages."""
        parts = urlsplit(self.redis_url)
        host = (parts.hostname or "localhost") + (f":{parts.port}" if parts.port else "")
        user = self.redis_username or parts.username
        netloc = f"{user}:***@{host}" if user or parts.password or self.redis_password else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def broker_use_ssl(self) -> dict[str, Any] | None:
        """Celery's ``broker_use_ssl`` for a ``rediss://`` URL (None for plain ``redis://``)."""
        if not self.redis_tls:
            return None
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.redis_tls_ca_file is not None:
            options["ssl_ca_certs"] = str(self.redis_tls_ca_file)
        return options

    def redis_client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for these settings; ``kwargs`` (timeouts...) pass through."""
        if self.redis_tls:
            kwargs.setdefault("ssl_cert_reqs", "required")
            if self.redis_tls_ca_file is not None:
                kwargs.setdefault("ssl_ca_certs", str(self.redis_tls_ca_file))
        return redis.Redis.from_url(self.broker_url(), **kwargs)
