"""`injector check` against the real kube-apiserver, each finding shown by breaking the cluster
in that way on purpose: a pod created before its namespace was labelled, a misspelt namespace
label, a stale caBundle, a webhook Service without endpoints, a second injector whose selectors
overlap ours. Human output, JSON output and exit codes, as a user runs it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from tests.support.certs import self_signed_authority
from tests.support.cluster import DEPLOY, MESH_CONFIG, MESH_NAMESPACE, Cluster, Mesh
from tests.support.eventually import eventually
from tests.support.pods import pod
from tests.support.servers import free_port

INJECT = "sidecar.istio.io/inject"
# Every webhook of deploy/'s configuration `injector`, as `check` names them.
OUR_WEBHOOKS = sorted(f"webhook injector/{hook['name']}"
                      for hook in yaml.safe_load((DEPLOY / "webhook.yaml").read_text())["webhooks"])


def check(mesh: Mesh, *args: str, output: str = "json", input: str | None = None,
          ) -> tuple[int, Any]:
    """`injector check ARGS` as the cluster's admin with deploy/'s mesh config: (exit code,
    parsed JSON or the text)."""
    command = [sys.executable, "-m", "injector", "check", *args,
               "--kubeconfig", str(mesh.cluster.admin_kubeconfig), "--config", str(MESH_CONFIG)]
    if output == "json":
        command += ["-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, input=input,
                            check=False)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 2:
        return 2, result.stderr
    return result.returncode, json.loads(result.stdout) if output == "json" else result.stdout


def codes(report: dict[str, Any], status: str = "problem") -> dict[str, list[dict[str, Any]]]:
    """The report's findings of `status`, by code."""
    found: dict[str, list[dict[str, Any]]] = {}
    for finding in report["findings"]:
        if finding["status"] == status:
            found.setdefault(finding["code"], []).append(finding)
    return found


def owned_pod(name: str, deployment: str) -> dict[str, Any]:
    """A pod as a Deployment's ReplicaSet creates it: owner and template hash."""
    manifest = pod(name, labels={"app": deployment, "pod-template-hash": "5d8c9f7b4"})
    manifest["metadata"]["ownerReferences"] = [{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{deployment}-5d8c9f7b4",
        "uid": "0b6c0d7e-6d3c-4d8e-9a53-0d6b1e1a2f3c", "controller": True}]
    return manifest


# --- pods and namespaces --------------------------------------------------------------------------

