"""The webhook's answers in-process: `webhook.parse` and `webhook.admit`, no HTTP."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import orjson
import pytest

from injector.injection import containers, patch, webhook
from injector.mesh.config import MeshConfig
from tests.support import mutator
from tests.support.pods import pod, replicaset_pod, review

MESH = MeshConfig()


def unknown(_: str) -> None:
    """No Kubernetes API: the namespace's labels are unknown."""
    return None


def answer(body: dict[str, Any], labels: webhook.NamespaceLabels = unknown,
           mesh: MeshConfig = MESH) -> tuple[webhook.Outcome, dict[str, Any]]:
    """The outcome for `body` sent as JSON, and its response, checked to answer `body` in kind."""
    outcome = webhook.admit(webhook.parse(orjson.dumps(body)), mesh, labels)
    sent = json.loads(outcome.body)
    assert sent["apiVersion"] == body["apiVersion"]
    assert sent["kind"] == "AdmissionReview"
    assert set(sent) == {"apiVersion", "kind", "response"}
    assert sent["response"]["uid"] == body["request"]["uid"]
    return outcome, sent["response"]


@pytest.mark.parametrize("api_version", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
def test_a_review_is_answered_in_kind_with_its_uid(api_version: str) -> None:
    outcome, response = answer(review(pod(), api_version=api_version))
    assert response["allowed"] is True
    assert (outcome.result, outcome.reason) == ("injected", "namespace-enabled")
    assert (outcome.namespace, outcome.pod) == ("shop", "web-7d4b9c-x2x9z")


@pytest.mark.parametrize("name", ["minimal", "replicaset"])
def test_an_injected_pods_patch_applies_and_adds_the_sidecar(name: str) -> None:
    original = pod() if name == "minimal" else replicaset_pod()
    _, response = answer(review(original))
    assert response["patchType"] == "JSONPatch"
    injected = jsonpatch.apply_patch(original, json.loads(base64.b64decode(response["patch"])))
    spec = injected["spec"]
    assert [c["name"] for c in spec["containers"]] == [
        *(c["name"] for c in original["spec"]["containers"]), "istio-proxy"]
    assert [c["name"] for c in spec["initContainers"]] == ["istio-init"]
    assert [v["name"] for v in spec["volumes"]] == [
        *(v["name"] for v in original["spec"].get("volumes", [])), "workload-certs",
        "istio-envoy", "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert"]
    assert "sidecar.istio.io/status" in injected["metadata"]["annotations"]


def test_the_same_pod_gets_the_same_patch_under_another_uid() -> None:
    first = answer(review(replicaset_pod()))[1]
    second = answer(review(replicaset_pod()))[1]
    assert first["uid"] != second["uid"] and first["patch"] == second["patch"]


def test_an_object_that_is_not_a_pod_is_allowed_unchanged_without_a_patch() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                  "spec": {"template": pod()}}
    outcome, response = answer(review(deployment, kind="Deployment"))
    assert response == {"uid": response["uid"], "allowed": True}
    assert (outcome.result, outcome.reason) == ("ignored", "not-a-pod")


def test_an_update_is_allowed_unchanged() -> None:
    outcome, response = answer(review(pod(), operation="UPDATE"))
    assert response == {"uid": response["uid"], "allowed": True}
    assert (outcome.result, outcome.reason) == ("ignored", "not-a-create")


@pytest.mark.parametrize(
    ("obj", "namespace", "labels", "reason"),
    [
        (pod(labels={"sidecar.istio.io/inject": "false"}), "shop", None, "pod-label-false"),
        (pod(annotations={"sidecar.istio.io/inject": "false"}), "shop", None,
         "pod-annotation-false"),
        (pod(hostNetwork=True), "shop", None, "host-network"),
        (pod(), "kube-system", None, "ignored-namespace"),
        (pod(), "shop", {"istio-injection": "disabled"}, "namespace-disabled"),
        (pod(annotations={"sidecar.istio.io/status": "{}"}), "shop", None, "already-injected"),
    ],
)
def test_a_skipped_pod_is_allowed_without_a_patch(
    obj: dict[str, Any], namespace: str, labels: dict[str, str] | None, reason: str
) -> None:
    outcome, response = answer(review(obj, namespace=namespace), lambda _: labels)
    assert response == {"uid": response["uid"], "allowed": True}
    assert (outcome.result, outcome.reason) == ("skipped", reason)


