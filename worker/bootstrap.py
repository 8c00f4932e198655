"""Process-wide environment that must be in place before heavy imports.

* ``OMP_WAIT_POLICY=PASSIVE`` before ``llama_cpp`` loads libgomp (see ``worker.cpus``);
* ``PROMETHEUS_MULTIPROC_DIR`` before ``prometheus_client`` picks its value class at import.

The worker parent calls ``prepare_process`` once, before it imports ``worker.metrics``; the
children inherit the environment through fork.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from worker.cpus import set_openmp_passive


def prepare_process(metrics_root: Path) -> Path:
    """Set both variables; return this worker node's fresh metrics directory.

    The directory is ``metrics_root/<parent pid>`` so that several worker nodes on one host keep
    their own files, and one that restarts starts clean. An explicit
    ``PROMETHEUS_MULTIPROC_DIR`` in the environment wins.
    """
    set_openmp_passive()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    path = metrics_root / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path
