"""Whether a pod gets a sidecar, and why: SPEC section 3's decision, first match wins."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from injector.mesh.config import MeshConfig
from injector.mesh.names import INJECT_LABEL, NAMESPACE_LABEL, STATUS_ANNOTATION


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str


HOST_NETWORK = Decision(False, "host-network")
ALREADY_INJECTED = Decision(False, "already-injected")
IGNORED_NAMESPACE = Decision(False, "ignored-namespace")
NAMESPACE_DISABLED = Decision(False, "namespace-disabled")
POD_LABEL_FALSE = Decision(False, "pod-label-false")
POD_LABEL_TRUE = Decision(True, "pod-label-true")
POD_ANNOTATION_FALSE = Decision(False, "pod-annotation-false")
POD_ANNOTATION_TRUE = Decision(True, "pod-annotation-true")
NAMESPACE_ENABLED = Decision(True, "namespace-enabled")
POLICY_ENABLED = Decision(True, "policy-enabled")
POLICY_DISABLED = Decision(False, "policy-disabled")


def decide(
    pod: Mapping[str, Any],
    namespace: str,
    namespace_labels: Mapping[str, str] | None,
    mesh: MeshConfig,
) -> Decision:
    """Inject or not, with the reason.

    `namespace_labels` is None when the namespace's labels are unknown (no Kubernetes API, or it
    cannot be reached): then the webhook's namespaceSelector is trusted and the pod counts as
    coming from an `istio-injection=enabled` namespace.
    """
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork") is True:
        return HOST_NETWORK
    annotations = metadata.get("annotations") or {}
    # Only our own record says so: a pod's own istio-proxy container (without it) is merged
    # over the injected one (`injector.injection.user_containers`), as Istio does.
    if STATUS_ANNOTATION in annotations:
        return ALREADY_INJECTED
    if namespace in mesh.all_ignored_namespaces:
        return IGNORED_NAMESPACE
    namespace_value = "enabled" if namespace_labels is None else namespace_labels.get(
        NAMESPACE_LABEL
    )
    # A namespace's "no" beats a pod's "yes", as the webhook selectors do.
    if namespace_value == "disabled":
        return NAMESPACE_DISABLED
    labels = metadata.get("labels") or {}
    label = labels.get(INJECT_LABEL)
    if label == "false":
        return POD_LABEL_FALSE
    if label == "true":
        return POD_LABEL_TRUE
    annotation = annotations.get(INJECT_LABEL)
    if annotation == "false":
        return POD_ANNOTATION_FALSE
    if annotation == "true":
        return POD_ANNOTATION_TRUE
    if namespace_value == "enabled":
        return NAMESPACE_ENABLED
    return POLICY_ENABLED if mesh.policy == "enabled" else POLICY_DISABLED