def test_a_malformed_annotation_refuses_the_pod_naming_it() -> None:
    bad = pod(annotations={"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40"})
    outcome, response = answer(review(bad))
    assert response["allowed"] is False
    assert "patch" not in response and "patchType" not in response
    assert response["status"]["code"] == 400
    assert response["status"]["status"] == "Failure"
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in response["status"]["message"]
    assert (outcome.result, outcome.reason) == ("denied", "invalid-annotation")


def test_a_pod_using_the_sidecars_names_is_refused() -> None:
    taken = pod(volumes=[{"name": "istio-envoy", "emptyDir": {}}])
    outcome, response = answer(review(taken))
    assert response["allowed"] is False and "istio-envoy" in response["status"]["message"]
    assert (outcome.result, outcome.reason) == ("denied", "name-conflict")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda body: body["request"].update(object=["not", "a", "pod"]), "not a Pod"),
        (lambda body: body["request"]["object"]["spec"].update(containers=[]),
         "spec.containers"),
        (lambda body: body["request"]["object"]["metadata"].update(labels={"a": 1}),
         "metadata.labels"),
        (lambda body: body["request"].update(namespace=7), "request.namespace"),
    ],
)
def test_a_request_not_shaped_as_it_should_be_is_refused_not_crashed(
    change: Any, message: str
) -> None:
    body = review(pod())
    change(body)
    outcome, response = answer(body)
    assert response["allowed"] is False
    assert message in response["status"]["message"]
    assert outcome.result == "denied"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b'["AdmissionReview"]', "not an AdmissionReview"),
        (b'{"kind": "Pod", "apiVersion": "v1"}', "not an AdmissionReview"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v2", "request": {}}',
         "unsupported apiVersion 'admission.k8s.io/v2'"),
        (b'{"kind": "AdmissionReview", "apiVersion": "v1", "request": {"uid": "x"}}',
         "expected admission.k8s.io/v1 or admission.k8s.io/v1beta1"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "no request"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
         "no uid"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",'
         b' "request": {"uid": ""}}', "no uid"),
    ],
)
def test_a_body_that_is_not_a_review_is_a_bad_review(body: bytes, message: str) -> None:
    with pytest.raises(webhook.BadReview, match=message):
        webhook.parse(body)


def test_the_rest_of_the_review_passes_through_parse_untouched() -> None:
    body = review(pod())
    assert webhook.parse(orjson.dumps(body)) == body


@pytest.mark.parametrize("api_version", [{"a": 1}, ["admission.k8s.io/v1"], 1, None, True,
                                         "x" * 100_000])
def test_an_api_version_of_any_type_is_a_bad_review_not_a_crash(api_version: Any) -> None:
    # An object or a list here was unhashable in the set lookup: HTTP 500.
    body = review(pod())
    body["apiVersion"] = api_version
    with pytest.raises(webhook.BadReview, match="unsupported apiVersion") as refused:
        webhook.parse(orjson.dumps(body))
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize("field", ["name", "generateName", "namespace"])
def test_a_name_nested_1000_deep_is_refused_not_a_crash(field: str) -> None:
    # str() of it recursed past Python's limit: HTTP 500. (Written as JSON text: orjson
    # writes no more than 254 levels, and reads up to 1,024.)
    body = review(pod())
    body["request"]["object"]["metadata"][field] = orjson.Fragment(
        b'{"a":[' * 500 + b'"bottom"' + b"]}" * 500)
    body["request"].pop("namespace")
    outcome = webhook.admit(webhook.parse(orjson.dumps(body)), MESH, unknown)
    response = orjson.loads(outcome.body)["response"]
    assert response["allowed"] is False
    assert f"metadata.{field} must be a string" in response["status"]["message"]
    assert outcome.pod in ("", "web-7d4b9c-x2x9z")  # only a string is logged as the name


def test_non_ascii_digits_in_a_quantity_are_refused_naming_the_annotation() -> None:
    # A fullwidth '100m' was injected, and the patched pod no longer decoded in Kubernetes.
    bad = pod(annotations={"sidecar.istio.io/proxyCPU": "\uff11\uff10\uff10m"})
    outcome, response = answer(review(bad))
    assert response["allowed"] is False
    assert "sidecar.istio.io/proxyCPU" in response["status"]["message"]
    assert (outcome.result, outcome.reason) == ("denied", "invalid-annotation")


def test_an_app_container_named_istio_init_is_refused_naming_the_clash() -> None:
    # It used to get a second container of that name (names are unique across both lists).
    # (An init container of that name is the pod's own istio-init: merged, see below.)
    clashing = pod(containers=[{"name": "istio-init", "image": "app:1"}])
    outcome, response = answer(review(clashing))
    assert response["allowed"] is False
    assert "istio-init" in response["status"]["message"]
    assert (outcome.result, outcome.reason) == ("denied", "name-conflict")


