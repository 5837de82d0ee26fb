"""examples/: every document is a valid Kubernetes object (strict, 1.33), before and after
`injector kube-inject`, and each example shows what its comments say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
K8S_VERSION = "1.33"
FILES = sorted(EXAMPLES.glob("*.yaml"))
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load(name: str) -> list[dict[str, Any]]:
    return documents(EXAMPLES / name)


def validate_strict(obj: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata'].get('name')}: {path}: "
                    f"{error.message}")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def pod_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]


def test_the_examples_are_there() -> None:
    assert {path.name for path in FILES} >= {
        "pod.yaml", "deployment.yaml", "opted-out-pod.yaml", "annotated-pod.yaml",
        "namespace.yaml", "multi.yaml",
    }


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_every_document_validates_strict(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path.name} has no document"
    for doc in docs:
        validate_strict(doc, path.name)


def test_strict_validation_catches_a_misplaced_field() -> None:
    pod = load("pod.yaml")[0]
    pod["spec"]["containers"][0]["port"] = 8080  # `ports` misspelled
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_workloads_are_self_consistent(path: Path) -> None:
    for doc in documents(path):
        if doc["kind"] not in POD_KINDS:
            continue
        spec = pod_spec(doc)
        names = [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]
        assert len(names) == len(set(names))
        # Injection must never clash with the pod's own names.
        assert not {"istio-proxy", "istio-init"} & set(names)
        assert "sidecar.istio.io/status" not in pod_metadata(doc).get("annotations", {})
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert "resources" in container, container["name"]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes
        if doc["kind"] != "Pod":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_namespace_is_opted_in() -> None:
    (namespace,) = load("namespace.yaml")
    assert namespace["kind"] == "Namespace"
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    # The pods that say so live in it.
    for name in ("pod.yaml", "deployment.yaml", "opted-out-pod.yaml"):
        assert load(name)[0]["metadata"]["namespace"] == namespace["metadata"]["name"]


def test_plain_pod_has_ports_probes_env_resources() -> None:
    (pod,) = load("pod.yaml")
    assert pod["kind"] == "Pod"
    container = pod["spec"]["containers"][0]
    for field in ("ports", "readinessProbe", "livenessProbe", "env", "resources"):
        assert container[field], field
    assert "sidecar.istio.io/inject" not in pod["metadata"].get("labels", {})


def test_deployment_has_app_and_version() -> None:
    (deployment,) = load("deployment.yaml")
    assert deployment["kind"] == "Deployment"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert {"app", "version"} <= set(labels)
    assert deployment["spec"]["template"]["spec"]["initContainers"]


def test_opted_out_pod() -> None:
    (pod,) = load("opted-out-pod.yaml")
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def test_annotated_pod() -> None:
    (pod,) = load("annotated-pod.yaml")
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    annotations = pod["metadata"]["annotations"]
    for key in ("sidecar.istio.io/proxyCPU", "sidecar.istio.io/proxyMemory",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges"):
        assert annotations[key]
    assert all(isinstance(value, str) for value in annotations.values())


def test_multi_document() -> None:
    docs = load("multi.yaml")
    by_kind = {doc["kind"]: doc for doc in docs}
    assert sorted(by_kind) == ["ConfigMap", "Deployment", "Service"]
    service, deployment = by_kind["Service"], by_kind["Deployment"]
    template = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names
    referenced = [source["configMapRef"]["name"] for c in template["spec"]["containers"]
                  for source in c.get("envFrom", []) if "configMapRef" in source]
    assert referenced == [by_kind["ConfigMap"]["metadata"]["name"]]


# ---- after `injector kube-inject` ----

def kube_inject(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "injector", "kube-inject", "-f", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, f"kube-inject {path.name}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def containers_of(obj: dict[str, Any]) -> list[str]:
    spec = pod_spec(obj)
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_injected_examples_still_validate(path: Path) -> None:
    before = documents(path)
    after = kube_inject(path)
    assert [d["kind"] for d in after] == [d["kind"] for d in before]
    for original, injected in zip(before, after, strict=True):
        validate_strict(injected, f"{path.name} after kube-inject")
        if original["kind"] not in POD_KINDS:
            assert injected == original, "non-pod documents pass through unchanged"
            continue
        opted_out = pod_metadata(original).get("labels", {}).get(
            "sidecar.istio.io/inject") == "false"
        if opted_out:
            assert injected == original
        else:
            names = containers_of(injected)
            assert {"istio-init", "istio-proxy"} <= set(names), path.name
            # The pod's own containers are all still there, in their order.
            own = containers_of(original)
            assert [name for name in names if name in own] == own


def test_annotated_pod_overrides_reach_the_proxy() -> None:
    (pod,) = kube_inject(EXAMPLES / "annotated-pod.yaml")
    spec = pod["spec"]
    proxy = next(c for c in spec["containers"] + spec.get("initContainers", [])
                 if c["name"] == "istio-proxy")
    assert proxy["resources"]["requests"] == {"cpu": "200m", "memory": "256Mi"}
    assert proxy["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    init = next(c for c in spec["initContainers"] if c["name"] == "istio-init")
    command = " ".join(init.get("command", []) + init.get("args", []))
    assert "169.254.169.254/32" in command
