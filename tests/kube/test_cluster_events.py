"""Events through the real kube-apiserver: what `kubectl get events` shows about the pods'
owners after an injection, a refusal and a surprising skip; one per owner and reason in the
window, none for a server-side dry run. Written with the injector's own RBAC (deploy/)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.cluster import Cluster, Mesh
from tests.support.eventually import eventually
from tests.support.pods import pod


def replicaset(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """A stored ReplicaSet (no controller-manager here: it never makes pods itself)."""
    created = cluster.create({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "app"}]}}},
    })
    document: dict[str, Any] = json.loads(created.stdout)
    return document


def owned_by(owner: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    manifest = pod(**kwargs)
    manifest["metadata"].pop("name")
    manifest["metadata"]["generateName"] = f"{owner['metadata']['name']}-"
    manifest["metadata"]["labels"] = {**manifest["metadata"].get("labels", {}),
                                      "app": owner["metadata"]["name"]}
    manifest["metadata"]["ownerReferences"] = [{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"], "controller": True}]
    manifest["metadata"]["namespace"] = owner["metadata"]["namespace"]
    return manifest


def events_about(cluster: Cluster, owner: dict[str, Any]) -> list[dict[str, Any]]:
    listing = cluster.get("events", "-n", owner["metadata"]["namespace"])
    return [event for event in listing["items"]
            if event["involvedObject"].get("uid") == owner["metadata"]["uid"]]


def settled(cluster: Cluster, namespace: str) -> None:
    """Until the injector has written everything it was sent before now: its writer takes the
    queue in order, so once the Event of a fresh owner is stored, the earlier ones are too."""
    marker = replicaset(cluster, namespace, "marker")
    cluster.create(owned_by(marker))
    eventually(lambda: events_about(cluster, marker), 30, interval=0.2,
               what="the marker's Event")
    cluster.kubectl("delete", "replicaset", "marker", "-n", namespace)
    cluster.kubectl("delete", "events", "-n", namespace,
                    f"--field-selector=involvedObject.uid={marker['metadata']['uid']}")


@pytest.fixture
def namespace(kube_mesh: Mesh) -> str:
    return kube_mesh.cluster.namespace("events", {"istio-injection": "enabled"})


def test_an_injection_is_one_event_on_the_owner_per_window(kube_mesh: Mesh,
                                                           namespace: str) -> None:
    cluster = kube_mesh.cluster
    reviews = replicaset(cluster, namespace, "reviews-v1-5d8c9f7b4")
    for _ in range(4):
        stored = json.loads(cluster.create(owned_by(reviews)).stdout)
        assert "istio-proxy" in [c["name"] for c in stored["spec"]["containers"]]
    [event] = eventually(lambda: events_about(cluster, reviews), 30, interval=0.2,
                         what="an Event about the ReplicaSet")
    assert event["reason"] == "Injected"
    assert event["type"] == "Normal"
    assert event["involvedObject"]["kind"] == "ReplicaSet"
    assert event["involvedObject"]["name"] == "reviews-v1-5d8c9f7b4"
    assert event["message"].startswith("sidecar injected into pod reviews-v1-5d8c9f7b4-")
    assert event["message"].endswith("(namespace-enabled)")
    assert event["source"]["component"] == "injector"
    settled(cluster, namespace)
    assert len(events_about(cluster, reviews)) == 1  # four pods, one Event in the window

    # As a user sees it.
    shown = cluster.kubectl("get", "events", "-n", namespace).stdout
    assert "Injected" in shown and "replicaset/reviews-v1-5d8c9f7b4" in shown


def test_a_refusal_is_a_warning_on_the_owner(kube_mesh: Mesh, namespace: str) -> None:
    cluster = kube_mesh.cluster
    owner = replicaset(cluster, namespace, "greedy")
    result = cluster.create(owned_by(owner, annotations={"sidecar.istio.io/proxyCPU": "lots"}),
                            check=False)
    assert result.returncode != 0
    assert "sidecar.istio.io/proxyCPU" in result.stderr
    [event] = eventually(lambda: events_about(cluster, owner), 30, interval=0.2,
                         what="a Warning about the ReplicaSet")
    assert (event["reason"], event["type"]) == ("InjectionRefused", "Warning")
    assert "sidecar injection refused: annotation sidecar.istio.io/proxyCPU" in event["message"]


def test_a_skip_the_user_may_not_expect_is_an_event(kube_mesh: Mesh, namespace: str) -> None:
    cluster = kube_mesh.cluster
    owner = replicaset(cluster, namespace, "node-agent")
    stored = json.loads(cluster.create(owned_by(owner, hostNetwork=True)).stdout)
    assert "istio-proxy" not in [c["name"] for c in stored["spec"]["containers"]]
    [event] = eventually(lambda: events_about(cluster, owner), 30, interval=0.2,
                         what="an Event about the skipped pod's owner")
    assert (event["reason"], event["type"]) == ("InjectionSkipped", "Normal")
    assert "host's network" in event["message"]


def test_a_skip_the_user_asked_for_and_a_dry_run_make_no_event(kube_mesh: Mesh,
                                                               namespace: str) -> None:
    cluster = kube_mesh.cluster
    opted_out = replicaset(cluster, namespace, "opted-out")
    cluster.create(owned_by(opted_out, annotations={"sidecar.istio.io/inject": "false"}))
    rehearsed = replicaset(cluster, namespace, "rehearsed")
    dry = cluster.create(owned_by(rehearsed), extra=["--dry-run=server"])
    assert "istio-proxy" in dry.stdout  # the webhook was called, and injected it
    settled(cluster, namespace)
    assert events_about(cluster, opted_out) == []
    assert events_about(cluster, rehearsed) == []