def test_a_pods_own_istio_proxy_is_merged_through_the_webhook_with_its_probes_rewritten(
        ) -> None:
    # The pod's own istio-proxy comes first; the app's probe is rewritten (replace ops on the
    # lists as they came), then the pod's istio-proxy removed, and ours appended with the env.
    own = pod(containers=[
        {"name": "istio-proxy", "image": "auto", "resources": {"requests": {"cpu": "1"}}},
        {"name": "app", "image": "a", "ports": [{"containerPort": 8080}],
         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}},
    ])
    for _ in range(2):  # and the same again: nothing of it is cached wrongly
        outcome, response = answer(review(own))
        assert (outcome.result, response["allowed"]) == ("injected", True)
        ops = json.loads(base64.b64decode(response["patch"]))
        out = jsonpatch.apply_patch(own, ops)
        containers = out["spec"]["containers"]
        assert [c["name"] for c in containers] == ["app", "istio-proxy"]
        assert containers[1]["resources"]["requests"]["cpu"] == "1"
        assert containers[1]["image"] != "auto"
        assert "proxy.istio.io/overrides" in out["metadata"]["annotations"]
        if "/app-health/" in json.dumps(containers[0].get("readinessProbe")):
            env = {item["name"] for item in containers[1]["env"]}
            assert "ISTIO_KUBE_APP_PROBERS" in env


def test_a_pod_istio_injected_already_is_skipped_not_refused_for_its_istio_init() -> None:
    injected = pod(annotations={"sidecar.istio.io/status": '{"revision": "default"}'},
                   init_containers=[{"name": "istio-init", "image": "proxyv2"}],
                   containers=[{"name": "app", "image": "a"},
                               {"name": "istio-proxy", "image": "proxyv2"}])
    outcome, response = answer(review(injected))
    assert response["allowed"] is True and "patch" not in response
    assert (outcome.result, outcome.reason) == ("skipped", "already-injected")


@pytest.mark.parametrize(("annotations", "labels", "words"), [
    ({"sidecar.istio.io/proxyImage": "x" * 7 * 1024 * 1024}, None, "limit of 262144"),
    ({"proxy.istio.io/config": "[" + "1," * 120_000 + "1]"}, None, "longer than 4096"),
    (None, {"app": "x" * 64}, "limit of 63"),
])
def test_a_pod_over_a_limit_is_refused_naming_it_before_anything_is_built(
        annotations: dict[str, str] | None, labels: dict[str, str] | None, words: str) -> None:
    before = len(containers.TEMPLATES), len(patch.PATCHES)
    outcome, response = answer(review(pod(annotations=annotations, labels=labels)))
    assert response["allowed"] is False and words in response["status"]["message"]
    assert len(response["status"]["message"]) < 400
    assert outcome.result == "denied"
    assert (len(containers.TEMPLATES), len(patch.PATCHES)) == before


