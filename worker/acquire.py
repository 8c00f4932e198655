"""Model acquisition: S3 (or a local path) -> sha256-verified file in a per-host cache.

Runs once per worker host, in the Celery parent before it forks (``worker_init``): a child has
only seconds to come alive, so children never download. N workers on one host share the cache
directory; a file lock makes exactly one of them download while the others wait, then all of
them find the verified file. Writes are atomic (temporary file in the same directory, fsync,
``os.replace``), so a crash mid-download leaves no file that looks complete.

The file is always verified against the pinned sha256, also when it was already cached, so a
corrupted cache is caught at boot rather than as garbage routes. Downloads use boto3's transfer
manager (``download_file``: multipart, parallel ranges) with bounded retries and timeouts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock, Timeout

from models.errors import ModelUnavailable

GGUF_MAGIC = b"GGUF"
HASH_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class AcquiredModel:
    """A verified model file: ``path`` in the cache, its ``sha256``, and how it got there."""

    path: Path
    sha256: str
    name: str
    downloaded: bool
    seconds: float


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, sha256: str) -> None:
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelUnavailable(f"{path} is not a GGUF file (bad magic)")
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelUnavailable(
            f"model {path} has sha256 {actual}, expected {sha256}: refusing to load it")


def _s3_client(endpoint_url: str | None, connect_timeout_s: float, max_attempts: int):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout_s, read_timeout=60,
                    retries={"max_attempts": max_attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def _download_s3(uri: str, target: Path, endpoint_url: str | None, connect_timeout_s: float,
                 max_attempts: int) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ModelUnavailable(f"model URI {uri!r} is not of the form s3://bucket/key")
    client = _s3_client(endpoint_url, connect_timeout_s, max_attempts)
    try:
        client.download_file(bucket, key, str(target))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ModelUnavailable(f"cannot download {uri}: S3 said {code}") from exc
    except BotoCoreError as exc:
        raise ModelUnavailable(f"cannot download {uri} from {endpoint_url or 'AWS S3'}: {exc}") from exc


def acquire_model(uri: str, sha256: str, cache_dir: Path, *, endpoint_url: str | None = None,
                  connect_timeout_s: float = 5.0, max_attempts: int = 3,
                  lock_timeout_s: float = 600.0) -> AcquiredModel:
    """Return a verified local copy of the model at ``uri`` (``s3://bucket/key`` or a path).

    The cache file is ``cache_dir/<sha256>.gguf``. Raises ``ModelUnavailable`` when the source is
    missing or unreachable, the file is not GGUF, or its sha256 differs from ``sha256``.
    """
    if not uri:
        raise ModelUnavailable("no model configured: set THINFLEET_MODEL_URI")
    started = time.perf_counter()
    name = Path(urlparse(uri).path).name or "model.gguf"
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{sha256}.gguf"
    try:
        with FileLock(str(cache_dir / f"{sha256}.lock"), timeout=lock_timeout_s):
            if target.exists():
                try:
                    _check(target, sha256)
                    return AcquiredModel(target, sha256, name, False,
                                         time.perf_counter() - started)
                except ModelUnavailable:
                    target.unlink()  # a corrupted cache entry: fetch it again
            partial = cache_dir / f".{sha256}.{os.getpid()}.partial"
            try:
                if uri.startswith("s3://"):
                    _download_s3(uri, partial, endpoint_url, connect_timeout_s, max_attempts)
                else:
                    source = Path(uri.removeprefix("file://"))
                    if not source.is_file():
                        raise ModelUnavailable(f"model file {source} does not exist")
                    shutil.copyfile(source, partial)
                _check(partial, sha256)
                with partial.open("rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
    except Timeout as exc:
        raise ModelUnavailable(
            f"timed out after {lock_timeout_s}s waiting for another process to fetch {uri}") from exc
    return AcquiredModel(target, sha256, name, True, time.perf_counter() - started)
