"""CPU sizing from affinity and cgroup quotas (pure logic over fake cgroup files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.cpus import available_cpus, cgroup_cpu_quota, plan_threads


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == pytest.approx(2.0)


def test_quota_caps_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one thread
    assert available_cpus(tmp_path) == 1


def test_threads_are_cpus_divided_by_concurrency(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert plan_threads(1, root=tmp_path).threads == cpus
    assert plan_threads(cpus * 2, root=tmp_path).threads == 1
    assert plan_threads(2, override=3, root=tmp_path).threads == 3
