"""AdmissionReview in, AdmissionReview out: the webhook's request handling, free of I/O.

The wire format is `injector.injection.review`'s. Only the parts of the review the decision
needs are checked (a full model of an AdmissionReview costs more than the whole injection);
everything else passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import orjson

from injector.errors import InvalidInput
from injector.injection import patch, policy, sidecar
from injector.injection.overrides import InvalidAnnotation
from injector.injection.review import (
    API_VERSIONS,
    JSON_PATCH,
    KIND,
    AdmissionReview,
    AdmissionReviewResponse,
    Response,
)
from injector.mesh.config import MeshConfig

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


def parse(body: bytes) -> AdmissionReview:
    """The review, or BadReview saying what is wrong with it.

    Checked: what every answer needs (`apiVersion`, `kind`, `request.uid`); the rest of the
    request is as kube-apiserver sent it, and `admit` checks what it reads.
    """
    try:
        review = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadReview("the body is not JSON") from None
    if not isinstance(review, dict) or review.get("kind") != KIND:
        raise BadReview("the body is not an AdmissionReview")
    if review.get("apiVersion") not in API_VERSIONS:
        raise BadReview(
            f"unsupported apiVersion {review.get('apiVersion')!r}: "
            f"expected {' or '.join(sorted(API_VERSIONS))}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview's request has no uid")
    return cast(AdmissionReview, review)  # as far as the checks above go


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


def _answer(review: AdmissionReview, response: Response) -> bytes:
    answer: AdmissionReviewResponse = {
        "apiVersion": review["apiVersion"], "kind": KIND, "response": response}
    return orjson.dumps(answer)


def _allowed(review: AdmissionReview) -> bytes:
    return _answer(review, {"uid": review["request"]["uid"], "allowed": True})


def _patched(review: AdmissionReview, encoded_patch: str) -> bytes:
    return _answer(review, {"uid": review["request"]["uid"], "allowed": True,
                            "patchType": JSON_PATCH, "patch": encoded_patch})


def _denied(review: AdmissionReview, message: str) -> bytes:
    return _answer(review, {
        "uid": review["request"]["uid"],
        "allowed": False,
        "status": {"status": "Failure", "code": 400, "reason": "BadRequest", "message": message},
    })


def admit(review: AdmissionReview, mesh: MeshConfig, namespace_labels: NamespaceLabels
          ) -> Outcome:
    """Answer a parsed review: a patch for a pod to inject, no patch otherwise."""
    # Read as plain JSON: past `parse`, nothing but the uid is known to have its type.
    request: Mapping[str, Any] = review["request"]
    pod: Any = request.get("object")
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
        return Outcome(_allowed(review), "ignored", "not-a-pod", namespace, name)
    if request.get("operation", "CREATE") != "CREATE":
        return Outcome(_allowed(review), "ignored", "not-a-create", namespace, name)
    problem = _invalid_pod(pod)
    if problem is not None:
        return Outcome(
            _denied(review, f"invalid pod: {problem}"), "denied", "invalid-pod", namespace, name
        )
    decision = policy.decide(pod, namespace, namespace_labels(namespace), mesh)
    if not decision.inject:
        return Outcome(_allowed(review), "skipped", decision.reason, namespace, name)
    try:
        injection = sidecar.build(pod, mesh, as_json=True)
    except (InvalidAnnotation, sidecar.NameConflict) as error:
        reason = "invalid-annotation" if isinstance(error, InvalidAnnotation) else "name-conflict"
        return Outcome(_denied(review, f"sidecar injection refused: {error}"), "denied", reason,
                       namespace, name)
    return Outcome(_patched(review, patch.encoded(pod, injection)), "injected", decision.reason,
                   namespace, name)
