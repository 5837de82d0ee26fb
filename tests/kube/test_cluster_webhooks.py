"""The webhook's contract with the real kube-apiserver beyond the decision: one call per pod
(its matchConditions), reinvocation after another mutating webhook, failurePolicy Fail with the
injector down, and server-side dry run."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request

from injector.mesh.names import STATUS_ANNOTATION
from tests.support.cluster import Mesh
from tests.support.eventually import eventually
from tests.support.fakeapi import ServerThread, https_material
from tests.support.pods import pod

EXTRA_CONTAINER = "log-shipper"


def names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [container["name"] for container in containers or []]


def in_namespace(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}


def container_adder(calls: list[list[str]]) -> FastAPI:
    """Another team's mutating webhook: adds a log-shipper container unless there is one."""
    app = FastAPI()

    @app.post("/mutate")
    async def mutate(request: Request) -> dict[str, Any]:
        review = await request.json()
        containers = review["request"]["object"]["spec"]["containers"]
        calls.append(names(containers))
        response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": True}
        if EXTRA_CONTAINER not in names(containers):
            patch = [{"op": "add", "path": "/spec/containers/-",
                      "value": {"name": EXTRA_CONTAINER, "image": "busybox:1.36"}}]
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": response}

    return app


@pytest.fixture
def second_webhook(kube_mesh: Mesh, tmp_path: Path) -> Iterator[tuple[str, list[list[str]]]]:
    """A namespace where, after ours, a second mutating webhook (named to sort after
    `injector`: the API server calls configurations in name order) adds a container. Yields the
    namespace and the container names that webhook saw on each call."""
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("reinvoke", {"istio-injection": "enabled"})
    calls: list[list[str]] = []
    material = https_material(tmp_path / "tls")
    server = ServerThread(container_adder(calls), material.cert_file, material.key_file).start()
    configuration_name = f"zz-log-shipper-{namespace}"
    cluster.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": configuration_name},
        "webhooks": [{
            "name": "log-shipper.example.com",
            "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 10,
            "clientConfig": {"url": f"{server.url}/mutate",
                             "caBundle": base64.b64encode(material.ca_pem).decode()},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        }],
    })
    try:
        yield namespace, calls
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", configuration_name,
                        "--ignore-not-found")
        server.stop()


def test_reinvocation_leaves_one_proxy_and_the_other_webhooks_container(
        kube_mesh: Mesh, second_webhook: tuple[str, list[list[str]]]) -> None:
    namespace, calls = second_webhook
    # The API server picks new webhook configurations up from a watch: wait until it has.
    stored = eventually(lambda: _created_with(kube_mesh, namespace, EXTRA_CONTAINER), 30,
                        what="the second webhook in force")
    assert names(stored["spec"]["containers"]) == ["app", "istio-proxy", EXTRA_CONTAINER]
    assert names(stored["spec"]["initContainers"]) == ["istio-init"]
    # It ran after ours (its first call saw the proxy). Ours (IfNeeded) was not called again
    # after it: its matchConditions stop the reinvocation of a pod carrying our status
    # annotation, so every pod created here reached the injector once, and was injected.
    assert calls[0] == ["app", "istio-proxy"]
    assert kube_mesh.injector is not None
    logged = [json.loads(line) for line in kube_mesh.injector.log().splitlines()
              if line.startswith("{")]
    admissions = [(line["result"], line["reason"]) for line in logged
                  if line.get("namespace") == namespace and "result" in line]
    assert admissions and set(admissions) == {("injected", "namespace-enabled")}, admissions


def _created_with(mesh: Mesh, namespace: str, container: str) -> dict[str, Any] | None:
    manifest = in_namespace(pod("reinvoked"), namespace)
    del manifest["metadata"]["name"]
    manifest["metadata"]["generateName"] = "reinvoked-"
    stored: dict[str, Any] = json.loads(mesh.cluster.create(manifest).stdout)
    return stored if container in names(stored["spec"]["containers"]) else None


_CALLS = "apiserver_admission_webhook_admission_duration_seconds_count{"
_EXCLUDED = "apiserver_admission_match_condition_exclusions_total{"


def admissions_of(mesh: Mesh, webhook: str) -> tuple[int, int]:
    """(calls, calls its matchConditions left out) of pod creates for `webhook` so far, as the
    API server counts them on its /metrics (a webhook's name is its label there)."""
    calls = excluded = 0
    with mesh.cluster.admin_client() as api:
        text = api.get("/metrics").raise_for_status().text
    for line in text.splitlines():
        if f'name="{webhook}"' not in line or 'operation="CREATE"' not in line:
            continue
        value = int(float(line.rpartition(" ")[2]))
        if line.startswith(_CALLS):
            calls += value
        elif line.startswith(_EXCLUDED):
            excluded += value
    return calls, excluded


