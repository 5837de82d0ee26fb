"""Is this a pod injection can read, within Kubernetes' own limits? Checked before anything else.

One pass over the pod, before any value is parsed and before anything is built, so that a
hostile pod costs no more than reading it once. It refuses:

- what injection cannot read (`invalid-pod`): a pod is JSON from the API server or YAML from a
  file, and an object there may be a list, a key an integer, a name a nested object;
- what the API server refuses anyway (`kubernetes-limit`), refused the same way here first:
  annotations over 256 KiB in all (keys and values, in UTF-8), a label value over 63 characters
  or outside `[A-Za-z0-9._-]` (alphanumeric at both ends), a label key over 317 characters
  (a 253 prefix, `/`, a 63 name), a pod name or generateName over 253 characters, a namespace
  over 63, a container name that is not a DNS label (63 of `[a-z0-9-]`), and two containers of
  one name (names are unique across containers and initContainers).

It runs for every admission: about a microsecond for a typical pod, so the common cases take
a fast path (`str.isalnum` before a regular expression).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

# Kubernetes' numbers (apimachinery's validation), not ours.
MAX_ANNOTATIONS_BYTES = 256 * 1024  # TotalAnnotationSizeLimitB
MAX_LABEL_VALUE_CHARS = 63
MAX_LABEL_KEY_CHARS = 253 + 1 + 63
MAX_NAME_CHARS = 253  # a DNS subdomain: the pod's name
MAX_NAMESPACE_CHARS = 63  # a DNS label
MAX_CONTAINER_NAME_CHARS = 63  # a DNS label

_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")

INVALID_POD = "invalid-pod"
KUBERNETES_LIMIT = "kubernetes-limit"


class Problem(NamedTuple):
    reason: str  # INVALID_POD or KUBERNETES_LIMIT
    message: str


def shown(text: str) -> str:
    """A name for a message: whole when short, else cut with its length noted."""
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"


def _invalid(message: str) -> Problem:
    return Problem(INVALID_POD, message)


def _over(message: str) -> Problem:
    return Problem(KUBERNETES_LIMIT, message)


def _utf8_length(text: str) -> int:
    # isascii() is free (CPython keeps the flag); encoding is needed only past ASCII.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _name_problem(metadata: dict[str, Any], field: str, limit: int) -> Problem | None:
    value = metadata[field]
    if type(value) is not str:
        return _invalid(f"metadata.{field} must be a string")
    if len(value) > limit:
        return _over(f"metadata.{field} is {len(value)} characters long, over Kubernetes' "
                     f"limit of {limit}")
    return None


def _metadata_problem(metadata: dict[str, Any]) -> Problem | None:
    # Written out, not looped over: this runs for every admission.
    name, generate_name, namespace = (metadata.get("name"), metadata.get("generateName"),
                                      metadata.get("namespace"))
    if name is not None and (type(name) is not str or len(name) > MAX_NAME_CHARS):
        return _name_problem(metadata, "name", MAX_NAME_CHARS)
    if generate_name is not None and (type(generate_name) is not str
                                      or len(generate_name) > MAX_NAME_CHARS):
        return _name_problem(metadata, "generateName", MAX_NAME_CHARS)
    if namespace is not None and (type(namespace) is not str
                                  or len(namespace) > MAX_NAMESPACE_CHARS):
        return _name_problem(metadata, "namespace", MAX_NAMESPACE_CHARS)
    labels = metadata.get("labels")
    if labels is not None:
        if type(labels) is not dict:
            return _invalid("metadata.labels must map strings to strings")
        for key, value in labels.items():
            if type(key) is not str or type(value) is not str:
                return _invalid("metadata.labels must map strings to strings")
            if len(key) > MAX_LABEL_KEY_CHARS:
                return _over(f"the label key {shown(key)} is over Kubernetes' limit of "
                             f"{MAX_LABEL_KEY_CHARS} characters")
            if len(value) > MAX_LABEL_VALUE_CHARS:
                return _over(f"the label {shown(key)} is {len(value)} characters long, over "
                             f"Kubernetes' limit of {MAX_LABEL_VALUE_CHARS}")
            if not (value.isalnum() and value.isascii()) and _LABEL_VALUE.fullmatch(value) is None:
                return _over(f"the label {shown(key)}={value!r} is not a label value Kubernetes "
                             "accepts (A-Z, a-z, 0-9, '-', '_' and '.', alphanumeric at both "
                             "ends)")
    annotations = metadata.get("annotations")
    if annotations is not None:
        if type(annotations) is not dict:
            return _invalid("metadata.annotations must map strings to strings")
        total = 0
        for key, value in annotations.items():
            if type(key) is not str or type(value) is not str:
                return _invalid("metadata.annotations must map strings to strings")
            total += _utf8_length(key) + _utf8_length(value)
        if total > MAX_ANNOTATIONS_BYTES:
            return _over(f"metadata.annotations total {total} bytes, over Kubernetes' limit of "
                         f"{MAX_ANNOTATIONS_BYTES}")
    owners = metadata.get("ownerReferences")
    if owners is not None and type(owners) is not list:
        return _invalid("metadata.ownerReferences must be a list")
    return None


def _containers_problem(spec: dict[str, Any]) -> Problem | None:
    containers = spec.get("containers")
    if type(containers) is not list or not containers:
        return _invalid("spec.containers must be a non-empty list")
    seen: set[str] = set()
    init_containers = spec.get("initContainers")
    for field, items in (("containers", containers), ("initContainers", init_containers)):
        if items is None:
            continue
        if type(items) is not list:
            return _invalid(f"spec.{field} must be a list of objects with a name")
        for item in items:
            name = item.get("name") if type(item) is dict else None
            if type(name) is not str:
                return _invalid(f"spec.{field} must be a list of objects with a name")
            if not (name.isalnum() and name.isascii() and name.islower()
                    and len(name) <= MAX_CONTAINER_NAME_CHARS) and (
                    _DNS_LABEL.fullmatch(name) is None):
                return _over(f"spec.{field} has a container named {shown(name)}, not a DNS "
                             f"label (Kubernetes allows at most {MAX_CONTAINER_NAME_CHARS} of "
                             "a-z, 0-9 and '-', alphanumeric at both ends)")
            if name in seen:
                return _over(f"the pod has two containers named {name!r} (Kubernetes wants "
                             "names unique across containers and initContainers)")
            seen.add(name)
    volumes = spec.get("volumes")
    if volumes is not None:
        if type(volumes) is not list:
            return _invalid("spec.volumes must be a list of objects with a name")
        for volume in volumes:
            if type(volume) is not dict or type(volume.get("name")) is not str:
                return _invalid("spec.volumes must be a list of objects with a name")
    return None


def check(pod: Any) -> Problem | None:
    """Why `pod` cannot be injected as it is, or None. Checks only what injection reads, and
    the limits Kubernetes would hold it to."""
    if type(pod) is not dict:
        return _invalid("the object is not a Pod")
    metadata = pod.get("metadata")
    if metadata is not None:
        if type(metadata) is not dict:
            return _invalid("metadata must be an object")
        problem = _metadata_problem(metadata)
        if problem is not None:
            return problem
    spec = pod.get("spec")
    if type(spec) is not dict:
        return _invalid("spec must be an object")
    return _containers_problem(spec)