def test_every_json_type_in_every_position_gets_an_answer_or_a_bad_review() -> None:
    document = review(replicaset_pod())
    document["request"]["object"]["metadata"]["annotations"] = {
        "sidecar.istio.io/proxyCPU": "200m", "proxy.istio.io/config": "{a: [b]}",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8"}
    count = 0
    for case in mutator.cases(document, mutator.systematic_count(document)):
        count += 1
        try:
            review_in = webhook.parse(mutator.encode(case.document))
        except webhook.BadReview:
            continue
        outcome = webhook.admit(review_in, MESH, unknown)
        sent = orjson.loads(outcome.body)
        assert sent["response"]["uid"] == review_in["request"]["uid"], case.description
        assert outcome.result in ("injected", "skipped", "denied", "ignored"), case.description
    assert count >= 21 * 80  # every hostile value at every one of the review's positions


# --- Istio's gateway template: the pod's securityContext and the default container ---------------

GATEWAY = {"inject.istio.io/templates": "gateway"}
UNPRIVILEGED_PORTS = {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}
SOMAXCONN = {"name": "net.core.somaxconn", "value": "1024"}


def gateway_pod(containers: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """Istio's gateway.yaml as a pod: its istio-proxy alone, image auto."""
    return pod(annotations=dict(GATEWAY), labels={"istio": "ingressgateway"},
               containers=containers or [{"name": "istio-proxy", "image": "auto"}], **spec)


def patched(original: dict[str, Any]) -> dict[str, Any]:
    outcome, response = answer(review(original))
    assert outcome.result == "injected", response
    injected: dict[str, Any] = jsonpatch.apply_patch(
        original, json.loads(base64.b64decode(response["patch"])))
    return injected


@pytest.mark.parametrize(("own", "expected"), [
    (None, {"sysctls": [UNPRIVILEGED_PORTS]}),
    ({}, {"sysctls": [UNPRIVILEGED_PORTS]}),
    ({"runAsUser": 1000, "sysctls": None}, {"runAsUser": 1000, "sysctls": [UNPRIVILEGED_PORTS]}),
    ({"sysctls": [SOMAXCONN]}, {"sysctls": [SOMAXCONN, UNPRIVILEGED_PORTS]}),
    # The pod's own value of the sysctl is its owner's choice, kept (Istio overwrites it).
    ({"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}, SOMAXCONN]},
     {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}, SOMAXCONN]}),
])
def test_a_gateway_may_bind_low_ports_and_keeps_every_sysctl_of_its_own(
        own: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    # Both with the pod's own istio-proxy (merged: no patch cached) and without (a gateway
    # like it admitted first: the patch it got, cached, must not be handed to this one).
    for listed in ([{"name": "istio-proxy", "image": "auto"}],
                   [{"name": "envoy-gateway", "image": "gateway:1"}]):
        patched(gateway_pod(listed))
        original = (gateway_pod(listed) if own is None
                    else gateway_pod(listed, securityContext=own))
        assert patched(original)["spec"]["securityContext"] == expected


def test_a_sidecars_pod_gets_no_sysctl() -> None:
    injected = patched(pod(securityContext={"sysctls": [SOMAXCONN]}))
    assert injected["spec"]["securityContext"] == {"sysctls": [SOMAXCONN]}
    assert "securityContext" not in patched(pod())["spec"]


@pytest.mark.parametrize(("own", "words"), [
    (["runAsUser"], "spec.securityContext must be an object"),
    ({"sysctls": {"net.core.somaxconn": "1024"}}, "spec.securityContext.sysctls must be a list"),
    ({"sysctls": [{"value": "0"}]}, "spec.securityContext.sysctls must be a list of objects "
                                    "with a name"),
])
def test_a_gateway_whose_security_context_cannot_take_the_sysctl_is_refused_naming_it(
        own: Any, words: str) -> None:
    outcome, response = answer(review(gateway_pod(securityContext=own)))
    assert response["allowed"] is False and words in response["status"]["message"]
    assert (outcome.result, outcome.reason) == ("denied", "invalid-pod")


def test_every_json_type_in_a_gateways_security_context_gets_an_answer() -> None:
    document = review(gateway_pod(securityContext={"runAsUser": 1000, "sysctls": [SOMAXCONN]}))
    count = 0
    for case in mutator.cases(document, mutator.systematic_count(document)):
        if "securityContext" not in case.description:
            continue
        count += 1
        try:
            review_in = webhook.parse(mutator.encode(case.document))
        except webhook.BadReview:
            continue
        outcome = webhook.admit(review_in, MESH, unknown)
        assert outcome.result in ("injected", "denied"), case.description
    assert count >= 100  # every hostile value in each place of the securityContext


@pytest.mark.parametrize(("listed", "expected"), [
    # Istio's gateway.yaml: the proxy alone, so no default container (as Istio's template).
    ([{"name": "istio-proxy", "image": "auto"}], None),
    # The pod's own istio-proxy listed first: the app is still the default (it was the proxy).
    ([{"name": "istio-proxy", "image": "auto"}, {"name": "httpbin", "image": "httpbin"}],
     "httpbin"),
])
def test_the_default_container_is_the_first_that_is_not_the_proxy(
        listed: list[dict[str, Any]], expected: str | None) -> None:
    for original in (gateway_pod(listed), pod(containers=listed)):
        annotations = patched(original)["metadata"]["annotations"]
        assert annotations.get("kubectl.kubernetes.io/default-container") == expected
        assert annotations.get("kubectl.kubernetes.io/default-logs-container") == expected


def test_a_held_gateways_proxy_comes_first_with_no_app_waiting_for_it() -> None:
    # As Istio orders a pod held for its proxy, whatever its template; the gateway template
    # adds no hook (the proxy is the pod's main container: nothing waits for it).
    original = gateway_pod([{"name": "app", "image": "app:1"}])
    original["metadata"]["annotations"]["proxy.istio.io/config"] = (
        "holdApplicationUntilProxyStarts: true")
    listed = patched(original)["spec"]["containers"]
    assert [container["name"] for container in listed] == ["istio-proxy", "app"]
    assert "lifecycle" not in listed[0]
