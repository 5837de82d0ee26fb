"""The AdmissionReview wire format, typed once.

kube-apiserver sends a review with a `request` and expects the same review back with a
`response` (admission.k8s.io/v1, or v1beta1 from older clusters: the same shape). These
TypedDicts are the one description of both: the webhook's checks and answers are written
against them (`injector.injection.webhook`), and the OpenAPI document of `POST /inject` is
derived from them (`injector.server.app`), so the two cannot drift apart.

They are types only: nothing validates a review against them at run time (a full validation
costs more than the whole injection). `webhook.parse` checks what every answer needs (the
`apiVersion`, `kind` and `request.uid`, each of any JSON type until checked); the pod is
checked once, for what injection reads and for Kubernetes' own limits, by
`injector.injection.limits` before anything reads it; the rest is kube-apiserver's word, and
passes through untouched.
"""

from typing import Annotated, Any, Final, Literal, NotRequired, get_args

from pydantic import Field

# typing_extensions' TypedDict, not typing's: pydantic derives schemas only from the former
# before Python 3.12. (No `from __future__ import annotations` here either: with it, Python
# 3.11 takes every NotRequired key for a required one.)
from typing_extensions import TypedDict

ApiVersion = Literal["admission.k8s.io/v1", "admission.k8s.io/v1beta1"]
API_VERSIONS: Final = frozenset(get_args(ApiVersion))
Kind = Literal["AdmissionReview"]
KIND: Final[Kind] = "AdmissionReview"
Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
PatchType = Literal["JSONPatch"]
JSON_PATCH: Final[PatchType] = "JSONPatch"


class GroupVersionKind(TypedDict):
    group: str  # "" for the core group (Pods)
    version: str
    kind: str


class GroupVersionResource(TypedDict):
    group: str
    version: str
    resource: str


class UserInfo(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]


class Request(TypedDict):
    """What is asked: may this `operation` on `object` go ahead, and changed how?"""

    # The one field every answer needs: the response carries it back.
    uid: Annotated[str, Field(min_length=1)]
    kind: NotRequired[GroupVersionKind]
    resource: NotRequired[GroupVersionResource]
    subResource: NotRequired[str]
    requestKind: NotRequired[GroupVersionKind]
    requestResource: NotRequired[GroupVersionResource]
    requestSubResource: NotRequired[str]
    name: NotRequired[str]
    namespace: NotRequired[str]
    operation: NotRequired[Operation]
    userInfo: NotRequired[UserInfo]
    # The object as it would be stored (a Pod, for what the webhook injects); any JSON object.
    object: NotRequired[dict[str, Any] | None]
    oldObject: NotRequired[dict[str, Any] | None]
    dryRun: NotRequired[bool]
    options: NotRequired[dict[str, Any] | None]


class AdmissionReview(TypedDict):
    """The review as kube-apiserver sends it."""

    apiVersion: ApiVersion
    kind: Kind
    request: Request


class Status(TypedDict, total=False):
    """Why a request is refused (a Kubernetes `metav1.Status`, as much of it as is sent)."""

    status: Literal["Success", "Failure"]
    code: int
    reason: str
    message: str


class Response(TypedDict):
    """The answer: allowed or not, and for an allowed one, the JSON patch to apply."""

    uid: str  # the request's
    allowed: bool
    patchType: NotRequired[PatchType]
    # Base64 of the JSON patch (RFC 6902).
    patch: NotRequired[Annotated[str, Field(json_schema_extra={"format": "byte"})]]
    status: NotRequired[Status]


class AdmissionReviewResponse(TypedDict):
    """The review sent back: the request's apiVersion and kind, with the response."""

    apiVersion: ApiVersion
    kind: Kind
    response: Response
