"""`injector kube-inject`, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.pods import pod


def kube_inject(*args: str, stdin: str | None = None, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector", "kube-inject", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
    )


def template(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"labels": labels or {"app": "shop"}},
            "spec": {"containers": [{"name": "shop", "image": "shop:1"}]}}


def workload(kind: str, api_version: str = "apps/v1", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"template": template(), **spec}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        body.setdefault("selector", {"matchLabels": {"app": "shop"}})
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": kind.lower()},
            "spec": body}


CRONJOB = {
    "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report"},
    "spec": {"schedule": "0 * * * *",
             "jobTemplate": {"spec": {"template": {**template(),
                                                   "spec": {**template()["spec"],
                                                            "restartPolicy": "OnFailure"}}}}},
}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop"},
           "spec": {"selector": {"app": "shop"}, "ports": [{"port": 80, "targetPort": 8080}]}}
JOB = workload("Job", "batch/v1")
JOB["spec"]["template"]["spec"]["restartPolicy"] = "Never"


def injected_template(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] == "Pod":
        return document
    if document["kind"] == "CronJob":
        return document["spec"]["jobTemplate"]["spec"]["template"]
    return document["spec"]["template"]


def assert_injected(pod_like: dict[str, Any]) -> None:
    spec = pod_like["spec"]
    assert spec["initContainers"][-1]["name"] == "istio-init"
    assert spec["containers"][-1]["name"] == "istio-proxy"
    assert "sidecar.istio.io/status" in pod_like["metadata"]["annotations"]


def test_every_workload_kind_in_a_multi_document_file(tmp_path: Path) -> None:
    documents = [pod(), workload("Deployment"), workload("StatefulSet", serviceName="shop"),
                 workload("DaemonSet"), workload("ReplicaSet"), JOB, CRONJOB, SERVICE]
    manifest = tmp_path / "app.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    done = kube_inject("-f", str(manifest))
    assert done.returncode == 0, done.stderr
    out = list(yaml.safe_load_all(done.stdout))
    assert [d["kind"] for d in out] == [d["kind"] for d in documents]
    for document in out[:-1]:
        assert_injected(injected_template(document))
        kubernetes_validate.validate(document, "1.33", strict=True)
    assert out[-1] == SERVICE
    deployment_labels = out[1]["spec"]["template"]["metadata"]["labels"]
    assert deployment_labels["service.istio.io/canonical-name"] == "shop"
    # Only the template changes: the workload's own fields are kept.
    assert out[1]["spec"]["selector"] == documents[1]["spec"]["selector"]


def test_a_list_is_injected_item_by_item_from_stdin() -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [workload("Deployment"), SERVICE]}
    done = kube_inject("-f", "-", stdin=yaml.safe_dump(listing))
    assert done.returncode == 0, done.stderr
    (out,) = list(yaml.safe_load_all(done.stdout))
    assert out["kind"] == "List"
    assert_injected(out["items"][0]["spec"]["template"])
    assert out["items"][1] == SERVICE


def test_opted_out_templates_and_injected_pods_pass_through(tmp_path: Path) -> None:
    opted_out = workload("Deployment")
    opted_out["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    annotated_out = pod(annotations={"sidecar.istio.io/inject": "false"})
    first = kube_inject("-f", "-", stdin=yaml.safe_dump(pod()))
    already = yaml.safe_load(first.stdout)
    done = kube_inject("-f", "-", stdin=yaml.safe_dump_all([opted_out, annotated_out, already]))
    assert done.returncode == 0, done.stderr
    assert list(yaml.safe_load_all(done.stdout)) == [opted_out, annotated_out, already]


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
