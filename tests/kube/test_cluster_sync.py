"""The injector's cluster duties against the real kube-apiserver: the root ConfigMaps, the CA the
replicas share through the Secret, and the namespace watch behind the decision."""

from __future__ import annotations

import json

from tests.support.cluster import MESH_NAMESPACE, Cluster, Mesh
from tests.support.eventually import eventually
from tests.support.pods import pod, review

CONFIGMAP = "istio-ca-root-cert"


def root_in(cluster: Cluster, namespace: str) -> str | None:
    """The ConfigMap's root-cert.pem, or None when there is no ConfigMap."""
    found = cluster.kubectl("get", "configmap", CONFIGMAP, "-n", namespace, "-o", "json",
                            check=False)
    if found.returncode != 0:
        assert "NotFound" in found.stderr, found.stderr
        return None
    data = json.loads(found.stdout).get("data") or {}
    value: str | None = data.get("root-cert.pem")
    return value


def test_the_root_configmap_is_where_spec_says_and_kept_right(kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    assert kube_mesh.injector is not None
    root = kube_mesh.injector.root_cert.read_text()
    # Those that must not get it first, so that by the time the others have it, these were
    # considered too.
    disabled = cluster.namespace("cm-disabled", {"istio-injection": "disabled"})
    enabled = cluster.namespace("cm-enabled", {"istio-injection": "enabled"})
    unlabelled = cluster.namespace("cm-unlabelled")
    for namespace in (enabled, unlabelled):
        eventually(lambda ns=namespace: root_in(cluster, ns) == root, 30,
                   what=f"{CONFIGMAP} in {namespace}")
    for namespace in (disabled, "kube-system", MESH_NAMESPACE):
        assert root_in(cluster, namespace) is None, namespace

    cluster.kubectl("delete", "configmap", CONFIGMAP, "-n", enabled)
    eventually(lambda: root_in(cluster, enabled) == root, 30, what="the ConfigMap recreated")

    cluster.kubectl("patch", "configmap", CONFIGMAP, "-n", unlabelled, "--type=merge",
                    "-p", json.dumps({"data": {"root-cert.pem": "tampered"}}))
    eventually(lambda: root_in(cluster, unlabelled) == root, 30, what="the ConfigMap corrected")


def test_a_second_replica_signs_with_the_root_the_first_stored(kube_mesh: Mesh) -> None:
    assert kube_mesh.injector is not None
    first_root = kube_mesh.injector.root_cert.read_bytes()
    second = kube_mesh.replica("replica-2")
    try:
        assert second.certs_dir != kube_mesh.injector.certs_dir
        assert second.root_cert.read_bytes() == first_root
        assert (second.certs_dir / "ca-key.pem").read_bytes() == (
            kube_mesh.injector.certs_dir / "ca-key.pem").read_bytes()
        with second.client() as https:
            assert https.get("/readyz").json() == {"status": "ready"}
    finally:
        second.stop()


def test_relabelling_a_namespace_disabled_stops_injection_without_a_restart(
        kube_mesh: Mesh) -> None:
    cluster = kube_mesh.cluster
    injector = kube_mesh.injector
    assert injector is not None
    pid = injector.process.pid
    namespace = cluster.namespace("relabel", {"istio-injection": "enabled"})
    before = cluster.create_pod(namespace, pod("before"))
    assert "istio-proxy" in [c["name"] for c in before["spec"]["containers"]]

    cluster.kubectl("label", "namespace", namespace, "istio-injection=disabled", "--overwrite")

    # The injector's own watch saw it: asked directly (as the webhook would be, were its
    # selector not also keeping the pod away), it now says no.
    def injector_declines() -> bool:
        with injector.client() as https:
            answer = https.post("/inject", json=review(pod("asked"), namespace=namespace))
        return "patch" not in answer.json()["response"]

    eventually(injector_declines, 30, what="the injector declining after the relabel")
    after = cluster.create_pod(namespace, pod("after"))
    assert [c["name"] for c in after["spec"]["containers"]] == ["app"]
    assert injector.process.poll() is None and injector.process.pid == pid
