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
from injector.injection import limits, patch, policy, sidecar
from injector.injection.limits import MAX_NAME_CHARS, MAX_NAMESPACE_CHARS
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
    except orjson.JSONDecodeError as error:
        # orjson's reason is short and names no content ("recursion limit reached: ...").
        raise BadReview(f"the body is not JSON ({str(error)[:120]})") from None
    if not isinstance(review, dict) or review.get("kind") != KIND:
        raise BadReview("the body is not an AdmissionReview")
    api_version = review.get("apiVersion")
    # A string before the set lookup: an object or a list here is unhashable (it was a 500).
    if type(api_version) is not str or api_version not in API_VERSIONS:
        shown = (repr(api_version) if type(api_version) is str and len(api_version) <= 80
                 else f"(a {type(api_version).__name__})" if type(api_version) is not str
                 else f"{api_version[:60]!r}...")
        raise BadReview(
            f"unsupported apiVersion {shown}: expected {' or '.join(sorted(API_VERSIONS))}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview's request has no uid")
    return cast(AdmissionReview, review)  # as far as the checks above go


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
    # Only a string is a name: str() of a nested object recurses (and may be huge). Cut for the
    # log line; the limit on names is checked with the rest of the pod, below.
    name = metadata.get("name") or metadata.get("generateName") or ""
    name = name[:MAX_NAME_CHARS] if type(name) is str else ""
    if type(namespace) is not str or len(namespace) > MAX_NAMESPACE_CHARS:
        where = "request.namespace" if request.get("namespace") else "metadata.namespace"
        message = (f"{where} must be a string" if type(namespace) is not str else
                   f"{where} is {len(namespace)} characters long, over Kubernetes' limit of "
                   f"{MAX_NAMESPACE_CHARS}")
        return Outcome(_denied(review, message), "denied", "invalid-request", "", name)
    kind = request.get("kind")
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or kind.get("group", "") != "":
        return Outcome(_allowed(review), "ignored", "not-a-pod", namespace, name)
    if request.get("operation", "CREATE") != "CREATE":
        return Outcome(_allowed(review), "ignored", "not-a-create", namespace, name)
    # What injection reads, and Kubernetes' own limits: before any value is parsed or anything
    # is built.
    problem = limits.check(pod)
    if problem is not None:
        return Outcome(_denied(review, f"invalid pod: {problem.message}"), "denied",
                       problem.reason, namespace, name)
    decision = policy.decide(pod, namespace, namespace_labels(namespace), mesh)
    if not decision.inject:
        return Outcome(_allowed(review), "skipped", decision.reason, namespace, name)
    try:
        injection = sidecar.build(pod, mesh, as_json=True)
    except (InvalidAnnotation, sidecar.NameConflict) as error:
        reason = "invalid-annotation" if isinstance(error, InvalidAnnotation) else "name-conflict"
        return Outcome(_denied(review, f"sidecar injection refused: {error}"), "denied", reason,
                       namespace, name)
    except sidecar.UnreadableField as error:
        return Outcome(_denied(review, f"invalid pod: {error}"), "denied", limits.INVALID_POD,
                       namespace, name)
    return Outcome(_patched(review, patch.encoded(pod, injection)), "injected", decision.reason,
                   namespace, name)
