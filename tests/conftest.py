"""Fixtures: real redis-server, real S3 endpoint (moto server), the real GGUF model, a real fleet.

Each test starts from a clean Redis: every key is deleted except kombu's ``_kombu.binding.*``
sets, which a running worker declared once and caches (deleting them would make its retries
vanish). That is rq's "flush per test", adjusted for a live Celery worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from thinfleet import devstack
from worker.acquire import sha256_file


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with devstack.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    doomed = [k for k in client.scan_iter(count=1000) if not k.startswith(b"_kombu.binding.")]
    if doomed:
        client.delete(*doomed)
    return client


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    os.environ.update(devstack.LOCAL_S3_ENV)
    with devstack.s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def model_file() -> Path:
    return devstack.base_model_file()


@pytest.fixture(scope="session")
def model_sha(model_file: Path) -> str:
    return sha256_file(model_file)


@pytest.fixture(scope="session")
def model_uri(s3_endpoint: str, model_file: Path) -> str:
    return devstack.upload(s3_endpoint, model_file, "models", f"base/{model_file.name}")


@pytest.fixture(scope="session")
def banking_engine(model_file: Path):  # type: ignore[no-untyped-def]
    from models import load_taxonomy
    from worker.engine import RoutingEngine

    engine = RoutingEngine(model_file, load_taxonomy("banking77"), n_threads=2)
    yield engine
    engine.close()


def worker_env(redis_url: str, s3_endpoint: str, model_uri: str, model_sha: str,
               cache_dir: Path, **extra: str) -> dict[str, str]:
    """THINFLEET_* settings for a test worker (metrics off unless given)."""
    env = {"THINFLEET_REDIS_URL": redis_url, "THINFLEET_MODEL_URI": model_uri,
           "THINFLEET_MODEL_SHA256": model_sha, "THINFLEET_S3_ENDPOINT_URL": s3_endpoint,
           "THINFLEET_MODEL_CACHE_DIR": str(cache_dir), "THINFLEET_METRICS_PORT": "0",
           "THINFLEET_RETRY_BACKOFF_S": "1", "THINFLEET_TASK_TIME_LIMIT_S": "60",
           "THINFLEET_TASK_SOFT_TIME_LIMIT_S": "50"}
    env.update({f"THINFLEET_{k.upper()}": v for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return devstack.free_port()


@pytest.fixture(scope="session")
def fleet(redis_url: str, s3_endpoint: str, model_uri: str, model_sha: str, metrics_port: int,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.WorkerProcess]:
    """One real worker (1 child) pulling the model from the S3 endpoint."""
    tmp = tmp_path_factory.mktemp("fleet")
    env = worker_env(redis_url, s3_endpoint, model_uri, model_sha, tmp / "cache",
                     metrics_port=str(metrics_port), max_attempts="2",
                     metrics_dir=str(tmp / "metrics"))
    worker = devstack.start_worker(env, tmp / "worker.log", concurrency=1, hostname="fleet1")
    try:
        worker.wait_ready(1, timeout_s=180)
        yield worker
    finally:
        worker.stop()


@pytest.fixture()
def producer(redis_url: str, r: redis.Redis):  # type: ignore[no-untyped-def]
    from producer import Producer, ProducerSettings

    return Producer(ProducerSettings(redis_url=redis_url, dedupe_window_s=600))
