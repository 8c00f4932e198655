"""Model acquisition against a real S3 endpoint (moto's standalone server)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from models.errors import ModelUnavailable
from thinfleet import devstack
from worker.acquire import acquire_model


def test_download_verify_then_cache(tmp_path: Path, model_uri: str, model_sha: str,
                                    s3_endpoint: str) -> None:
    first = acquire_model(model_uri, model_sha, tmp_path, endpoint_url=s3_endpoint)
    assert first.downloaded and first.path == tmp_path / f"{model_sha}.gguf"
    second = acquire_model(model_uri, model_sha, tmp_path, endpoint_url=s3_endpoint)
    assert not second.downloaded
    assert not list(tmp_path.glob("*.partial"))


def test_sha256_mismatch_is_refused_and_nothing_is_cached(
        tmp_path: Path, model_uri: str, s3_endpoint: str) -> None:
    with pytest.raises(ModelUnavailable, match="expected 0000"):
        acquire_model(model_uri, "0" * 64, tmp_path, endpoint_url=s3_endpoint)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.partial"))


def test_corrupt_cache_is_fetched_again(tmp_path: Path, model_uri: str, model_sha: str,
                                        s3_endpoint: str) -> None:
    (tmp_path / f"{model_sha}.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    acquired = acquire_model(model_uri, model_sha, tmp_path, endpoint_url=s3_endpoint)
    assert acquired.downloaded


def test_not_a_gguf_is_refused(tmp_path: Path, s3_endpoint: str) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"<html>not a model</html>")
    uri = devstack.upload(s3_endpoint, bogus, "models", "bogus.gguf")
    with pytest.raises(ModelUnavailable, match="not a GGUF"):
        acquire_model(uri, "1" * 64, tmp_path / "cache", endpoint_url=s3_endpoint)


def test_missing_object_is_refused(tmp_path: Path, s3_endpoint: str, model_sha: str) -> None:
    with pytest.raises(ModelUnavailable, match="S3 said"):
        acquire_model("s3://models/no/such.gguf", model_sha, tmp_path, endpoint_url=s3_endpoint)


def test_unreachable_s3_is_refused_quickly(tmp_path: Path, model_sha: str) -> None:
    dead = f"http://127.0.0.1:{devstack.free_port()}"
    with pytest.raises(ModelUnavailable, match="cannot download"):
        acquire_model("s3://models/x.gguf", model_sha, tmp_path, endpoint_url=dead,
                      connect_timeout_s=1, max_attempts=1)


def test_missing_local_file_and_unset_uri_are_refused(tmp_path: Path, model_sha: str) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        acquire_model(str(tmp_path / "nope.gguf"), model_sha, tmp_path)
    with pytest.raises(ModelUnavailable, match="THINFLEET_MODEL_URI"):
        acquire_model("", model_sha, tmp_path)


def _acquire(args: tuple[str, str, str, str]) -> bool:
    uri, sha, cache, endpoint = args
    return acquire_model(uri, sha, Path(cache), endpoint_url=endpoint).downloaded


def test_concurrent_workers_download_once(tmp_path: Path, model_uri: str, model_sha: str,
                                          s3_endpoint: str) -> None:
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        downloaded = pool.map(_acquire, [(model_uri, model_sha, str(tmp_path), s3_endpoint)] * 3)
    assert sorted(downloaded) == [False, False, True]


def test_fetch_model_command_fills_the_cache_an_init_container_hands_over(
        tmp_path: Path, model_uri: str, model_sha: str, s3_endpoint: str) -> None:
    """``thinfleet fetch-model`` (the chart's initContainer) caches exactly what the worker's
    boot then finds without downloading; a wrong pin exits 1 with the reason and caches nothing."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "THINFLEET_MODEL_URI": model_uri, "THINFLEET_MODEL_SHA256": model_sha,
           "THINFLEET_S3_ENDPOINT_URL": s3_endpoint, "THINFLEET_MODEL_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "thinfleet.cli", "fetch-model"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sha256"] == model_sha and report["downloaded"]
    assert not acquire_model(model_uri, model_sha, tmp_path, endpoint_url=s3_endpoint).downloaded

    bad = subprocess.run(cmd, env={**env, "THINFLEET_MODEL_SHA256": "0" * 64,
                                   "THINFLEET_MODEL_CACHE_DIR": str(tmp_path / "other")},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "expected 0000" in bad.stderr
    assert not list((tmp_path / "other").glob("*.gguf"))
