"""`injector kube-inject`, run as a user runs it: the arguments, the files, the exit status.
(What in a manifest is injected: tests/injection/test_manifests.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.pods import pod


def kube_inject(*args: str, stdin: str | None = None, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector", "kube-inject", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
    )


def test_a_multi_document_file_is_injected_to_stdout(tmp_path: Path) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop"},
               "spec": {"selector": {"app": "shop"}, "ports": [{"port": 80}]}}
    manifest = tmp_path / "app.yaml"
    manifest.write_text(yaml.safe_dump_all([pod(), service]))
    done = kube_inject("-f", str(manifest))
    assert done.returncode == 0, done.stderr
    injected, unchanged = yaml.safe_load_all(done.stdout)
    assert injected["spec"]["containers"][-1]["name"] == "istio-proxy"
    assert unchanged == service


def test_output_file_and_mesh_config(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("proxyImage: registry.local/injector:9\nnativeSidecars: true\n")
    target = tmp_path / "out.yaml"
    done = kube_inject("-f", "-", "-o", str(target), "--config", str(config),
                       stdin=yaml.safe_dump(pod()))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    injected = yaml.safe_load(target.read_text())
    proxy = injected["spec"]["initContainers"][1]
    assert proxy["name"] == "istio-proxy" and proxy["restartPolicy"] == "Always"
    assert proxy["image"] == "registry.local/injector:9"


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["-f", "/no/such/file.yaml"], None, "no such file"),
        (["-f", "-"], "kind: Pod\nmetadata: {name: [unclosed\n", "line"),
        ([], None, "-f"),
        (["-f", "-", "--config", "/no/such/mesh.yaml"], "", "config"),
        (["-f", "-"], yaml.safe_dump(pod(annotations={
            "traffic.sidecar.istio.io/includeInboundPorts": "http"})),
         "traffic.sidecar.istio.io/includeInboundPorts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], stdin: str | None,
                                          message: str) -> None:
    done = kube_inject(*args, stdin=stdin)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert message in lines[0]


def test_a_bad_mesh_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("policy: sometimes\n")
    done = kube_inject("-f", "-", "--config", str(config), stdin=yaml.safe_dump(pod()))
    assert done.returncode == 2
    assert "policy" in done.stderr and len(done.stderr.strip().splitlines()) == 1