def test_a_pod_created_before_the_namespace_was_labelled_needs_a_restart(
        kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("late-label")
    early = cluster.create_pod(namespace, owned_pod("web-5d8c9f7b4-early", "web"))
    assert "istio-proxy" not in [c["name"] for c in early["spec"]["containers"]]
    cluster.kubectl("label", "namespace", namespace, "istio-injection=enabled")
    cluster.create_pod(namespace, owned_pod("web-5d8c9f7b4-later", "web"))

    status, report = check(kube_mesh, "pods", "-n", namespace)
    assert status == 1
    missing = codes(report)["pod-not-injected"]
    assert [finding["subject"] for finding in missing] == [f"pod {namespace}/web-5d8c9f7b4-early"]
    assert missing[0]["fix"] == f"kubectl -n {namespace} rollout restart deployment/web"

    # The same pod on its own, for a person: the trace names the rule that decides now.
    status, text = check(kube_mesh, "pod", "web-5d8c9f7b4-early", "-n", namespace, output="text")
    assert status == 1
    assert (f"pod {namespace}/web-5d8c9f7b4-early: if created now, injected: "
            "injector/namespace.injector.mesh is called") in text
    assert "called     injector/namespace.injector.mesh" in text
    assert "6. decided     namespace label istio-injection=enabled | " in text
    assert f"fix: kubectl -n {namespace} rollout restart deployment/web" in text
    assert text.rstrip().endswith("1 problem found")

    # The pod created after the label is as it should be.
    status, report = check(kube_mesh, "pod", "web-5d8c9f7b4-later", "-n", namespace)
    assert status == 0
    assert codes(report, "ok")["pod-current"]


@pytest.fixture(scope="module")
def namespaces(kube_mesh: Mesh) -> dict[str, str]:
    cluster = kube_mesh.cluster
    return {
        "enabled": cluster.namespace("check-on", {"istio-injection": "enabled"}),
        "unlabelled": cluster.namespace("check-off"),
        "misspelt-value": cluster.namespace("check-yes", {"istio-injection": "yes"}),
        "misspelt-key": cluster.namespace("check-typo", {"istio-injecton": "enabled"}),
        # Selected by rev-default.namespace.injector.mesh alone: with it, every webhook of ours
        # selects a namespace that exists, and so is dry-run.
        "rev-default": cluster.namespace("check-rev", {"istio.io/rev": "default"}),
    }


def test_a_namespace_trace_says_which_rule_decided(kube_mesh: Mesh,
                                                   namespaces: dict[str, str]) -> None:
    status, report = check(kube_mesh, "namespace", namespaces["enabled"])
    assert status == 0
    [explanation] = report["explanations"]
    assert explanation["injected"] is True
    outcomes = [(step["number"], step["outcome"]) for step in explanation["steps"]]
    assert outcomes == [(1, "passed"), (2, "passed"), (3, "passed"), (4, "passed"),
                        (5, "passed"), (6, "decided"), (7, "not reached")]
    called = [m["webhook"] for m in explanation["webhooks"] if m["called"]]
    assert called == ["injector/namespace.injector.mesh"]

    status, report = check(kube_mesh, "namespace", namespaces["unlabelled"])
    assert status == 0
    [explanation] = report["explanations"]
    assert explanation["injected"] is False
    assert "calls no injection webhook" in explanation["verdict"]


@pytest.mark.parametrize(("kind", "code", "fix"), [
    ("misspelt-value", "namespace-label-invalid",
     "kubectl label namespace {ns} istio-injection=enabled --overwrite"),
    ("misspelt-key", "namespace-label-misspelt",
     "kubectl label namespace {ns} istio-injecton- istio-injection=enabled --overwrite"),
])
def test_a_misspelt_namespace_label_is_a_problem(kube_mesh: Mesh, namespaces: dict[str, str],
                                                 kind: str, code: str, fix: str) -> None:
    namespace = namespaces[kind]
    status, report = check(kube_mesh, "namespace", namespace)
    assert status == 1
    [finding] = codes(report)[code]
    assert finding["fix"] == fix.format(ns=namespace)
    assert report["explanations"][0]["injected"] is False


def test_a_manifest_is_checked_before_it_is_applied(kube_mesh: Mesh, namespaces: dict[str, str],
                                                    tmp_path: Path) -> None:
    opted_out = pod("opted-out", labels={INJECT: "false"})
    opted_out["metadata"]["namespace"] = namespaces["enabled"]
    path = tmp_path / "pod.yaml"
    path.write_text(json.dumps(opted_out))
    status, report = check(kube_mesh, "-f", str(path))
    assert status == 0
    [explanation] = report["explanations"]
    assert explanation["injected"] is False
    assert "calls no injection webhook" in explanation["verdict"]

    # A Deployment from stdin, in the namespace given by -n, with an annotation the injector
    # would refuse: its pods would not be created at all.
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shop"},
                  "spec": {"template": {
                      "metadata": {"annotations": {"sidecar.istio.io/proxyCPU": "lots"}},
                      "spec": {"containers": [{"name": "app", "image": "shop"}]}}}}
    status, report = check(kube_mesh, "-f", "-", "-n", namespaces["enabled"],
                           input=json.dumps(deployment))
    assert status == 1
    [refused] = codes(report)["pod-refused"]
    assert "sidecar.istio.io/proxyCPU" in refused["message"]


