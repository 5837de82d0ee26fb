"""deploy/ against the real kube-apiserver: the overlay applies, the injector runs with the
credentials of its own ServiceAccount (so deploy/rbac.yaml grants all it needs and nothing it
must not have), and the API server calls the webhook over TLS verified by the caBundle the
injector wrote."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support.certs import self_signed_authority
from tests.support.cluster import MESH_NAMESPACE, Cluster, Mesh, deploy_overlay
from tests.support.deploy import DEPLOY, find, render
from tests.support.eventually import eventually
from tests.support.pods import pod

PROXY = "istio-proxy"


def container_names(stored: dict[str, Any]) -> list[str]:
    return [container["name"] for container in stored["spec"]["containers"]]


def test_the_overlay_of_deploy_is_stored_as_shipped(kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    shipped = render(DEPLOY)
    for kind, name, namespace in [("ClusterRole", "injector", None),
                                  ("Role", "injector", MESH_NAMESPACE)]:
        scope = ["-n", namespace] if namespace else []
        stored = cluster.get(kind.lower(), name, *scope)
        assert stored["rules"] == find(shipped, kind, name)["rules"]
    deployment = cluster.get("deployment", "injector", "-n", MESH_NAMESPACE)
    shipped_template = find(shipped, "Deployment", "injector")["spec"]["template"]["spec"]
    stored_injector = deployment["spec"]["template"]["spec"]["containers"][0]
    assert stored_injector["args"] == shipped_template["containers"][0]["args"]
    namespace = cluster.get("namespace", MESH_NAMESPACE)
    assert namespace["metadata"]["labels"]["istio-injection"] == "disabled"
    webhooks = cluster.get("mutatingwebhookconfiguration", "injector")["webhooks"]
    shipped_webhooks = find(shipped, "MutatingWebhookConfiguration", "injector")["webhooks"]
    for stored_webhook, shipped_webhook in zip(webhooks, shipped_webhooks, strict=True):
        assert stored_webhook["clientConfig"]["url"] == kube_mesh.webhook_url
        for key in ("namespaceSelector", "objectSelector", "failurePolicy",
                    "reinvocationPolicy", "sideEffects", "rules"):
            assert stored_webhook[key] == shipped_webhook[key], key


def test_applying_deploy_again_keeps_the_ca_bundle_the_injector_wrote(
        kube_mesh: Mesh) -> None:
    before = kube_mesh.ca_bundles()
    assert all(before)
    kube_mesh.cluster.kubectl("apply", "-k", str(kube_mesh.workdir / "overlay"))
    assert kube_mesh.ca_bundles() == before


def test_the_injector_does_its_duties_with_its_own_service_account(kube_mesh: Mesh) -> None:
    """Everything below was written by the injector with its ServiceAccount's token, through
    the real RBAC of deploy/rbac.yaml: a missing rule would leave it undone and /readyz
    degraded."""
    cluster = kube_mesh.cluster
    assert kube_mesh.injector is not None
    root = kube_mesh.injector.root_cert.read_text()
    # The caBundle patch (get/patch on the MutatingWebhookConfiguration).
    assert kube_mesh.ca_bundles() == [base64.b64encode(root.encode()).decode()] * len(
        find(render(DEPLOY), "MutatingWebhookConfiguration", "injector")["webhooks"])
    # The shared CA Secret (create, then get, in mesh-system).
    secret = cluster.get("secret", "istio-ca-secret", "-n", MESH_NAMESPACE)
    assert base64.b64decode(secret["data"]["root-cert.pem"]).decode() == root
    # The root ConfigMap in a new namespace (the namespace watch, then create).
    namespace = cluster.namespace("duties", {"istio-injection": "enabled"})

    def configmap_root() -> str | None:
        found = cluster.kubectl("get", "configmap", "istio-ca-root-cert", "-n", namespace,
                                "-o", "jsonpath={.data.root-cert\\.pem}", check=False)
        return found.stdout if found.returncode == 0 else None

    assert eventually(configmap_root, 30, what=f"istio-ca-root-cert in {namespace}") == root
    # And the injector saw nothing refused on the way.
    with kube_mesh.injector.client() as https:
        assert https.get("/readyz").json() == {"status": "ready"}
    assert "HTTP 403" not in kube_mesh.injector.log()  # as injector.kube.client describes it


@pytest.mark.parametrize("write", [
    ["create", "secret", "generic", "stolen", "-n", "default", "--from-literal=a=b"],
    ["create", "secret", "generic", "planted", "-n", "kube-system", "--from-literal=a=b"],
    ["delete", "secret", "istio-ca-secret", "-n", MESH_NAMESPACE],
    ["label", "namespace", "default", "istio-injection=enabled"],
    ["patch", "configmap", "kube-root-ca.crt", "-n", "default", "--type=merge",
     "-p", '{"data": {"ca.crt": "x"}}'],
    ["delete", "mutatingwebhookconfiguration", "injector"],
], ids=["secret-elsewhere", "secret-kube-system", "delete-ca-secret", "label-namespace",
        "patch-other-configmap", "delete-webhook"])
def test_writes_outside_its_duties_are_refused(kube_mesh: Mesh, write: list[str]) -> None:
    result = kube_mesh.cluster.kubectl(*write, kubeconfig=kube_mesh.kubeconfig, check=False)
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower(), result.stderr
    assert "system:serviceaccount:mesh-system:injector" in result.stderr


def test_configmap_creation_is_as_wide_as_rbac_yaml_says(kube_mesh: Mesh) -> None:
    """RBAC cannot limit create by name, and deploy/rbac.yaml says so: the injector may create
    any ConfigMap anywhere. Held here so that a change to that rule is a decision."""
    namespace = kube_mesh.cluster.namespace("wide")
    result = kube_mesh.cluster.kubectl(
        "create", "configmap", "other", "-n", namespace, "--from-literal=a=b",
        "--dry-run=server", kubeconfig=kube_mesh.kubeconfig, check=False)
    assert result.returncode == 0, result.stderr


def test_the_api_server_verifies_the_webhook_with_the_ca_bundle(kube_mesh: Mesh,
                                                                  ) -> None:
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("tls", {"istio-injection": "enabled"})
    stored = cluster.create_pod(namespace, pod("trusted"))
    assert PROXY in container_names(stored)

    # Another CA's root in the bundle: the API server must refuse the injector's certificate,
    # and with failurePolicy Fail the pod is not created.
    foreign = self_signed_authority().roots[0]
    foreign_bundle = base64.b64encode(foreign.public_bytes(serialization.Encoding.PEM)).decode()
    patch = [{"op": "replace", "path": f"/webhooks/{index}/clientConfig/caBundle",
              "value": foreign_bundle} for index in range(len(kube_mesh.ca_bundles()))]
    try:
        def refused() -> str:
            # Patched again on every try: the running injector puts its own root back when
            # its periodic check comes round, and that must not make this test wait for ever.
            _patch_webhooks(cluster, patch)
            manifest = _in(pod(), namespace)
            manifest["metadata"] = {"generateName": "untrusted-", "namespace": namespace}
            result = cluster.create(manifest, check=False)
            return result.stderr if result.returncode != 0 else ""

        message = eventually(refused, 30, what="pod refused while the caBundle is foreign")
        assert "x509" in message and "failed calling webhook" in message, message
    finally:
        # A restarted injector writes its root back at start.
        kube_mesh.stop_injector()
        kube_mesh.start_injector()
    stored = eventually(lambda: _injected_pod(cluster, namespace), 30,
                        what="a pod injected again once the injector restored its caBundle")
    assert PROXY in container_names(stored)


def _in(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}


def _patch_webhooks(cluster: Cluster, patch: list[dict[str, Any]]) -> None:
    cluster.kubectl("patch", "mutatingwebhookconfiguration", "injector", "--type=json",
                    "-p", json.dumps(patch))


def _injected_pod(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    manifest = _in(pod(), namespace)
    manifest["metadata"] = {"generateName": "again-", "namespace": namespace}
    result = cluster.create(manifest, check=False)
    if result.returncode != 0:
        return None
    stored: dict[str, Any] = json.loads(result.stdout)
    return stored


def test_the_overlay_changes_only_the_webhooks_client_config(tmp_path: Any) -> None:
    """The overlay the cluster tests apply is deploy/ with one change: the clientConfig."""
    shipped = render(DEPLOY)
    overlaid = render(deploy_overlay(tmp_path / "overlay", "https://127.0.0.1:1/inject"))
    assert len(shipped) == len(overlaid)
    for before, after in zip(shipped, overlaid, strict=True):
        if before["kind"] == "MutatingWebhookConfiguration":
            for webhook in before["webhooks"]:
                webhook["clientConfig"] = {"url": "https://127.0.0.1:1/inject"}
        assert before == after
