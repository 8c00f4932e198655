"""Redis ACL users and TLS (``rediss://``) through ``models.connection``, against a real
redis-server started with TLS and an ACL user, and the producer's Celery (kombu) path."""

from __future__ import annotations

import datetime
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from models import keys
from models.connection import RedisConnection
from models.errors import TransientError
from producer import Producer, ProducerSettings
from thinfleet import devstack
from worker.settings import WorkerSettings


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """redis-server with only a TLS port, the default user off and ACL user ``router``."""
    tmp = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thinfleet test CA")])
    ca = _cert("thinfleet test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("localhost", server_key, ca_name, ca_key, ca=False)
    ca_file = _pem(tmp / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    cert_file = _pem(tmp / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    key_file = _pem(tmp / "server.key", server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    port = devstack.free_port()
    proc = subprocess.Popen(
        [devstack.redis_server_binary(), "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
         "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no", "--save", "",
         "--user", "default", "off", "--user", "router", "on", ">s3cret:p@ss", "~*", "&*",
         "+@all", "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = RedisConnection(redis_url=f"rediss://localhost:{port}/0", redis_username="router",
                         redis_password=SecretStr("s3cret:p@ss"), redis_tls_ca_file=ca_file)
    deadline = time.monotonic() + 10
    while True:
        try:
            ok.redis_client(socket_connect_timeout=1).ping()
            break
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server with TLS did not start (built without TLS?)")
            time.sleep(0.1)
    yield port, ca_file
    proc.terminate()
    proc.wait(10)


def test_credentials_go_into_the_broker_url_and_never_into_logs() -> None:
    conn = RedisConnection(redis_url="rediss://cache.internal:6380/2", redis_username="router",
                           redis_password=SecretStr("p@ss/word"))
    assert conn.broker_url() == "rediss://router:p%40ss%2Fword@cache.internal:6380/2"
    assert "p@ss" not in conn.redacted_url() and "word" not in conn.redacted_url()
    assert conn.broker_use_ssl() is not None
    assert RedisConnection(redis_url="redis://h:6379/0").broker_use_ssl() is None


def test_producer_enqueues_over_tls_as_an_acl_user(tls_redis: tuple[int, Path]) -> None:
    port, ca_file = tls_redis
    settings = ProducerSettings(redis_url=f"rediss://localhost:{port}/0", redis_username="router",
                                redis_password=SecretStr("s3cret:p@ss"), redis_tls_ca_file=ca_file)
    producer = Producer(settings)
    producer.submit({"ticket_id": "tls-1", "text": "Where is my card?"})  # Celery -> kombu -> TLS
    assert producer.redis.llen(keys.ROUTE_QUEUE) == 1                  # redis-py -> TLS


def test_worker_settings_reach_the_tls_broker(tls_redis: tuple[int, Path]) -> None:
    from celery import Celery

    port, ca_file = tls_redis
    settings = WorkerSettings(redis_url=f"rediss://localhost:{port}/0", redis_username="router",
                              redis_password=SecretStr("s3cret:p@ss"), redis_tls_ca_file=ca_file)
    app = Celery("tls-check", broker=settings.broker_url())
    app.conf.broker_use_ssl = settings.broker_use_ssl()
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
    assert settings.redis_client().ping()


@pytest.mark.parametrize("change", ["no_ca", "wrong_password"])
def test_untrusted_server_or_bad_password_is_a_clear_transient_error(
        tls_redis: tuple[int, Path], change: str) -> None:
    port, ca_file = tls_redis
    settings = ProducerSettings(
        redis_url=f"rediss://localhost:{port}/0", redis_username="router",
        redis_password=SecretStr("nope" if change == "wrong_password" else "s3cret:p@ss"),
        redis_tls_ca_file=None if change == "no_ca" else ca_file, redis_timeout_s=2)
    with pytest.raises(TransientError, match="cannot reach Redis"):
        Producer(settings).submit({"ticket_id": "tls-2", "text": "hi"})
