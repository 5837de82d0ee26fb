"""The MutatingWebhookConfiguration: its fields, and which pods its selectors send to it."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import yaml

from injector.injection.policy import ALREADY_INJECTED, decide
from injector.mesh.config import MeshConfig
from injector.mesh.names import STATUS_ANNOTATION
from tests.support.deploy import (
    NAMESPACE,
    NAMESPACE_LABELS,
    NOT_INJECTED_YET,
    POD_LABELS,
    ROOT,
    SYSTEM_NAMESPACES,
    conditions_match,
    find,
    selector_matches,
    webhooks_called,
)


def test_selector_matcher_can_fail() -> None:
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "In", "values": ["x"]}]}, {"a": "y"})
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "NotIn", "values": ["x"]}]}, {"a": "x"})
    assert selector_matches({"matchExpressions": [
        {"key": "a", "operator": "NotIn", "values": ["x"]}]}, {})
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "DoesNotExist"}]}, {"a": ""})
    assert not selector_matches({"matchLabels": {"a": "x"}}, {})


def test_webhook_fields(webhook_config: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    hooks = webhook_config["webhooks"]
    assert len(hooks) == 4
    names = [hook["name"] for hook in hooks]
    assert len(set(names)) == 4
    service = find(objects, "Service", "injector")
    for hook in hooks:
        # Fully qualified names, as the API server requires (at least three DNS labels).
        assert re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+){2,}", hook["name"]), hook["name"]
        assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
        assert hook["sideEffects"] == "None"
        assert hook["failurePolicy"] == "Fail"
        assert hook["timeoutSeconds"] == 10
        assert hook["reinvocationPolicy"] == "IfNeeded"
        # Not called again for the pod it injected (on reinvocation): one call per pod.
        assert hook["matchConditions"] == [NOT_INJECTED_YET]
        assert hook["clientConfig"] == {"service": {
            "name": service["metadata"]["name"], "namespace": NAMESPACE, "path": "/inject",
            "port": service["spec"]["ports"][0]["port"],
        }}, "caBundle must stay out of the manifest: the server patches it"
        assert hook["rules"] == [{
            "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["pods"], "scope": "Namespaced",
        }]
    by_name = dict(zip(names, hooks, strict=True))
    namespace_hook = next(h for h in hooks if h["name"].startswith("namespace."))
    object_hook = next(h for h in hooks if h["name"].startswith("object."))
    rev_namespace_hook = next(h for h in hooks if h["name"].startswith("rev-default.namespace."))
    rev_object_hook = next(h for h in hooks if h["name"].startswith("rev-default.object."))
    assert set(by_name) == {hook["name"] for hook in (
        namespace_hook, object_hook, rev_namespace_hook, rev_object_hook)}
    assert {"key": "istio-injection", "operator": "In", "values": ["enabled"]} in (
        namespace_hook["namespaceSelector"]["matchExpressions"])
    assert namespace_hook["objectSelector"] == {"matchExpressions": [
        {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}
    # As Istio's default revision: istio.io/rev, on the namespace or the pod, leaves the pod to
    # the revision it names (another installation's webhooks), so no pod is sent to both.
    for key in ("istio-injection", "istio.io/rev"):
        assert {"key": key, "operator": "DoesNotExist"} in (
            object_hook["namespaceSelector"]["matchExpressions"])
    assert object_hook["objectSelector"] == {"matchExpressions": [
        {"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]},
        {"key": "istio.io/rev", "operator": "DoesNotExist"}]}
    # Istio's default revision's own istio.io/rev=default webhooks: the namespace's
    # istio-injection wins over its istio.io/rev, and a pod's label counts only in a namespace
    # with neither (tests/deploy/test_revision.py holds them to Istio's chart).
    opted_out = {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}
    assert rev_namespace_hook["namespaceSelector"]["matchExpressions"][:2] == [
        {"key": "istio.io/rev", "operator": "In", "values": ["default"]},
        {"key": "istio-injection", "operator": "DoesNotExist"}]
    assert rev_namespace_hook["objectSelector"] == {"matchExpressions": [opted_out]}
    assert rev_object_hook["namespaceSelector"]["matchExpressions"][:2] == [
        {"key": "istio-injection", "operator": "DoesNotExist"},
        {"key": "istio.io/rev", "operator": "DoesNotExist"}]
    assert rev_object_hook["objectSelector"] == {"matchExpressions": [
        opted_out, {"key": "istio.io/rev", "operator": "In", "values": ["default"]}]}


# Istio's: which of its webhooks (namespace.*, object.*) is called for labels without
# istio.io/rev (tests/deploy/test_revision.py has the istio.io/rev cases).
EXPECTED = {
    ("enabled", "true"): "namespace", ("enabled", "unset"): "namespace",
    ("enabled", "false"): None,
    ("disabled", "true"): None, ("disabled", "unset"): None, ("disabled", "false"): None,
    ("unlabelled", "true"): "object", ("unlabelled", "unset"): None,
    ("unlabelled", "false"): None,
}


@pytest.mark.parametrize(("namespace_case", "pod_case"),
                         list(itertools.product(NAMESPACE_LABELS, POD_LABELS)))
def test_selectors_call_exactly_istios_webhook(
    webhook_config: dict[str, Any], namespace_case: str, pod_case: str
) -> None:
    called = webhooks_called(
        webhook_config, "demo", NAMESPACE_LABELS[namespace_case], POD_LABELS[pod_case]
    )
    # Mutually exclusive: never more than one, so a pod is never injected twice.
    assert len(called) <= 1
    expected = EXPECTED[(namespace_case, pod_case)]
    assert [name.split(".")[0] for name in called] == ([expected] if expected else [])


@pytest.mark.parametrize("namespace", [*SYSTEM_NAMESPACES, NAMESPACE])
@pytest.mark.parametrize("namespace_case", list(NAMESPACE_LABELS))
def test_system_namespaces_never_call_the_webhook(
    webhook_config: dict[str, Any], namespace: str, namespace_case: str
) -> None:
    for pod_labels in POD_LABELS.values():
        assert webhooks_called(
            webhook_config, namespace, NAMESPACE_LABELS[namespace_case], pod_labels
        ) == []


def test_injector_namespace_is_not_injected(
    webhook_config: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    namespace = find(objects, "Namespace")
    pod_labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for labels in (pod_labels, POD_LABELS["true"]):
        assert webhooks_called(webhook_config, "elsewhere",
                               namespace["metadata"]["labels"], labels) == []


def test_examples_reach_the_webhooks_their_comments_say(webhook_config: dict[str, Any]) -> None:
    examples = ROOT / "examples"
    demo = yaml.safe_load((examples / "namespace.yaml").read_text())
    namespaces = {demo["metadata"]["name"]: demo["metadata"]["labels"], "default": {}}

    def called(path: str) -> list[str]:
        pod = yaml.safe_load((examples / path).read_text())
        namespace = pod["metadata"]["namespace"]
        return webhooks_called(webhook_config, namespace, namespaces[namespace],
                               pod["metadata"].get("labels", {}))

    assert [n.split(".")[0] for n in called("pod.yaml")] == ["namespace"]
    assert called("opted-out-pod.yaml") == []
    assert [n.split(".")[0] for n in called("annotated-pod.yaml")] == ["object"]


@pytest.mark.parametrize("namespace_case", list(NAMESPACE_LABELS))
@pytest.mark.parametrize("pod_case", list(POD_LABELS))
def test_an_injected_pod_calls_no_webhook_but_a_host_network_one_as_before(
    webhook_config: dict[str, Any], namespace_case: str, pod_case: str
) -> None:
    """The reinvocation after the API server's own plugins change the injected pod is not sent:
    the pod carries our status annotation. A hostNetwork pod is sent as without it (the server
    decides it host-network, first)."""
    pod_in = (webhook_config, "demo", NAMESPACE_LABELS[namespace_case], POD_LABELS[pod_case])
    injected = {STATUS_ANNOTATION: '{"containers":["istio-proxy"]}'}
    assert webhooks_called(*pod_in, injected) == []
    assert webhooks_called(*pod_in, {"other": "x"}) == webhooks_called(*pod_in)
    assert webhooks_called(*pod_in, injected, host_network=True) == webhooks_called(*pod_in)


@pytest.mark.parametrize("annotations", [
    None, {}, {"other": "x"}, {STATUS_ANNOTATION: ""}, {STATUS_ANNOTATION: "{}"},
    {STATUS_ANNOTATION: "{}", "sidecar.istio.io/inject": "true"},
])
@pytest.mark.parametrize("host_network", [None, False, True])
def test_the_condition_stops_exactly_the_pods_the_server_skips_as_already_injected(
    annotations: dict[str, str] | None, host_network: bool | None
) -> None:
    """What the CEL condition stops is decision 2 and nothing else: a pod it lets through is
    decided by the server as without it, and one it stops is one the server would skip as
    already-injected (whatever the namespace's labels)."""
    pod: dict[str, Any] = {"metadata": {"name": "web"}, "spec": {"containers": [{"name": "a"}]}}
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    if host_network is not None:
        pod["spec"]["hostNetwork"] = host_network
    for labels in NAMESPACE_LABELS.values():
        skipped = decide(pod, "demo", labels, MeshConfig()) == ALREADY_INJECTED
        assert conditions_match([NOT_INJECTED_YET], annotations or {},
                                host_network is True) is not skipped
