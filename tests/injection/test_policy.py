from __future__ import annotations

import pytest

from injector.injection.policy import decide
from injector.mesh.config import MeshConfig
from tests.support.pods import pod

MESH = MeshConfig()
ENABLED = {"istio-injection": "enabled"}
UNLABELLED: dict[str, str] = {}


def test_host_network_pods_are_skipped_even_when_opted_in() -> None:
    decision = decide(pod(labels={"sidecar.istio.io/inject": "true"}, hostNetwork=True),
                      "shop", ENABLED, MESH)
    assert (decision.inject, decision.reason) == (False, "host-network")


@pytest.mark.parametrize(
    "already",
    [
        pod(annotations={"sidecar.istio.io/status": "{}"}),
        pod(annotations={"sidecar.istio.io/status": "{}"},
            containers=[{"name": "app", "image": "a"}, {"name": "istio-proxy", "image": "p"}]),
    ],
)
def test_injected_pods_are_not_injected_again(already: dict) -> None:
    decision = decide(already, "shop", ENABLED, MESH)
    assert (decision.inject, decision.reason) == (False, "already-injected")


@pytest.mark.parametrize(
    "own",
    [
        pod(containers=[{"name": "app", "image": "a"}, {"name": "istio-proxy", "image": "auto"}]),
        pod(init_containers=[{"name": "istio-proxy", "image": "p", "restartPolicy": "Always"}]),
    ],
)
def test_a_pods_own_istio_proxy_without_our_status_is_injected(own: dict) -> None:
    # As Istio: the pod's container is merged over the injected one (`user_containers`).
    assert decide(own, "shop", ENABLED, MESH).inject


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public", "kube-node-lease",
                                       "mesh-system"])
def test_system_and_own_namespaces_are_ignored(namespace: str) -> None:
    decision = decide(pod(labels={"sidecar.istio.io/inject": "true"}), namespace, ENABLED, MESH)
    assert (decision.inject, decision.reason) == (False, "ignored-namespace")


def test_the_ignore_list_comes_from_the_mesh_config() -> None:
    mesh = MeshConfig(ignored_namespaces=("legacy",), injector_namespace="mesh")
    assert decide(pod(), "legacy", ENABLED, mesh).reason == "ignored-namespace"
    assert decide(pod(), "mesh", ENABLED, mesh).reason == "ignored-namespace"
    assert decide(pod(), "kube-system", ENABLED, mesh).inject


def test_a_disabled_namespace_beats_the_pods_yes() -> None:
    opted_in = pod(labels={"sidecar.istio.io/inject": "true"})
    decision = decide(opted_in, "shop", {"istio-injection": "disabled"}, MESH)
    assert (decision.inject, decision.reason) == (False, "namespace-disabled")


def test_the_pod_label_beats_the_annotation_and_the_namespace() -> None:
    no = pod(labels={"sidecar.istio.io/inject": "false"},
             annotations={"sidecar.istio.io/inject": "true"})
    assert (decide(no, "shop", ENABLED, MESH).inject,
            decide(no, "shop", ENABLED, MESH).reason) == (False, "pod-label-false")
    yes = pod(labels={"sidecar.istio.io/inject": "true"},
              annotations={"sidecar.istio.io/inject": "false"})
    disabled_mesh = MeshConfig(policy="disabled")
    decision = decide(yes, "shop", UNLABELLED, disabled_mesh)
    assert (decision.inject, decision.reason) == (True, "pod-label-true")


def test_the_annotation_applies_when_there_is_no_label() -> None:
    no = pod(annotations={"sidecar.istio.io/inject": "false"})
    decision = decide(no, "shop", ENABLED, MESH)
    assert (decision.inject, decision.reason) == (False, "pod-annotation-false")
    yes = pod(annotations={"sidecar.istio.io/inject": "true"})
    decision = decide(yes, "shop", UNLABELLED, MeshConfig(policy="disabled"))
    assert (decision.inject, decision.reason) == (True, "pod-annotation-true")


def test_an_enabled_namespace_injects_unlabelled_pods_whatever_the_policy() -> None:
    decision = decide(pod(), "shop", ENABLED, MeshConfig(policy="disabled"))
    assert (decision.inject, decision.reason) == (True, "namespace-enabled")


def test_the_policy_decides_the_rest() -> None:
    enabled = decide(pod(), "shop", UNLABELLED, MESH)
    disabled = decide(pod(), "shop", UNLABELLED, MeshConfig(policy="disabled"))
    assert (enabled.inject, enabled.reason) == (True, "policy-enabled")
    assert (disabled.inject, disabled.reason) == (False, "policy-disabled")


def test_unknown_namespace_labels_trust_the_webhook_selector() -> None:
    decision = decide(pod(), "shop", None, MeshConfig(policy="disabled"))
    assert (decision.inject, decision.reason) == (True, "namespace-enabled")
