"""The reasoning of `injector check`, without a cluster: label selectors as the API server
evaluates them, the decision's trace, webhooks that overlap, and pods that need a restart."""

from __future__ import annotations

import json
from typing import Any

import pytest

from injector.injection import explain
from injector.injection.explain import Webhook, selector_matches
from injector.injection.policy import decide
from injector.mesh.config import MeshConfig
from tests.support.deploy import DEPLOY, render, webhooks_called
from tests.support.pods import pod

MESH = MeshConfig()
NS_ENABLED = {"istio-injection": "enabled"}


def shipped_webhooks() -> tuple[dict[str, Any], list[Webhook]]:
    configuration = next(obj for obj in render(DEPLOY)
                         if obj["kind"] == "MutatingWebhookConfiguration")
    return configuration, explain.webhooks_of([configuration])


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    (None, {}, True),
    ({}, {"a": "b"}, True),
    ({"matchLabels": {"a": "b"}}, {"a": "b"}, True),
    ({"matchLabels": {"a": "b"}}, {"a": "c"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["b"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["b"]}]}, {"a": "b"},
     False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, {"a": "2"},
     False),
])
def test_label_selectors_as_the_api_server_evaluates_them(
        selector: dict[str, Any] | None, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


@pytest.mark.parametrize("namespace_labels", [NS_ENABLED, {"istio-injection": "disabled"}, {}])
@pytest.mark.parametrize("pod_labels", [{}, {"sidecar.istio.io/inject": "true"},
                                        {"sidecar.istio.io/inject": "false"}])
def test_the_webhooks_called_are_those_the_deploy_tests_expect(
        namespace_labels: dict[str, str], pod_labels: dict[str, str]) -> None:
    configuration, webhooks = shipped_webhooks()
    explanation = explain.explain(pod(labels=pod_labels), "shop", namespace_labels, MESH,
                                  webhooks, "injector")
    called = [m.webhook.split("/")[1] for m in explanation.webhooks if m.called]
    assert called == webhooks_called(configuration, "shop", namespace_labels, pod_labels)


def test_the_trace_names_the_rule_of_the_decisions_reason() -> None:
    _, webhooks = shipped_webhooks()
    opted_out = pod(annotations={"sidecar.istio.io/inject": "false"})
    explanation = explain.explain(opted_out, "shop", NS_ENABLED, MESH, webhooks, "injector")
    assert explanation.decision == decide(opted_out, "shop", NS_ENABLED, MESH)
    assert [(s.number, s.outcome) for s in explanation.steps] == [
        (1, "passed"), (2, "passed"), (3, "passed"), (4, "passed"), (5, "decided"),
        (6, "not reached"), (7, "not reached")]
    assert explanation.steps[4].looked_at == "label absent, annotation 'false'"
    assert explanation.steps[4].result == "skip (pod-annotation-false)"
    assert explanation.injected is False
    assert "decides to skip (pod-annotation-false)" in explanation.verdict


def test_every_reason_of_the_decision_belongs_to_one_rule() -> None:
    reasons = [reason for _, _, rule_reasons in explain.RULES for reason in rule_reasons]
    assert len(reasons) == len(set(reasons))
    from injector.injection import policy
    decided = {value.reason for value in vars(policy).values()
               if isinstance(value, policy.Decision)}
    assert decided == set(reasons)


def test_a_namespace_label_value_the_injector_ignores_is_traced_as_absent() -> None:
    _, webhooks = shipped_webhooks()
    explanation = explain.explain(pod(), "shop", {"istio-injection": "yes"}, MESH, webhooks,
                                  "injector")
    assert explanation.steps[3].looked_at == "namespace label istio-injection absent"
    assert [f.code for f in explanation.findings] == ["namespace-label-invalid"]


def test_a_second_injector_for_the_same_namespace_overlaps_but_a_log_shipper_does_not() -> None:
    configuration, _ = shipped_webhooks()
    canary = {"metadata": {"name": "istio-sidecar-injector-canary"}, "webhooks": [{
        "name": "rev.namespace.sidecar-injector.istio.io",
        "clientConfig": {"service": {"name": "istiod-canary", "namespace": "istio-system",
                                     "path": "/inject"}},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"]}],
        "namespaceSelector": {"matchLabels": {"istio.io/rev": "canary"}},
        "objectSelector": {"matchExpressions": [
            {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}}]}
    shipper = {"metadata": {"name": "log-shipper"}, "webhooks": [{
        "name": "ship.example.com", "clientConfig": {"url": "https://shipper/mutate"},
        "rules": [{"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"],
                   "resources": ["*"]}]}]}
    webhooks = explain.webhooks_of([configuration, canary, shipper])
    namespaces = {"both": {**NS_ENABLED, "istio.io/rev": "canary"}, "ours": NS_ENABLED,
                  "theirs": {"istio.io/rev": "canary"}}
    [both] = explain.overlapping_webhooks(webhooks, namespaces)
    assert both.subject == "namespace both"
    assert ("a pod with labels [none] would be sent to injector/namespace.injector.mesh and "
            "istio-sidecar-injector-canary/rev.namespace.sidecar-injector.istio.io"
            ) in both.message
    # Where only the other injector selects the namespace (by istio.io/rev), our object
    # webhook stays out even for a pod that opts in by its own label, as Istio's default
    # revision does: no namespace "theirs" finding.
    # Our webhooks alone never overlap: they are exclusive by design, the istio.io/rev=default
    # ones included (each label's "in" against "absent").
    ours = {**namespaces, "default": {"istio.io/rev": "default"},
            "enabled-default": {**NS_ENABLED, "istio.io/rev": "default"}}
    assert explain.overlapping_webhooks(explain.webhooks_of([configuration]), ours) == []


def injected_pod(revision: str = "default", image: str = "injector:0.1.0") -> dict[str, Any]:
    status = json.dumps({"containers": ["istio-proxy"], "revision": revision})
    return pod(annotations={"sidecar.istio.io/status": status},
               containers=[{"name": "app", "image": "app"},
                           {"name": "istio-proxy", "image": image}])


@pytest.mark.parametrize(("stored", "namespace_labels", "code"), [
    (pod(), NS_ENABLED, "pod-not-injected"),
    (injected_pod(), {}, "pod-injected-unwanted"),
    (injected_pod(revision="1-22"), NS_ENABLED, "pod-other-revision"),
    (injected_pod(image="injector:0.0.9"), NS_ENABLED, "pod-old-template"),
    (injected_pod(), NS_ENABLED, "pod-current"),
    (pod(), {}, "pod-current"),
])
def test_a_stored_pod_against_what_it_would_get_now(
        stored: dict[str, Any], namespace_labels: dict[str, str], code: str) -> None:
    _, webhooks = shipped_webhooks()
    _, findings = explain.pod_findings(stored, "shop", namespace_labels, MESH, webhooks,
                                       "injector")
    assert [finding.code for finding in findings] == [code]


def test_a_pod_another_meshs_webhook_injects_is_not_ours_to_judge() -> None:
    configuration, _ = shipped_webhooks()
    istio = {"metadata": {"name": "istio-sidecar-injector"}, "webhooks": [{
        "name": "namespace.sidecar-injector.istio.io",
        "clientConfig": {"service": {"name": "istiod", "namespace": "istio-system",
                                     "path": "/inject"}},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"]}],
        "namespaceSelector": {"matchLabels": {"istio.io/rev": "1-22"}}}]}
    webhooks = explain.webhooks_of([configuration, istio])
    _, findings = explain.pod_findings(injected_pod(revision="1-22", image="istio/proxyv2"),
                                       "shop", {"istio.io/rev": "1-22"}, MESH, webhooks,
                                       "injector")
    assert [finding.code for finding in findings] == ["pod-current"]


def test_the_restart_hint_names_the_workload() -> None:
    replica = pod("reviews-v1-5d8c9f7b4-abcde", labels={"pod-template-hash": "5d8c9f7b4"})
    replica["metadata"]["ownerReferences"] = [
        {"kind": "ReplicaSet", "name": "reviews-v1-5d8c9f7b4", "controller": True}]
    assert (explain.restart_hint(replica, "shop")
            == "kubectl -n shop rollout restart deployment/reviews-v1")
    member = pod("db-0")
    member["metadata"]["ownerReferences"] = [
        {"kind": "StatefulSet", "name": "db", "controller": True}]
    assert explain.restart_hint(member, "shop") == "kubectl -n shop rollout restart statefulset/db"
    assert explain.restart_hint(pod("lone"), "shop") == (
        "delete and create again pod shop/lone (it has no owner)")


def test_the_text_report_ends_with_the_count_of_problems() -> None:
    report = explain.Report("pods", findings=[
        explain.Finding("pod-not-injected", "problem", "pod shop/a", "no sidecar", "restart it"),
        explain.Finding("pods-checked", "info", "all namespaces", "1 pod checked")])
    text = explain.render_text(report)
    assert text.splitlines() == [
        "PROBLEM pod shop/a: no sidecar", "        fix: restart it",
        "info    all namespaces: 1 pod checked", "1 problem found"]
    assert report.as_json()["problems"] == 1


@pytest.mark.parametrize(("changes", "named"), [
    ({"annotations": {"sidecar.istio.io/proxyCPU": "lots"}}, "sidecar.istio.io/proxyCPU"),
    ({"containers": ["istio-init"]}, "istio-init"),
    ({"labels": {"app": "x" * 64}}, "63"),
])
def test_a_pod_the_webhook_would_refuse_is_reported_as_refused_with_its_words(
        changes: dict[str, Any], named: str) -> None:
    """`check` asks the webhook itself: a refusal for any reason it has (an annotation, a name
    clash with what it adds, a Kubernetes limit) is what check reports, in the same words."""
    _, webhooks = shipped_webhooks()
    refused = pod(annotations=changes.get("annotations"), labels=changes.get("labels"))
    for name in changes.get("containers", ()):
        refused["spec"]["containers"].append({"name": name, "image": "app:1"})
    explanation = explain.explain(refused, "shop", NS_ENABLED, MESH, webhooks, "injector")
    assert not explanation.injected
    assert explanation.verdict.startswith("refused: ")
    assert named in explanation.verdict
    assert [f.code for f in explanation.findings] == ["pod-refused"]
