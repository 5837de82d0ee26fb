"""The RFC 6902 JSON patch that adds an `Injection` to a pod.

Built straight from the additions, never by diffing whole pods: its cost does not grow with the
pod's size, and it cannot touch anything the pod already has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from injector.sidecar import Injection

Operation = dict[str, Any]


def escape(token: str) -> str:
    """An RFC 6901 reference token: `~` becomes `~0`, then `/` becomes `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


def _add_entries(
    ops: list[Operation], metadata: Mapping[str, Any], field: str, entries: Mapping[str, str]
) -> None:
    if not entries:
        return
    path = f"/metadata/{field}"
    if not isinstance(metadata.get(field), Mapping):
        ops.append({"op": "add", "path": path, "value": dict(entries)})
        return
    for key, value in entries.items():
        ops.append({"op": "add", "path": f"{path}/{escape(key)}", "value": value})


def _append(
    ops: list[Operation], spec: Mapping[str, Any], field: str, items: list[dict[str, Any]]
) -> None:
    path = f"/spec/{field}"
    if not isinstance(spec.get(field), list):
        ops.append({"op": "add", "path": path, "value": items})
        return
    ops.extend({"op": "add", "path": f"{path}/-", "value": item} for item in items)


def _prepend(
    ops: list[Operation], spec: Mapping[str, Any], field: str, items: list[dict[str, Any]]
) -> None:
    path = f"/spec/{field}"
    if not isinstance(spec.get(field), list) or not spec[field]:
        ops.append({"op": "add", "path": path, "value": items})
        return
    ops.extend({"op": "add", "path": f"{path}/{index}", "value": item}
               for index, item in enumerate(items))


def build(pod: Mapping[str, Any], injection: Injection) -> list[Operation]:
    """The patch operations; applied to `pod` they give the injected pod."""
    ops: list[Operation] = []
    metadata = pod.get("metadata")
    if not isinstance(metadata, Mapping):
        ops.append({"op": "add", "path": "/metadata", "value": {}})
        metadata = {}
    _add_entries(ops, metadata, "labels", injection.labels)
    _add_entries(ops, metadata, "annotations", injection.annotations)
    spec = pod.get("spec") or {}
    if injection.native:
        # istio-init, then the proxy, before the pod's own init containers.
        _prepend(ops, spec, "initContainers",
                 [injection.init_container, injection.proxy_container])
    else:
        # After the pod's own init containers, which keep the network before redirection.
        _append(ops, spec, "initContainers", [injection.init_container])
        if injection.hold:
            _prepend(ops, spec, "containers", [injection.proxy_container])
        else:
            _append(ops, spec, "containers", [injection.proxy_container])
    _append(ops, spec, "volumes", injection.volumes)
    return ops
