"""What a pod gets besides the containers: the labels and annotations it lacks, the names it
must not already use, and its workload's name."""

from __future__ import annotations

import json

import pytest

from injector.injection.overrides import InvalidAnnotation
from injector.injection.sidecar import NameConflict, build, workload_name
from injector.mesh.config import MeshConfig
from tests.support.pods import pod, replicaset_pod

MESH = MeshConfig()


def test_status_and_default_container_annotations() -> None:
    injection = build(pod(containers=[{"name": "shop", "image": "a"},
                                      {"name": "cache", "image": "b"}]), MESH)
    status = json.loads(injection.annotations["sidecar.istio.io/status"])
    assert status == {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": ["workload-certs", "istio-envoy", "istio-data", "istio-podinfo",
                    "istio-token", "istiod-ca-cert"],
        "revision": "default",
    }
    assert injection.annotations["kubectl.kubernetes.io/default-container"] == "shop"
    assert injection.annotations["kubectl.kubernetes.io/default-logs-container"] == "shop"
    assert injection.annotations["prometheus.io/scrape"] == "true"
    assert injection.annotations["prometheus.io/port"] == "15090"
    assert injection.annotations["prometheus.io/path"] == "/stats/prometheus"


def test_the_revision_is_recorded_on_the_pod_as_istio_does() -> None:
    assert build(pod(), MESH).annotations["istio.io/rev"] == "default"
    canary = MeshConfig(revision="canary")
    assert build(pod(), canary).annotations["istio.io/rev"] == "canary"
    own = build(pod(annotations={"istio.io/rev": "canary"}), MESH)
    assert "istio.io/rev" not in own.annotations  # the pod's own is kept


def test_the_pods_own_prometheus_and_default_container_annotations_win() -> None:
    injection = build(pod(annotations={"prometheus.io/port": "9090",
                                       "kubectl.kubernetes.io/default-container": "app"}), MESH)
    assert not any(key.startswith("prometheus.io/") for key in injection.annotations)
    assert "kubectl.kubernetes.io/default-container" not in injection.annotations
    # Each is added unless the pod has it, as Istio does.
    assert injection.annotations["kubectl.kubernetes.io/default-logs-container"] == "app"
    logs_set = build(pod(annotations={"kubectl.kubernetes.io/default-logs-container": "x"}), MESH)
    assert "kubectl.kubernetes.io/default-logs-container" not in logs_set.annotations
    assert logs_set.annotations["kubectl.kubernetes.io/default-container"] == "app"


@pytest.mark.parametrize(
    ("labels", "name", "revision"),
    [
        ({"app.kubernetes.io/name": "cart", "app": "x", "app.kubernetes.io/version": "2.1",
          "version": "v9"}, "cart", "2.1"),
        ({"app": "cart", "version": "v3"}, "cart", "v3"),
        ({}, "web-7d4b9c-x2x9z", "latest"),
    ],
)
def test_canonical_labels(labels: dict[str, str], name: str, revision: str) -> None:
    added = build(pod(labels=labels), MESH).labels
    assert added["security.istio.io/tlsMode"] == "istio"
    assert added["service.istio.io/canonical-name"] == name
    assert added["service.istio.io/canonical-revision"] == revision


def test_a_replicaset_pod_is_named_after_its_deployment() -> None:
    unlabelled = replicaset_pod()
    del unlabelled["metadata"]["labels"]["app"]
    assert workload_name(unlabelled) == "reviews-v1"
    assert build(unlabelled, MESH).labels["service.istio.io/canonical-name"] == "reviews-v1"


def test_a_malformed_override_refuses_the_whole_injection() -> None:
    with pytest.raises(InvalidAnnotation) as refused:
        build(pod(annotations={"sidecar.istio.io/proxyCPU": "lots"}), MESH)
    assert refused.value.annotation == "sidecar.istio.io/proxyCPU"


@pytest.mark.parametrize(
    "conflicting",
    [
        pod(volumes=[{"name": "istio-envoy", "emptyDir": {}}]),
        pod(containers=[{"name": "istio-init", "image": "busybox"}]),
    ],
)
def test_a_pod_using_the_sidecars_names_is_refused(conflicting: dict) -> None:
    with pytest.raises(NameConflict):
        build(conflicting, MESH)


@pytest.mark.parametrize(
    ("metadata", "name"),
    [
        ({"name": "web-1", "ownerReferences": True}, "web-1"),
        ({"name": "web-1", "ownerReferences": [{"controller": True, "name": 7}]}, "web-1"),
        ({"name": {"not": "a name"}, "generateName": "batch-"}, "batch"),
        ({"name": 12}, "unknown"),
    ],
)
def test_a_malformed_owner_or_name_never_breaks_injection(metadata: dict, name: str) -> None:
    malformed = pod()
    malformed["metadata"] = metadata
    assert workload_name(malformed) == name
    assert build(malformed, MESH).labels["service.istio.io/canonical-name"] == name


def test_canonical_names_are_valid_label_values() -> None:
    long_pod = pod(name="a" * 70 + "-0")
    assert build(long_pod, MESH).labels["service.istio.io/canonical-name"] == "a" * 63
    dotted = pod()
    dotted["metadata"] = {"name": "odd name/with:chars-"}
    assert build(dotted, MESH).labels["service.istio.io/canonical-name"] == "odd-name-with-chars"
