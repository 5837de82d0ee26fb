"""Injection applied to manifests: where in each kind of document its pod is.

`injector kube-inject` injects files of YAML documents offline. Pods and the pod templates of
workloads are injected with the same code as the webhook; a List is injected item by item;
every other document passes through unchanged. Without a cluster the namespace's labels are
unknown, so, as in the webhook without an API, a template counts as coming from an enabled
namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonpatch
import yaml

from injector.errors import InvalidInput
from injector.injection import patch, policy, sidecar
from injector.injection.overrides import InvalidAnnotation
from injector.mesh.config import MeshConfig

# The kinds whose pod template is at spec.template (a CronJob's is a level further down).
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})


class ManifestError(InvalidInput):
    """A document that cannot be injected (or a file that is not YAML); the message names it."""


def _pod_template(document: Mapping[str, Any]) -> Any:
    """The pod (a Pod itself, or a workload's template) to inject, or None for other kinds."""
    kind = document.get("kind")
    spec = document.get("spec")
    if kind == "Pod":
        return document
    if not isinstance(spec, dict):
        return None
    if kind in WORKLOAD_KINDS:
        return spec.get("template")
    if kind == "CronJob":
        job = spec.get("jobTemplate")
        job_spec = job.get("spec") if isinstance(job, dict) else None
        return job_spec.get("template") if isinstance(job_spec, dict) else None
    return None


def inject_document(document: Any, mesh: MeshConfig, where: str) -> Any:
    """The document with its pod injected, or the document itself when there is nothing to do.

    `where` names the document in a ManifestError (the file and the document's number).
    The document is not changed: what is injected is a copy of the path to the pod.
    """
    if not isinstance(document, dict):
        return document
    if document.get("kind") == "List" and isinstance(document.get("items"), list):
        items = [
            inject_document(item, mesh, f"{where} item {index + 1}")
            for index, item in enumerate(document["items"])
        ]
        return {**document, "items": items}
    pod = _pod_template(document)
    if not isinstance(pod, dict):
        return document
    metadata = document.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    namespace = metadata.get("namespace") or "default"
    name = metadata.get("name") or metadata.get("generateName")
    if not isinstance(pod.get("spec"), dict):
        raise ManifestError(f"{where}: the {document.get('kind')}'s pod has no spec")
    decision = policy.decide(pod, namespace, None, mesh)
    if not decision.inject:
        return document
    try:
        # The workload's own name: a template's pods do not exist yet to be named after it.
        injection = sidecar.build(pod, mesh, name=str(name).rstrip("-") if name else None)
    except (InvalidAnnotation, sidecar.NameConflict) as error:
        raise ManifestError(f"{where} ({document.get('kind')} {name}): {error}") from None
    injected = jsonpatch.apply_patch(pod, patch.build(pod, injection))
    if pod is document:
        return injected
    # Put the injected template back where it was found, copying only the path to it.
    if document.get("kind") == "CronJob":
        job = document["spec"]["jobTemplate"]
        job = {**job, "spec": {**job["spec"], "template": injected}}
        return {**document, "spec": {**document["spec"], "jobTemplate": job}}
    return {**document, "spec": {**document["spec"], "template": injected}}


def inject_yaml(text: str, mesh: MeshConfig, source: str) -> str:
    """Every document of a YAML stream injected, as YAML; `source` names the stream (the file)
    in a ManifestError, which also says where YAML that cannot be parsed goes wrong."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ManifestError(f"{source}{line}: {problem}") from None
    injected = [
        inject_document(document, mesh, f"{source} document {index + 1}")
        for index, document in enumerate(documents)
    ]
    # In the order written (not sorted), block style: as close to the input as PyYAML gets.
    return yaml.safe_dump_all(injected, sort_keys=False, default_flow_style=False)
