"""Flower with thinfleet's Redis settings and authentication: ``python -m thinfleet.flower``.

Flower reads only a broker URL; the fleet's Redis may need an ACL user, a password from a
Secret and a CA for ``rediss://``. This launcher builds Celery's broker URL and TLS options from
the same ``THINFLEET_REDIS_*`` settings as the producer and worker (``models.connection``), then
runs ``celery flower`` with the remaining arguments (``--port=5555``...).

**Authentication is required.** Flower shows every task's arguments, which are the tickets'
text; and Flower 2's HTTP API answers 401 to everyone unless authentication is configured (or
``FLOWER_UNAUTHENTICATED_API`` opens it to everyone). The launcher refuses to start unless basic
auth (``FLOWER_BASIC_AUTH=user:password``, e.g. from a Kubernetes Secret, or
``--basic-auth=...``) or another Flower auth (``--auth``/``FLOWER_AUTH``) is configured. Then
the UI and the API take the same credentials: ``curl -u user:password host:5555/api/tasks``.
"""

from __future__ import annotations

import os
import sys

from celery import Celery

from producer.settings import ProducerSettings

AUTH_ENV = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")
AUTH_FLAGS = ("--basic-auth", "--auth")


class FlowerAuthMissing(SystemExit):
    """Flower would start without authentication."""


def check_auth(argv: list[str], environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Raise ``FlowerAuthMissing`` (exit status 2, with what to set) unless ``argv`` or the
    environment configures Flower authentication."""
    if any(environ.get(name) for name in AUTH_ENV):
        return
    if any(arg.split("=", 1)[0] in AUTH_FLAGS for arg in argv):
        return
    print("thinfleet.flower: refusing to start Flower without authentication (it shows ticket "
          "text, and its API answers 401 without it): set FLOWER_BASIC_AUTH=user:password "
          "or pass --basic-auth=user:password", file=sys.stderr)
    raise FlowerAuthMissing(2)


def main(argv: list[str] | None = None) -> None:
    """Run Flower against the configured Redis; ``argv`` is passed to ``celery flower``.

    Raises ``FlowerAuthMissing`` when no authentication is configured."""
    args = sys.argv[1:] if argv is None else argv
    check_auth(args)
    settings = ProducerSettings()
    app = Celery("thinfleet-flower", broker=settings.broker_url())
    app.conf.broker_use_ssl = settings.broker_use_ssl()
    app.start(["flower", *args])


if __name__ == "__main__":
    main()