def test_bad_usage_and_missing_objects_exit_2(kube_mesh: Mesh, namespaces: dict[str, str]
                                              ) -> None:
    status, message = check(kube_mesh, "pod", "nowhere", "-n", namespaces["enabled"])
    assert status == 2
    assert message.strip() == f"injector: check: pod {namespaces['enabled']}/nowhere not found"
    status, message = check(kube_mesh, "namespace", "no-such-namespace")
    assert status == 2
    assert message.strip() == "injector: check: namespace no-such-namespace not found"


# --- the webhook ----------------------------------------------------------------------------------

def test_a_healthy_webhook_passes_every_check(kube_mesh: Mesh, namespaces: dict[str, str]
                                              ) -> None:
    status, report = check(kube_mesh, "webhook")
    assert status == 0, report
    ok = codes(report, "ok")
    assert len(OUR_WEBHOOKS) == 4
    assert sorted(f["subject"] for f in ok["ca-bundle"]) == OUR_WEBHOOKS
    assert sorted(f["subject"] for f in ok["dry-run"]) == OUR_WEBHOOKS
    assert ok["webhooks-exclusive"]

    status, text = check(kube_mesh, "webhook", output="text")
    assert status == 0
    assert ("ok      webhook injector/namespace.injector.mesh: its caBundle verifies the "
            f"certificate served at {kube_mesh.webhook_url}") in text
    assert text.rstrip().endswith("no problems found")


def _patch_bundles(cluster: Cluster, bundle: str) -> None:
    patch = [{"op": "replace", "path": f"/webhooks/{index}/clientConfig/caBundle",
              "value": bundle} for index in range(len(OUR_WEBHOOKS))]
    cluster.kubectl("patch", "mutatingwebhookconfiguration", "injector", "--type=json",
                    "-p", json.dumps(patch))


def test_a_stale_ca_bundle_is_found_by_the_probe_and_by_the_api_server(
        kube_mesh: Mesh, namespaces: dict[str, str]) -> None:
    cluster = kube_mesh.cluster
    assert kube_mesh.injector is not None
    foreign = self_signed_authority().roots[0]
    stale = base64.b64encode(foreign.public_bytes(serialization.Encoding.PEM)).decode()
    ours = base64.b64encode(kube_mesh.injector.root_cert.read_bytes()).decode()
    try:
        def stale_found() -> dict[str, Any] | None:
            # Patched on every try: the running injector puts its root back once a minute.
            _patch_bundles(cluster, stale)
            status, report = check(kube_mesh, "webhook")
            problems = codes(report).get("ca-bundle-stale", [])
            # Each webhook twice: our TLS probe, and the API server's own dry-run call.
            return report if status == 1 and len(problems) == 2 * len(OUR_WEBHOOKS) else None

        report = eventually(stale_found, 60, interval=1, what="a stale caBundle reported")
        messages = [f["message"] for f in codes(report)["ca-bundle-stale"]]
        assert any("does not verify the certificate served at" in m for m in messages)
        assert any("failed calling webhook" in m and "x509" in m for m in messages)
        assert all("caBundle" in f["fix"] for f in codes(report)["ca-bundle-stale"])
    finally:
        _patch_bundles(cluster, ours)


@pytest.fixture
def service_webhook(kube_mesh: Mesh) -> Iterator[str]:
    """A revision's webhook configuration of ours (`injector-<rev>`) that calls the injector
    through deploy/'s Service, as in a real cluster. It selects no namespace that exists, so the
    API server never calls it: no request is ever sent to the Service's cluster IP."""
    cluster = kube_mesh.cluster
    name = "injector-check-rev"
    bundle = base64.b64encode(kube_mesh.injector.root_cert.read_bytes()).decode()  # type: ignore[union-attr]
    cluster.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "rev-check.namespace.injector.mesh", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Ignore", "timeoutSeconds": 5,
            "clientConfig": {"caBundle": bundle, "service": {
                "name": "injector", "namespace": MESH_NAMESPACE, "path": "/inject",
                "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "not-here"}},
        }],
    })
    try:
        yield f"webhook {name}/rev-check.namespace.injector.mesh"
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
        cluster.kubectl("delete", "endpointslice", "-n", MESH_NAMESPACE, "injector-check",
                        "--ignore-not-found")


