"""AdmissionReview in, AdmissionReview out: the webhook's request handling, free of I/O.

Only the parts of the review the decision needs are checked (a full model of an AdmissionReview
costs more than the whole injection); everything else passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson

from injector.errors import InvalidInput
from injector.injection import patch, policy, sidecar
from injector.mesh.config import MeshConfig

API_VERSIONS = frozenset({"admission.k8s.io/v1", "admission.k8s.io/v1beta1"})

# The labels of a namespace, or None when they are unknown (then the webhook's
# namespaceSelector is trusted).
NamespaceLabels = Callable[[str], Mapping[str, str] | None]


class BadReview(InvalidInput):
    """The body is not an AdmissionReview we can answer: HTTP 400."""


class Outcome(NamedTuple):
    """What the webhook answered, and why, for the log line and the metrics (a NamedTuple:
    built per admission, and cheaper than a frozen dataclass)."""

    body: bytes
    result: str  # injected | skipped | denied | ignored
    reason: str
    namespace: str
    pod: str


def parse(body: bytes) -> dict[str, Any]:
    """The review as a dict, or BadReview saying what is wrong with it."""
    try:
        review = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadReview("the body is not JSON") from None
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise BadReview("the body is not an AdmissionReview")
    if review.get("apiVersion") not in API_VERSIONS:
        raise BadReview(
            f"unsupported apiVersion {review.get('apiVersion')!r}: "
            "expected admission.k8s.io/v1 or admission.k8s.io/v1beta1"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview's request has no uid")
    return review


def _invalid_pod(pod: Any) -> str | None:
    """What makes `pod` unusable for injection, or None. Checks only what injection reads."""
    if not isinstance(pod, dict):
        return "request.object is not a Pod"
    metadata = pod.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return "metadata must be an object"
    for field in ("labels", "annotations"):
        entries = (metadata or {}).get(field)
        if entries is None:
            continue
        if not isinstance(entries, dict) or not all(
            isinstance(value, str) for value in entries.values()
        ):
            return f"metadata.{field} must map strings to strings"
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return "spec must be an object"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return "spec.containers must be a non-empty list"
    for field in ("containers", "initContainers", "volumes"):
        items = spec.get(field)
        if items is None:
            continue
        if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) for item in items
        ):
            return f"spec.{field} must be a list of objects with a name"
    return None


def _response(review: Mapping[str, Any], answer: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "apiVersion": review["apiVersion"],
            "kind": "AdmissionReview",
            "response": {"uid": review["request"]["uid"], **answer},
        }
    )


def _denied(review: Mapping[str, Any], message: str) -> bytes:
    return _response(
        review,
        {
            "allowed": False,
            "status": {
                "status": "Failure",
                "code": 400,
                "reason": "BadRequest",
                "message": message,
            },
        },
    )


def admit(
    review: Mapping[str, Any], mesh: MeshConfig, namespace_labels: NamespaceLabels
) -> Outcome:
    """Answer a parsed review: a patch for a pod to inject, no patch otherwise."""
    request = review["request"]
    pod = request.get("object")
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    namespace = request.get("namespace") or metadata.get("namespace") or "default"
    name = str(metadata.get("name") or metadata.get("generateName") or "")
    if not isinstance(namespace, str):
        return Outcome(
            _denied(review, "request.namespace must be a string"),
            "denied",
            "invalid-request",
            "",
            name,
        )
    kind = request.get("kind")
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or kind.get("group", "") != "":
        return Outcome(
            _response(review, {"allowed": True}), "ignored", "not-a-pod", namespace, name
        )
    if request.get("operation", "CREATE") != "CREATE":
        return Outcome(
            _response(review, {"allowed": True}), "ignored", "not-a-create", namespace, name
        )
    problem = _invalid_pod(pod)
    if problem is not None:
        return Outcome(
            _denied(review, f"invalid pod: {problem}"), "denied", "invalid-pod", namespace, name
        )
    decision = policy.decide(pod, namespace, namespace_labels(namespace), mesh)
    if not decision.inject:
        return Outcome(
            _response(review, {"allowed": True}), "skipped", decision.reason, namespace, name
        )
    try:
        injection = sidecar.build(pod, mesh, as_json=True)
    except (sidecar.InvalidAnnotation, sidecar.NameConflict) as error:
        reason = ("invalid-annotation" if isinstance(error, sidecar.InvalidAnnotation)
                  else "name-conflict")
        return Outcome(_denied(review, f"sidecar injection refused: {error}"), "denied", reason,
                       namespace, name)
    answer = {"allowed": True, "patchType": "JSONPatch", "patch": patch.encoded(pod, injection)}
    return Outcome(_response(review, answer), "injected", decision.reason, namespace, name)
