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
    # Metrics merging (on by default, as Istio): Prometheus scrapes the agent.
    assert injection.annotations["prometheus.io/scrape"] == "true"
    assert injection.annotations["prometheus.io/port"] == "15020"
    assert injection.annotations["prometheus.io/path"] == "/stats/prometheus"
    assert injection.prometheus_env is None  # no metrics of the app's to merge


def test_the_revision_is_recorded_on_the_pod_as_istio_does() -> None:
    assert build(pod(), MESH).annotations["istio.io/rev"] == "default"
    canary = MeshConfig(revision="canary")
    assert build(pod(), canary).annotations["istio.io/rev"] == "canary"
    own = build(pod(annotations={"istio.io/rev": "canary"}), MESH)
    assert "istio.io/rev" not in own.annotations  # the pod's own is kept


def test_the_pods_own_prometheus_and_default_container_annotations_win() -> None:
    injection = build(pod(annotations={"prometheus.io/port": "9090",
                                       "prometheus.istio.io/merge-metrics": "false",
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


def test_without_merging_prometheus_scrapes_envoy_on_15090() -> None:
    for mesh, pods_own in ((MeshConfig(enable_prometheus_merge=False), {}),
                           (MESH, {"prometheus.istio.io/merge-metrics": "false"})):
        injection = build(pod(annotations=pods_own), mesh)
        assert injection.annotations["prometheus.io/port"] == "15090"
        assert injection.annotations["prometheus.io/path"] == "/stats/prometheus"
        assert injection.prometheus_env is None


def test_merging_hands_the_apps_metrics_to_the_agent_and_points_prometheus_at_it() -> None:
    """As Istio: the pod's prometheus.io/* go to the proxy in ISTIO_PROMETHEUS_ANNOTATIONS, and
    the pod's annotations are overwritten to scrape the agent, which merges both."""
    injection = build(pod(annotations={"prometheus.io/scrape": "true",
                                       "prometheus.io/port": "9100",
                                       "prometheus.io/path": "/app/metrics"}), MESH)
    assert injection.annotations["prometheus.io/scrape"] == "true"
    assert injection.annotations["prometheus.io/port"] == "15020"
    assert injection.annotations["prometheus.io/path"] == "/stats/prometheus"
    assert injection.prometheus_env is not None
    assert json.loads(injection.prometheus_env) == {"scrape": "true", "path": "/app/metrics",
                                                    "port": "9100"}


def test_a_pod_that_asks_not_to_be_scraped_is_left_alone() -> None:
    # In any spelling Prometheus reads as prometheus.io/scrape, as Istio reads it.
    for key in ("prometheus.io/scrape", "prometheus.io.scrape", "prometheus-io/scrape"):
        injection = build(pod(annotations={key: "false"}), MESH)
        assert not any(key.startswith("prometheus") for key in injection.annotations)
        assert injection.prometheus_env is None


def test_other_spellings_of_the_pods_prometheus_annotations_are_merged_and_removed() -> None:
    injection = build(pod(annotations={"prometheus.io.port": "9100",
                                       "prometheus-io/path": "/m"}), MESH)
    assert injection.annotations["prometheus.io/port"] == "15020"
    assert injection.prometheus_env is not None
    assert json.loads(injection.prometheus_env) == {"scrape": "", "path": "/m", "port": "9100"}
    # Left, Prometheus would pick one of two ports at random: Istio removes them too.
    assert sorted(injection.removals) == ["/metadata/annotations/prometheus-io~1path",
                                          "/metadata/annotations/prometheus.io.port"]


def test_a_pod_already_pointed_at_the_agent_is_not_merged_again() -> None:
    injection = build(pod(annotations={"prometheus.io/port": "15020"}), MESH)
    assert "prometheus.io/port" not in injection.annotations
    assert injection.prometheus_env is None


def test_every_scrape_target_goes_to_the_agent_and_the_annotation_goes_away() -> None:
    """Istio's prometheus.istio.io/scrape-targets (`port:path,...`, /metrics when left out):
    handed to the agent with the pod's other prometheus.io/*, the first also as port and path
    (a target, not prometheus.io/port, is what is scraped), and removed from the pod, as Istio
    removes it."""
    injection = build(pod(annotations={
        "prometheus.io/port": "8080", "prometheus.io/path": "/legacy",
        "prometheus.istio.io/scrape-targets": " 9100:/app/metrics , 9200 "}), MESH)
    assert injection.annotations["prometheus.io/port"] == "15020"
    assert injection.prometheus_env is not None
    assert json.loads(injection.prometheus_env) == {
        "scrape": "", "path": "/app/metrics", "port": "9100",
        "targets": [{"port": "9100", "path": "/app/metrics"},
                    {"port": "9200", "path": "/metrics"}]}
    assert injection.removals == ("/metadata/annotations/prometheus.istio.io~1scrape-targets",)
    # Not scraped (prometheus.io/scrape false) or not merged: left as the pod has it.
    for own in ({"prometheus.io/scrape": "false"}, {"prometheus.istio.io/merge-metrics": "false"}):
        kept = build(pod(annotations={**own, "prometheus.istio.io/scrape-targets": "9100"}), MESH)
        assert kept.prometheus_env is None and kept.removals == ()


@pytest.mark.parametrize(("annotation", "value"), [
    ("prometheus.istio.io/merge-metrics", "maybe"),
    ("prometheus.io/port", "http"),
    ("prometheus.io/port", "70000"),
    ("prometheus.io/port", "15090"),
    ("prometheus.io/port", "15000"),
    ("prometheus.istio.io/scrape-targets", "9100,15000:/stats"),  # Envoy's admin (as Istio)
    ("prometheus.istio.io/scrape-targets", "http:/metrics"),  # (as Istio)
    ("prometheus.istio.io/scrape-targets", ":/metrics"),  # Istio drops all targets silently
    ("prometheus.istio.io/scrape-targets", "9100:/my metrics"),  # cannot be asked for
    ("prometheus.istio.io/scrape-targets", ",".join(str(9100 + n) for n in range(9))),
])
def test_metrics_merging_refuses_what_it_cannot_honour_by_name(annotation: str,
                                                                value: str) -> None:
    with pytest.raises(InvalidAnnotation, match=annotation):
        build(pod(annotations={annotation: value}), MESH)
