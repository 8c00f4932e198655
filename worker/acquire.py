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
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from filelock import FileLock, Timeout

from models.errors import ModelUnavailable

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

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


def _check(path: Path, sha256: str, gguf: bool = True) -> None:
    if gguf:
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


def _fetch(uri: str, target: Path, endpoint_url: str | None, connect_timeout_s: float,
           max_attempts: int) -> None:
    """Copy ``uri`` (``s3://bucket/key``, a path or ``file://`` path) to ``target``."""
    if uri.startswith("s3://"):
        _download_s3(uri, target, endpoint_url, connect_timeout_s, max_attempts)
        return
    source = Path(uri.removeprefix("file://"))
    if not source.is_file():
        raise ModelUnavailable(f"{source} does not exist")
    shutil.copyfile(source, target)


def acquire_model(uri: str, sha256: str, cache_dir: Path, *, endpoint_url: str | None = None,
                  connect_timeout_s: float = 5.0, max_attempts: int = 3,
                  lock_timeout_s: float = 600.0, suffix: str = ".gguf") -> AcquiredModel:
    """Return a verified local copy of the file at ``uri`` (``s3://bucket/key`` or a path).

    The cache file is ``cache_dir/<sha256><suffix>``; ``.gguf`` files must also start with the
    GGUF magic. Raises ``ModelUnavailable`` when the source is missing or unreachable, the file
    is not GGUF, or its sha256 differs from ``sha256``.
    """
    if not uri:
        raise ModelUnavailable("no model configured: set THINFLEET_MODEL_URI")
    started = time.perf_counter()
    name = Path(urlparse(uri).path).name or "model.gguf"
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{sha256}{suffix}"
    gguf = suffix == ".gguf"
    try:
        with FileLock(str(cache_dir / f"{sha256}.lock"), timeout=lock_timeout_s):
            if target.exists():
                try:
                    _check(target, sha256, gguf)
                    return AcquiredModel(target, sha256, name, False,
                                         time.perf_counter() - started)
                except ModelUnavailable:
                    target.unlink()  # a corrupted cache entry: fetch it again
            partial = cache_dir / f".{sha256}.{os.getpid()}.partial"
            try:
                _fetch(uri, partial, endpoint_url, connect_timeout_s, max_attempts)
                _check(partial, sha256, gguf)
                with partial.open("rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
    except Timeout as exc:
        raise ModelUnavailable(
            f"timed out after {lock_timeout_s}s waiting for another process to fetch {uri}") from exc
    return AcquiredModel(target, sha256, name, True, time.perf_counter() - started)


def sibling_uri(manifest_uri: str, name: str) -> str:
    """The URI of ``name`` next to ``manifest_uri`` (same S3 prefix or directory)."""
    if manifest_uri.startswith("s3://"):
        return manifest_uri.rsplit("/", 1)[0] + "/" + name
    return str(Path(manifest_uri.removeprefix("file://")).parent / name)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker child needs to build its engine, all files verified and local.

    ``name``/``sha256`` identify the model in results (the manifest's, or the bare GGUF's).
    """

    name: str
    sha256: str
    base: Path
    adapter: Path | None
    head: Path | None
    decoder: str
    prompt_style: str
    max_ticket_tokens: int | None
    seconds: float
    downloaded: bool
    #: the manifest's calibration temperature (1.0: none) and precision-targeted threshold
    temperature: float = 1.0
    threshold: float | None = None
    #: the manifest's beta calibration of the top-label confidence (None: none)
    beta: tuple[float, float, float] | None = None


def resolve_model(*, model_uri: str, model_sha256: str, manifest_uri: str,
                  manifest_sha256: str | None, taxonomy_sha256: str, cache_dir: Path,
                  endpoint_url: str | None = None, connect_timeout_s: float = 5.0,
                  max_attempts: int = 3, lock_timeout_s: float = 600.0) -> ModelSpec:
    """Acquire a bare GGUF (``model_uri``) or everything a manifest (``manifest_uri``) lists.

    With a manifest, every file is verified against the sha256 the manifest records, the
    manifest itself against ``manifest_sha256`` when given, and its taxonomy hash must equal
    ``taxonomy_sha256``. Raises ``ModelUnavailable`` with the reason otherwise.
    """
    from pydantic import ValidationError

    from models.manifest import Manifest

    opts = {"endpoint_url": endpoint_url, "connect_timeout_s": connect_timeout_s,
            "max_attempts": max_attempts, "lock_timeout_s": lock_timeout_s}
    if not manifest_uri:
        got = acquire_model(model_uri, model_sha256, cache_dir, **opts)  # type: ignore[arg-type]
        return ModelSpec(got.name, got.sha256, got.path, None, None, "trie", "catalog", None,
                         got.seconds, got.downloaded)
    started = time.perf_counter()
    staging = cache_dir / f".manifest.{os.getpid()}.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(manifest_uri, staging, endpoint_url, connect_timeout_s, max_attempts)
        digest = sha256_file(staging)
        if manifest_sha256 and digest != manifest_sha256:
            raise ModelUnavailable(f"manifest {manifest_uri} has sha256 {digest}, expected "
                                   f"{manifest_sha256}: refusing it")
        manifest = Manifest.model_validate_json(staging.read_text())
    except ValidationError as exc:
        raise ModelUnavailable(f"manifest {manifest_uri} is invalid: {exc}") from exc
    finally:
        staging.unlink(missing_ok=True)
    if manifest.taxonomy.sha256 != taxonomy_sha256:
        raise ModelUnavailable(
            f"model {manifest.name} was trained for taxonomy {manifest.taxonomy.name}@"
            f"{manifest.taxonomy.sha256[:12]}, but this worker routes with "
            f"@{taxonomy_sha256[:12]}: refusing to serve it")
    paths: dict[str, Path] = {}
    downloaded = False
    for role, ref in (("base", manifest.base_model), ("adapter", manifest.adapter),
                      ("head", manifest.head)):
        if ref is None:
            continue
        got = acquire_model(sibling_uri(manifest_uri, ref.path), ref.sha256, cache_dir,
                            suffix=Path(ref.path).suffix, **opts)  # type: ignore[arg-type]
        paths[role] = got.path
        downloaded |= got.downloaded
    return ModelSpec(manifest.name, digest, paths["base"], paths.get("adapter"), paths.get("head"),
                     manifest.decoder, manifest.prompt_style, manifest.max_ticket_tokens,
                     time.perf_counter() - started, downloaded,
                     manifest.calibration.temperature if manifest.calibration else 1.0,
                     manifest.selective.threshold if manifest.selective else None,
                     tuple(manifest.calibration.beta)  # type: ignore[arg-type]
                     if manifest.calibration and manifest.calibration.beta else None)


def resolve_from_settings(settings: WorkerSettings, taxonomy_sha256: str) -> ModelSpec:
    """``resolve_model`` with a worker's settings (the worker parent and ``thinfleet fetch-model``,
    a Kubernetes initContainer, acquire the same files into the same cache this way)."""
    return resolve_model(
        model_uri=settings.model_uri, model_sha256=settings.model_sha256,
        manifest_uri=settings.model_manifest, manifest_sha256=settings.manifest_sha256,
        taxonomy_sha256=taxonomy_sha256, cache_dir=settings.model_cache_dir,
        endpoint_url=settings.s3_endpoint_url, connect_timeout_s=settings.s3_connect_timeout_s,
        max_attempts=settings.s3_max_attempts, lock_timeout_s=settings.model_lock_timeout_s)