def test_a_service_without_ready_endpoints_is_a_problem(kube_mesh: Mesh,
                                                        service_webhook: str) -> None:
    cluster = kube_mesh.cluster
    # No controller-manager here: deploy/'s Service has no endpoints, as when no injector pod
    # is ready.
    status, report = check(kube_mesh, "webhook")
    assert status == 1
    [finding] = codes(report)["no-ready-endpoints"]
    assert finding["subject"] == service_webhook
    assert f"Service {MESH_NAMESPACE}/injector has no ready endpoints" in finding["message"]
    assert finding["fix"].startswith(f"kubectl -n {MESH_NAMESPACE} get pods -l app=injector")
    # Not dry-run: through a Service without endpoints the call could only fail.
    assert not [f for f in report["findings"] if f["subject"] == service_webhook
                and f["code"].startswith("dry-run")]

    # An EndpointSlice as the endpoint controller writes it for a ready pod (the address is
    # stored, never dialled: nothing selects this webhook).
    cluster.apply({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "injector-check", "namespace": MESH_NAMESPACE,
                     "labels": {"kubernetes.io/service-name": "injector"}},
        "addressType": "IPv4",
        "ports": [{"name": "https-webhook", "port": 15017, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True}}],
    })
    status, report = check(kube_mesh, "webhook")
    assert status == 0, report
    [ready] = [f for f in codes(report, "ok")["endpoints-ready"]
               if f["subject"] == service_webhook]
    assert ready["message"] == f"Service {MESH_NAMESPACE}/injector has 1 ready endpoint"
    # (Ours too, if no namespace they select exists yet: this test's is the one of interest.)
    [skipped] = [f for f in codes(report, "info")["dry-run-skipped"]
                 if f["subject"] == service_webhook]
    assert skipped["subject"] == service_webhook


def test_a_second_injector_selecting_the_same_namespace_is_an_overlap(kube_mesh: Mesh) -> None:
    """Two revisions at once, Istio's commonest mistake: the namespace is labelled both
    istio-injection=enabled (ours) and istio.io/rev=canary (another injector's)."""
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("both", {"istio-injection": "enabled",
                                           "istio.io/rev": "canary"})
    name = "istio-sidecar-injector-canary"
    cluster.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "rev.namespace.sidecar-injector.istio.io",
            "admissionReviewVersions": ["v1"], "sideEffects": "None",
            # Ignore: a pod created meanwhile is not held up by this injector, which does
            # not exist (nothing listens on the port).
            "failurePolicy": "Ignore", "timeoutSeconds": 5,
            "clientConfig": {"url": f"https://127.0.0.1:{free_port()}/inject"},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": "istio.io/rev", "operator": "In", "values": ["canary"]}]},
            "objectSelector": {"matchExpressions": [
                {"key": INJECT, "operator": "NotIn", "values": ["false"]}]},
        }],
    })
    try:
        status, report = check(kube_mesh, "webhook")
        assert status == 1
        # This namespace's: the cluster is shared, and another test's namespace may be labelled
        # the same way (tests/deploy/test_revision.py's istio-injection=enabled + rev=canary).
        [overlap] = [finding for finding in codes(report)["webhooks-overlap"]
                     if finding["subject"] == f"namespace {namespace}"]
        assert (f"injector/namespace.injector.mesh and {name}/"
                "rev.namespace.sidecar-injector.istio.io") in overlap["message"]
        assert "istio-injection or istio.io/rev, not both" in overlap["fix"]

        status, report = check(kube_mesh, "namespace", namespace)
        assert status == 1
        [overlap] = codes(report)["webhooks-overlap"]
        assert "2 injection webhooks would be called" in overlap["message"]
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
