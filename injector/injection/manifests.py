"""Injection applied to manifests: where in each kind of document its pod is.

`injector kube-inject` injects files of YAML documents offline. Pods and the pod templates of
workloads are injected with the same code as the webhook; a List is injected item by item;
every other document passes through unchanged. Without a cluster the namespace's labels are
unknown, so, as in the webhook without an API, a template counts as coming from an enabled
namespace.

A manifest is the user's file, not trusted to be well formed: whatever it holds, the answer is
the injected YAML or a ManifestError naming the document and what is wrong, never another
exception. So the stream is bounded before it is read (MAX_MANIFEST_BYTES, checked by the
caller that reads it; MAX_DEPTH levels of nesting, checked on the parser's events before
PyYAML builds anything, as its composer recurses once per level), and each pod is checked as
the webhook checks it (`injector.injection.limits`) before it is injected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonpatch
import yaml

from injector.errors import InvalidInput
from injector.injection import limits, patch, policy, sidecar
from injector.injection.overrides import InvalidAnnotation
from injector.mesh.config import MeshConfig

# The kinds whose pod template is at spec.template (a CronJob's is a level further down): as
# Istio's kube-inject, the core workloads, ReplicationController and OpenShift's
# DeploymentConfig (apps.openshift.io/v1).
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job",
                            "ReplicationController", "DeploymentConfig"})

# Far more than any Kubernetes object needs (a CRD's schema is the deepest, at a few dozen),
# far less than Python's recursion limit, which copying or writing a document would hit.
MAX_DEPTH = 100
# As much as /inject reads in one review; more than any set of objects a cluster would take in
# one apply (an object is at most 1.5 MiB in etcd). Reading, injecting and writing 8 MiB takes
# about 10 s and 300 MB.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024

# libyaml when it is there: the same documents and the same text, several times faster.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class ManifestError(InvalidInput):
    """A document that cannot be injected (or a file that is not YAML); the message names it."""


def _pod_template(document: Mapping[str, Any], where: str) -> Any:
    """The pod (a Pod itself, or a workload's template) to inject, or None for other kinds."""
    kind = document.get("kind")
    if type(kind) is not str:
        return None
    if kind == "Pod":
        return document
    if kind not in WORKLOAD_KINDS and kind != "CronJob":
        return None
    spec = document.get("spec")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: the {kind}'s spec must be an object")
    if kind in WORKLOAD_KINDS:
        template = spec.get("template")
    else:
        job = spec.get("jobTemplate")
        job_spec = job.get("spec") if isinstance(job, dict) else None
        template = job_spec.get("template") if isinstance(job_spec, dict) else None
    if template is not None and not isinstance(template, dict):
        raise ManifestError(f"{where}: the {kind}'s pod template must be an object")
    return template


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
    pod = _pod_template(document, where)
    if not isinstance(pod, dict):
        return document
    kind = document["kind"]
    metadata = document.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ManifestError(f"{where}: the {kind}'s metadata must be an object")
    metadata = metadata or {}
    for field in ("name", "generateName", "namespace"):
        if metadata.get(field) is not None and type(metadata[field]) is not str:
            raise ManifestError(f"{where}: the {kind}'s metadata.{field} must be a string")
    namespace = metadata.get("namespace") or "default"
    name = metadata.get("name") or metadata.get("generateName")
    if not isinstance(pod.get("spec"), dict):
        raise ManifestError(f"{where}: the {kind}'s pod has no spec")
    problem = limits.check(pod)
    message = problem.message if problem is not None else None
    if message is None and len(namespace) > limits.MAX_NAMESPACE_CHARS:
        message = (f"metadata.namespace is {len(namespace)} characters long, over Kubernetes' "
                   f"limit of {limits.MAX_NAMESPACE_CHARS}")
    # The name as written when it is plain, else quoted and cut: the message is one line.
    shown = name if name is None or (name.isprintable() and len(name) <= 80) else (
        limits.shown(name))
    if message is not None:
        raise ManifestError(f"{where} ({kind} {shown}): {message}")
    decision = policy.decide(pod, namespace, None, mesh)
    if not decision.inject:
        return document
    try:
        # The workload's own name: a template's pods do not exist yet to be named after it.
        injection = sidecar.build(pod, mesh, name=str(name).rstrip("-") if name else None)
    except (InvalidAnnotation, sidecar.NameConflict, sidecar.UnreadableField) as error:
        raise ManifestError(f"{where} ({kind} {shown}): {error}") from None
    injected = jsonpatch.apply_patch(pod, patch.build(pod, injection))
    if pod is document:
        return injected
    # Put the injected template back where it was found, copying only the path to it.
    if document.get("kind") == "CronJob":
        job = document["spec"]["jobTemplate"]
        job = {**job, "spec": {**job["spec"], "template": injected}}
        return {**document, "spec": {**document["spec"], "jobTemplate": job}}
    return {**document, "spec": {**document["spec"], "template": injected}}


def _check_depth(text: str, source: str) -> None:
    """ManifestError if a document in `text` nests deeper than MAX_DEPTH, counting what its
    aliases bring (an alias of a deep collection inside another deep one is deeper than either),
    or holds a collection that contains itself. Read from the parser's events, which come
    without recursion, before anything recursive sees the text."""
    heights: dict[str, int] = {}  # an anchor's collection: how deep it nests
    # One entry per open collection: its anchor and the height of its deepest child so far.
    open_collections: list[list[Any]] = []
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            open_collections.append([event.anchor, 0])
            height = None
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, deepest_child = open_collections.pop()
            height = deepest_child + 1
            if anchor is not None:
                heights[anchor] = height
        elif isinstance(event, yaml.AliasEvent):
            if any(entry[0] == event.anchor for entry in open_collections):
                raise ManifestError(f"{source}{_line(event)}: the alias *{event.anchor} makes "
                                    "a collection that contains itself")
            height = heights.get(event.anchor or "", 0)
        else:
            height = 0 if isinstance(event, yaml.ScalarEvent) else None
        if height is None or not open_collections:
            continue
        parent = open_collections[-1]
        parent[1] = max(parent[1], height)
        if len(open_collections) + height > MAX_DEPTH:
            raise ManifestError(f"{source}{_line(event)}: nested deeper than {MAX_DEPTH} levels")
    # A document's root is checked when its last child is.


def _line(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f" line {mark.line + 1}" if mark is not None else ""


def inject_yaml(text: str, mesh: MeshConfig, source: str) -> str:
    """Every document of a YAML stream injected, as YAML; `source` names the stream (the file)
    in a ManifestError, which also says where YAML that cannot be parsed goes wrong."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB")
    try:
        _check_depth(text, source)
        documents = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ManifestError(f"{source}{line}: {' '.join(str(problem).split())}") from None
    except (ValueError, OverflowError) as error:
        # PyYAML's constructors raise these for a scalar that looks typed and is not (a
        # timestamp with a 13th month, say); the error names no place.
        if isinstance(error, ManifestError):
            raise
        raise ManifestError(f"{source}: a value cannot be read: "
                            f"{' '.join(str(error).split())[:200]}") from None
    injected = [
        inject_document(document, mesh, f"{source} document {index + 1}")
        for index, document in enumerate(documents)
    ]
    # In the order written (not sorted), block style: as close to the input as PyYAML gets.
    return yaml.dump_all(injected, Dumper=_DUMPER, sort_keys=False, default_flow_style=False)
