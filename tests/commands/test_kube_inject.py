"""`injector kube-inject`, run as a user runs it: the arguments, the files, the exit status.
(What in a manifest is injected: tests/injection/test_manifests.py.)"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.pods import pod


def _memory_capped() -> None:
    """In the child: at most 2 GiB of address space, so that a kube-inject that reads without
    end fails there rather than taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def kube_inject(*args: str, stdin: str | None = None, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector", "kube-inject", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
        preexec_fn=_memory_capped,
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


def assert_one_line_exit_2(done: subprocess.CompletedProcess[str], words: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert words in lines[0] and len(lines[0]) < 500


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        ("kind: Pod\nmetadata: [web]\nspec: {containers: [{name: app, image: a}]}\n",
         "metadata must be an object"),
        ("kind: Pod\nmetadata: {name: web, annotations: {1: x}}\n"
         "spec: {containers: [{name: app, image: a}]}\n", "metadata.annotations"),
        ("kind: Pod\nmetadata: {name: web}\nspec: {containers: " + "[" * 5000 + "]" * 5000
         + "}\n", "line 3"),
        ("kind: Pod\nmetadata: {name: web}\nspec: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
         "line 3"),
        ("kind: Pod\nmetadata: {name: web}\nspec:\n" + "".join(
            " " * depth + "a:\n" for depth in range(1, 300)), "nested deeper than 100"),
        ('kind: Pod\nmetadata: {name: "\\ud800"}\nspec: {containers: [{name: a}]}\n',
         "injector"),
    ],
)
def test_a_malformed_manifest_is_one_line_and_exit_2(tmp_path: Path, manifest: str,
                                                     words: str) -> None:
    # The rows: each was a traceback and exit 1.
    path = tmp_path / "bad.yaml"
    path.write_text(manifest)
    assert_one_line_exit_2(kube_inject("-f", str(path)), words)
    assert_one_line_exit_2(kube_inject("-f", "-", stdin=manifest), words)


def test_dev_zero_is_refused_past_the_cap_not_read_until_memory_runs_out() -> None:
    assert_one_line_exit_2(kube_inject("-f", "/dev/zero"), "larger than 8 MiB")
    with Path("/dev/zero").open("rb") as zeros:
        done = subprocess.run([sys.executable, "-m", "injector", "kube-inject", "-f", "-"],
                              stdin=zeros, capture_output=True, text=True, timeout=60,
                              check=False, preexec_fn=_memory_capped)
    assert_one_line_exit_2(done, "stdin: larger than 8 MiB")


@pytest.mark.parametrize(("content", "words"), [
    (b"kind: Pod\n\xff\xfe\n", "not UTF-8"),
    (b"kind: Pod\x00\n", "bad.yaml"),
])
def test_bytes_that_are_not_yaml_text_are_one_line_and_exit_2(tmp_path: Path, content: bytes,
                                                              words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert_one_line_exit_2(kube_inject("-f", str(path)), words)


def test_a_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert_one_line_exit_2(kube_inject("-f", str(tmp_path)), "cannot read")