def test_each_pod_is_sent_to_the_injector_once(kube_mesh: Mesh) -> None:
    """After our patch the API server runs its own plugins again (the ServiceAccount plugin
    mounts its token into our containers) and, reinvocationPolicy IfNeeded, would call us a
    second time only to hear "already-injected": the condition leaves that call out."""
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("once", {"istio-injection": "enabled"})
    calls, excluded = admissions_of(kube_mesh, "namespace.injector.mesh")
    for index in range(3):
        stored = cluster.create_pod(namespace, pod(f"once-{index}"))
        assert names(stored["spec"]["containers"]) == ["app", "istio-proxy"]
        assert names(stored["spec"]["initContainers"]) == ["istio-init"]
        # The ServiceAccount plugin mounted its token into our container after our patch: that
        # change is what asks for our reinvocation, the call the condition leaves out.
        proxy = stored["spec"]["containers"][1]
        assert any(mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
                   for mount in proxy.get("volumeMounts") or []), proxy
    assert admissions_of(kube_mesh, "namespace.injector.mesh") == (calls + 3, excluded + 3)
    # The injector saw each pod once, and injected it: no "already-injected" in its log.
    eventually(lambda: logged_admissions(kube_mesh, namespace)[2:], 10,
               what="the injector's log of the three admissions")
    assert logged_admissions(kube_mesh, namespace) == [("injected", "namespace-enabled")] * 3


def logged_admissions(mesh: Mesh, namespace: str) -> list[tuple[str, str]]:
    """(result, reason) of each admission the injector logged for a pod of `namespace`."""
    assert mesh.injector is not None
    logged = [json.loads(line) for line in mesh.injector.log().splitlines()
              if line.startswith("{")]
    return [(line["result"], line["reason"]) for line in logged
            if line.get("namespace") == namespace and "result" in line]


def test_a_pod_with_its_own_status_annotation_is_admitted_unchanged_without_a_call(
        kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("claimed", {"istio-injection": "enabled"})
    claimed = {STATUS_ANNOTATION: '{"containers":["istio-proxy"]}'}
    calls, excluded = admissions_of(kube_mesh, "namespace.injector.mesh")
    stored = cluster.create_pod(namespace, pod("claimed", annotations=claimed))
    assert names(stored["spec"]["containers"]) == ["app"]
    assert "initContainers" not in stored["spec"]
    assert stored["metadata"]["annotations"] == claimed
    assert admissions_of(kube_mesh, "namespace.injector.mesh") == (calls, excluded + 1)
    # With hostNetwork the server decides first that it is not injected (host-network, with
    # its event): the condition still sends it, and it is admitted unchanged all the same.
    stored = cluster.create_pod(namespace, pod("claimed-host", annotations=claimed,
                                               hostNetwork=True))
    assert names(stored["spec"]["containers"]) == ["app"]
    assert "initContainers" not in stored["spec"]
    assert admissions_of(kube_mesh, "namespace.injector.mesh") == (calls + 1, excluded + 1)


def test_with_the_injector_stopped_meshed_pods_are_refused_and_others_created(
        kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    meshed = cluster.namespace("down", {"istio-injection": "enabled"})
    plain = cluster.namespace("down-plain")
    kube_mesh.stop_injector()
    try:
        refused = cluster.create(in_namespace(pod("refused"), meshed), check=False)
        assert refused.returncode != 0
        assert 'failed calling webhook "namespace.injector.mesh"' in refused.stderr, \
            refused.stderr
        assert cluster.kubectl("get", "pod", "refused", "-n", meshed,
                               check=False).returncode != 0
        created = cluster.create_pod(plain, pod("unmeshed"))
        assert names(created["spec"]["containers"]) == ["app"]
    finally:
        kube_mesh.start_injector()


def test_server_side_dry_run_returns_the_injected_pod_and_stores_nothing(
        kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("dry", {"istio-injection": "enabled"})
    result = cluster.create(in_namespace(pod("dry"), namespace), extra=["--dry-run=server"])
    answered = json.loads(result.stdout)
    assert names(answered["spec"]["containers"]) == ["app", "istio-proxy"]
    assert names(answered["spec"]["initContainers"]) == ["istio-init"]
    missing = cluster.kubectl("get", "pod", "dry", "-n", namespace, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
