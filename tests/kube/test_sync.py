"""The cluster duties of `injector serve` (injector.kube.sync): the namespace-label cache, the
root ConfigMaps and the webhook's caBundle, through the official client against the tests'
fake API server."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.eventually import eventually
from tests.support.fakeapi import ApiCall, RunningFakeKube
from tests.support.pods import pod, replicaset_pod, review
from tests.support.servers import Server, start_server, stopped

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def webhook_configuration() -> dict[str, Any]:
    manifest = yaml.safe_load((DEPLOY / "webhook.yaml").read_text())
    assert manifest["kind"] == "MutatingWebhookConfiguration"
    return manifest


@pytest.fixture
def cluster(fake_kube: RunningFakeKube) -> RunningFakeKube:
    """The fake API server holding what a deployed mesh has: the webhook configuration, and
    namespaces labelled every way the sync must tell apart."""
    store = fake_kube.api.store
    store.put("mutatingwebhookconfigurations", webhook_configuration())
    store.add_namespace("shop", {"istio-injection": "enabled"})
    store.add_namespace("plain")
    store.add_namespace("legacy", {"istio-injection": "disabled"})
    store.add_namespace("weird", {"istio-injection": "yes"})
    for system in ("kube-system", "mesh-system"):
        store.add_namespace(system)
    return fake_kube


@pytest.fixture
def serving(tmp_path: Path, cluster: RunningFakeKube) -> Iterator[Server]:
    config = tmp_path / "mesh.yaml"
    config.write_text("policy: disabled\n")
    server = start_server(tmp_path, "--kubeconfig", str(cluster.kubeconfig),
                          "--config", str(config))
    yield server
    server.stop()


def root_pem(server: Server) -> str:
    return server.root_cert.read_text()


def configmap(kube: RunningFakeKube, namespace: str) -> dict[str, Any] | None:
    return kube.api.store.get("configmaps", namespace, "istio-ca-root-cert")


def decision(server: Server, obj: dict[str, Any], namespace: str) -> str:
    with server.client() as client:
        answer = client.post("/inject", json=review(obj, namespace=namespace)).json()
    return "injected" if "patch" in answer["response"] else "skipped"


def test_the_webhooks_ca_bundle_is_patched_to_our_root(
    serving: Server, cluster: RunningFakeKube
) -> None:
    bundle = base64.b64encode(root_pem(serving).encode()).decode()

    def patched() -> bool:
        stored = cluster.api.store.get("mutatingwebhookconfigurations", None, "injector")
        assert stored is not None
        return all(hook["clientConfig"].get("caBundle") == bundle for hook in stored["webhooks"])

    eventually(patched, what="caBundle patched")
    stored = cluster.api.store.get("mutatingwebhookconfigurations", None, "injector")
    # Only the caBundle changed: the rest is as deployed.
    for hook, deployed in zip(stored["webhooks"], webhook_configuration()["webhooks"],
                              strict=True):
        hook["clientConfig"].pop("caBundle")
        assert hook == deployed
    # Someone resets it: it is put back.
    for hook in stored["webhooks"]:
        hook["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    cluster.api.store.put("mutatingwebhookconfigurations", stored)


def test_the_root_configmap_is_written_kept_and_recreated(
    serving: Server, cluster: RunningFakeKube
) -> None:
    root = root_pem(serving)
    for namespace in ("shop", "plain", "weird"):
        found = eventually(lambda ns=namespace: configmap(cluster, ns), what=namespace)
        assert found["data"] == {"root-cert.pem": root}
    for namespace in ("legacy", "kube-system", "mesh-system"):
        assert configmap(cluster, namespace) is None
    cluster.api.store.delete("configmaps", "shop", "istio-ca-root-cert")
    eventually(lambda: configmap(cluster, "shop"), what="recreated after deletion")
    tampered = configmap(cluster, "plain")
    tampered["data"]["root-cert.pem"] = "not our root"
    cluster.api.store.put("configmaps", tampered)
    eventually(lambda: (configmap(cluster, "plain") or {}).get("data", {}).get(
        "root-cert.pem") == root, what="corrected after a change")
    cluster.api.store.add_namespace("new-team", {"istio-injection": "enabled"})
    eventually(lambda: configmap(cluster, "new-team"), what="a new namespace gets it")


def test_namespace_labels_come_from_the_watched_cache(
    serving: Server, cluster: RunningFakeKube
) -> None:
    # With policy disabled, an unlabelled namespace's pods are left alone once the labels are
    # known (without an API they would count as coming from an enabled namespace).
    eventually(lambda: decision(serving, pod(), "plain") == "skipped", what="cache synced")
    assert decision(serving, pod(), "shop") == "injected"
    # A malformed label is not an opt-in.
    assert decision(serving, pod(), "weird") == "skipped"
    opted_in = pod(labels={"sidecar.istio.io/inject": "true"})
    assert decision(serving, opted_in, "plain") == "injected"
    assert decision(serving, opted_in, "legacy") == "skipped"
    cluster.api.store.set_namespace_labels("shop", {"istio-injection": "disabled"})
    eventually(lambda: decision(serving, pod(), "shop") == "skipped", what="label change")
    cluster.api.store.set_namespace_labels("plain", {"istio-injection": "enabled"})
    eventually(lambda: decision(serving, pod(), "plain") == "injected", what="label change")
    assert "treated as not opted in" in serving.log()


def test_the_api_down_at_start_then_up(tmp_path: Path, cluster: RunningFakeKube) -> None:
    cluster.stop()
    server = start_server(tmp_path, "--kubeconfig", str(cluster.kubeconfig))
    try:
        with server.client() as client:
            # The webhook works, trusting its namespaceSelector; readiness says what is missing.
            assert decision(server, pod(), "plain") == "injected"
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            cluster.start()
            bundle = base64.b64encode(root_pem(server).encode()).decode()
            eventually(lambda: all(
                hook["clientConfig"].get("caBundle") == bundle for hook in
                cluster.api.store.get("mutatingwebhookconfigurations", None,
                                      "injector")["webhooks"]), timeout=40, what="caBundle")
            eventually(lambda: configmap(cluster, "shop"), timeout=40, what="configmap")
            # Only the shared CA stays degraded: this replica keeps its own root until restarted.
            eventually(lambda: [part.split(":")[0] for part in client.get(
                "/readyz").json().get("degraded", [])] == ["shared CA Secret mesh-system/"
                                                           "istio-ca-secret"],
                timeout=40, what="only the shared CA stays degraded")
    finally:
        server.stop()


def rbac_rules() -> list[tuple[str, str | None, dict[str, Any]]]:
    """(kind, namespace, rule) for every rule the deploy manifests grant the injector."""
    rules = []
    for document in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()):
        if document and document["kind"] in ("ClusterRole", "Role"):
            for rule in document["rules"]:
                rules.append((document["kind"], document["metadata"].get("namespace"), rule))
    return rules


def allowed(call: ApiCall, rules: list[tuple[str, str | None, dict[str, Any]]]) -> bool:
    for kind, namespace, rule in rules:
        if kind == "Role" and call.namespace != (namespace or "mesh-system"):
            continue
        if (call.group in rule.get("apiGroups", []) and call.resource in rule["resources"]
                and call.verb in rule["verbs"]
                and (not rule.get("resourceNames") or call.name in rule["resourceNames"])):
            return True
    return False


def test_rbac_allows_every_call_the_server_makes(
    serving: Server, cluster: RunningFakeKube
) -> None:
    eventually(lambda: configmap(cluster, "shop"), what="configmaps written")
    cluster.api.store.delete("configmaps", "shop", "istio-ca-root-cert")
    eventually(lambda: configmap(cluster, "shop"), what="recreated")
    tampered = configmap(cluster, "plain")
    tampered["data"] = {}
    cluster.api.store.put("configmaps", tampered)
    eventually(lambda: (configmap(cluster, "plain") or {}).get("data"), what="corrected")
    # An owned pod injected: its Event (injector.kube.events) is among the calls.
    with serving.client() as https:
        assert https.post("/inject", json=review(replicaset_pod())).status_code == 200
    eventually(lambda: any(call.resource == "events" for call in cluster.api.calls),
               what="an Event written")
    # The shared CA Secret's calls (injector.kube.ca_secret, at start) are among them.
    made = set(cluster.api.calls)
    verbs = {(call.resource, call.verb) for call in made}
    assert {("namespaces", "list"), ("namespaces", "watch"), ("configmaps", "watch"),
            ("configmaps", "create"), ("mutatingwebhookconfigurations", "patch"),
            ("secrets", "get"), ("secrets", "create")} <= verbs
    rules = rbac_rules()
    refused = [call for call in made if not allowed(call, rules)]
    assert refused == []
    # And nothing is granted that the server does not use (TokenReviews: tests/ca/test_authn.py).
    granted = {(resource, verb) for _, _, rule in rules for resource in rule["resources"]
               for verb in rule["verbs"]} - {("tokenreviews", "create")}
    assert granted <= verbs


def test_with_workers_each_watches_namespaces_and_one_writes(
    tmp_path: Path, cluster: RunningFakeKube
) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("policy: disabled\nworkers: 2\n")
    server = start_server(tmp_path, "--kubeconfig", str(cluster.kubeconfig),
                          "--config", str(config))
    try:
        pids = server.workers(2)
        eventually(lambda: configmap(cluster, "shop"), what="root ConfigMap written")

        def lists(resource: str) -> int:
            return sum(1 for call in cluster.api.calls
                       if call.verb == "list" and call.resource == resource)

        eventually(lambda: lists("namespaces") == 2, what="both workers list namespaces")
        # Nothing to wait for: a second writer would have listed ConfigMaps by now.
        time.sleep(1)
        assert lists("configmaps") == 1
        # Each worker decides from its own namespace cache.
        for answering in pids:
            with stopped([pid for pid in pids if pid != answering]):
                eventually(lambda: decision(server, pod(), "plain") == "skipped",
                           what=f"worker {answering} synced")
                assert decision(server, pod(), "shop") == "injected"
    finally:
        server.stop()


def test_a_revisions_server_keeps_its_own_webhook_configurations_ca_bundle(
    tmp_path: Path, cluster: RunningFakeKube
) -> None:
    # As the chart names them: `injector` for the default revision, `injector-<revision>`.
    revision = {**webhook_configuration(), "metadata": {"name": "injector-canary",
                                                        "labels": {"istio.io/rev": "canary"}}}
    cluster.api.store.put("mutatingwebhookconfigurations", revision)
    server = start_server(tmp_path, "--kubeconfig", str(cluster.kubeconfig),
                          "--revision", "canary")
    try:
        bundle = base64.b64encode(root_pem(server).encode()).decode()

        def patched() -> bool:
            stored = cluster.api.store.get("mutatingwebhookconfigurations", None,
                                           "injector-canary")
            assert stored is not None
            return all(hook["clientConfig"].get("caBundle") == bundle
                       for hook in stored["webhooks"])

        eventually(patched, what="the revision's caBundle patched")
        default = cluster.api.store.get("mutatingwebhookconfigurations", None, "injector")
        assert not any("caBundle" in hook["clientConfig"] for hook in default["webhooks"])
    finally:
        server.stop()
