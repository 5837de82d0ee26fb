"""The real peers built from Go modules under tests/ (kube-apiserver, etcd, Helm, Istio's CA
client and injector): where their build script put them, and a failing test, never a skip,
that says how to build one that is missing."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_COMMAND = "make cluster-binaries"
CLUSTER_SCRIPT = ROOT / "tests" / "cluster" / "build.sh"
ISTIO_SCRIPT = ROOT / "tests" / "istio" / "build.sh"


@functools.cache
def built_dir(script: Path, flag: str = "--dir") -> Path:
    """The directory `script` builds into for the versions pinned in its go.mod."""
    result = subprocess.run(["bash", str(script), flag], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        pytest.fail(f"{script} {flag} failed: {result.stderr.strip()}", pytrace=False)
    return Path(result.stdout.strip())


def built(script: Path, name: str, flag: str = "--dir") -> Path:
    """The path of the binary `name` that `script` builds; the test fails, saying how to build
    it, when it is not there."""
    path = built_dir(script, flag) / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not built ({path} is missing): run `{BUILD_COMMAND}` (or "
                    f"`bash {script.relative_to(ROOT)}`), which builds it with Go from the "
                    f"go.mod beside that script", pytrace=False)
    return path
