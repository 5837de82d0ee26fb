"""Pods and AdmissionReviews as kube-apiserver sends them, for the tests."""

from __future__ import annotations

import copy
import uuid
from typing import Any


def pod(
    name: str = "web-7d4b9c-x2x9z",
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A ReplicaSet-style pod; omitted parts are absent, as in a minimal manifest."""
    metadata: dict[str, Any] = {"name": name, "namespace": "shop"}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    body: dict[str, Any] = {
        "containers": containers
        if containers is not None
        else [{"name": "app", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}]
    }
    if init_containers is not None:
        body["initContainers"] = init_containers
    if volumes is not None:
        body["volumes"] = volumes
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": body}


def replicaset_pod() -> dict[str, Any]:
    """A pod as a Deployment's ReplicaSet creates it: generateName, owner, template hash."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-5d8c9f7b4-",
            "namespace": "shop",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d8c9f7b4"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "reviews-v1-5d8c9f7b4",
                    "uid": "0b6c0d7e-6d3c-4d8e-9a53-0d6b1e1a2f3c",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "serviceAccountName": "reviews",
            "containers": [
                {
                    "name": "reviews",
                    "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.2",
                    "ports": [{"containerPort": 9080, "protocol": "TCP"}],
                    "env": [{"name": "LOG_DIR", "value": "/tmp/logs"}],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def review(
    obj: dict[str, Any],
    *,
    namespace: str = "shop",
    api_version: str = "admission.k8s.io/v1",
    kind: str = "Pod",
    operation: str = "CREATE",
) -> dict[str, Any]:
    """An AdmissionReview request for `obj`, shaped as kube-apiserver sends it."""
    group, resource = ("", "pods") if kind == "Pod" else ("apps", "deployments")
    version = "v1"
    return {
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "name": obj.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": copy.deepcopy(obj),
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }
