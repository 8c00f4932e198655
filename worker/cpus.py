"""How many CPUs this process really has, and how many llama.cpp threads each child gets.

``os.cpu_count()`` reports the host's cores, not the ones a container may use. We take the
smaller of the scheduler affinity mask and the cgroup CPU quota (v2 ``cpu.max`` or v1
``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded down but at least 1, then divide by the
pool's concurrency. Oversubscribing cores with llama.cpp threads is not a small loss: with
OpenMP's default active wait, two busy processes collapsed prompt speed from ~500 to ~21 tok/s on
a 2-core machine (measured here, see README). ``OMP_WAIT_POLICY=PASSIVE`` is set for the same
reason, before llama.cpp (and so libgomp) is loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU limit in CPUs (e.g. 1.5), or ``None`` when unlimited or unknown."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1q, v1p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1q.is_file() and v1p.is_file():
            quota_us = int(v1q.read_text())
            return None if quota_us <= 0 else quota_us / int(v1p.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: min(affinity mask, floor(cgroup quota)), at least 1."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    cpus = affinity if quota is None else min(affinity, math.floor(quota))
    return max(1, cpus)


@dataclass(frozen=True)
class ThreadPlan:
    """The thread choice logged at boot: ``threads`` per child for ``concurrency`` children."""

    cpus: int
    concurrency: int
    threads: int
    source: str


def plan_threads(concurrency: int, override: int = 0, root: Path = CGROUP_ROOT) -> ThreadPlan:
    """Threads per child = ``override`` if > 0, else max(1, available_cpus // concurrency)."""
    cpus = available_cpus(root)
    if override > 0:
        return ThreadPlan(cpus, concurrency, override, "THINFLEET_THREADS_PER_CHILD")
    return ThreadPlan(cpus, concurrency, max(1, cpus // max(1, concurrency)), "cpus/concurrency")


def set_openmp_passive() -> None:
    """Make OpenMP threads sleep instead of spin between parallel regions.

    Must run before ``llama_cpp`` is imported in this process: libgomp reads the variable once,
    when it is loaded. An operator's explicit setting wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
