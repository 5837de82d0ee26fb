"""The decision table (README, "What it honours") as the real kube-apiserver applies it: pods
created with kubectl, through deploy/'s webhooks and their selectors, then read back as
stored. Injected or not, exactly as the table says; and an injected pod passed the API server's
validation and defaulting after our patch."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.cluster import Cluster, Mesh
from tests.support.pods import pod

INJECT = "sidecar.istio.io/inject"


@pytest.fixture(scope="module")
def namespaces(kube_mesh: Mesh) -> dict[str, str]:
    """One namespace of each kind the table tells apart."""
    cluster = kube_mesh.cluster
    cluster.service_account("kube-system", "default")
    return {
        "enabled": cluster.namespace("enabled", {"istio-injection": "enabled"}),
        "unlabelled": cluster.namespace("unlabelled"),
        "disabled": cluster.namespace("disabled", {"istio-injection": "disabled"}),
        "misspelt": cluster.namespace("misspelt", {"istio-injection": "yes"}),
        "kube-system": "kube-system",
    }


def injected(stored: dict[str, Any]) -> bool:
    names = [container["name"] for container in stored["spec"]["containers"]]
    init_names = [container["name"] for container in stored["spec"].get("initContainers", [])]
    has_proxy, has_init = "istio-proxy" in names, "istio-init" in init_names
    assert has_proxy == has_init, f"half an injection: {names} {init_names}"
    return has_proxy


CASES = [
    # (namespace, pod labels, pod annotations, extra spec, injected?)
    ("enabled", None, None, {}, True),
    ("unlabelled", None, None, {}, False),
    ("disabled", None, None, {}, False),
    ("misspelt", None, None, {}, False),
    ("enabled", {INJECT: "false"}, None, {}, False),
    ("enabled", None, {INJECT: "false"}, {}, False),
    ("unlabelled", {INJECT: "true"}, None, {}, True),
    ("disabled", {INJECT: "true"}, None, {}, False),
    ("kube-system", {INJECT: "true"}, None, {}, False),
    ("enabled", None, None, {"hostNetwork": True}, False),
    ("unlabelled", {INJECT: "true"}, None, {"hostNetwork": True}, False),
]


@pytest.mark.parametrize(("namespace", "labels", "annotations", "spec", "expected"), CASES,
                         ids=["enabled", "unlabelled", "disabled", "label-neither",
                              "enabled-pod-label-false", "enabled-pod-annotation-false",
                              "unlabelled-pod-label-true", "disabled-pod-label-true",
                              "kube-system-pod-label-true", "enabled-host-network",
                              "unlabelled-pod-true-host-network"])
def test_the_stored_pod_is_injected_as_the_table_says(
        kube_mesh: Mesh, namespaces: dict[str, str], namespace: str,
        labels: dict[str, str] | None, annotations: dict[str, str] | None,
        spec: dict[str, Any], expected: bool) -> None:
    manifest = pod("decided", labels=labels, annotations=annotations, **spec)
    del manifest["metadata"]["name"]
    manifest["metadata"]["generateName"] = "decided-"
    stored = kube_mesh.cluster.create_pod(namespaces[namespace], manifest)
    assert injected(stored) is expected


def test_the_injected_pod_passed_validation_and_defaulting(
        kube_mesh: Mesh, namespaces: dict[str, str]) -> None:
    cluster: Cluster = kube_mesh.cluster
    stored = cluster.create_pod(namespaces["enabled"], pod("defaulted"))
    assert stored["metadata"]["uid"]
    assert "sidecar.istio.io/status" in stored["metadata"]["annotations"]
    assert stored["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    proxy = next(c for c in stored["spec"]["containers"] if c["name"] == "istio-proxy")
    init = next(c for c in stored["spec"]["initContainers"] if c["name"] == "istio-init")
    # Defaulting ran on what our patch added, as on anything a user writes.
    for container in (proxy, init):
        assert container["terminationMessagePath"] == "/dev/termination-log"
        assert container["terminationMessagePolicy"] == "File"
        assert container["imagePullPolicy"] in ("Always", "IfNotPresent", "Never")
    # The ServiceAccount admission plugin ran too, after us: its token volume is mounted into
    # every container, ours included.
    mounts = {mount["mountPath"] for mount in proxy["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    volume_names = {volume["name"] for volume in stored["spec"]["volumes"]}
    assert {"workload-certs", "istio-envoy", "istio-token", "istiod-ca-cert"} <= volume_names
