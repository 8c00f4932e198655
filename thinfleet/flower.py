"""Flower with thinfleet's Redis settings: ``python -m thinfleet.flower [flower options]``.

Flower reads only a broker URL; the fleet's Redis may need an ACL user, a password from a
Secret and a CA for ``rediss://``. This launcher builds Celery's broker URL and TLS options from
the same ``THINFLEET_REDIS_*`` settings as the producer and worker (``models.connection``), then
runs ``celery flower`` with the remaining arguments (``--port=5555``...).
"""

from __future__ import annotations

import sys

from celery import Celery

from producer.settings import ProducerSettings


def main(argv: list[str] | None = None) -> None:
    """Run Flower against the configured Redis; ``argv`` is passed to ``celery flower``."""
    settings = ProducerSettings()
    app = Celery("thinfleet-flower", broker=settings.broker_url())
    app.conf.broker_use_ssl = settings.broker_use_ssl()
    app.start(["flower", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
