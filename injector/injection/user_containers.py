"""A pod's own `istio-proxy` or `istio-init`: merged over the injected one, as Istio does.

A pod may carry a container named like one the sidecar adds, to change it (more CPU for the
proxy, an extra mount, other args for istio-init). Istio then merges that container over the
injected one, Kubernetes' strategic-merge way, and records what the pod asked for in the
annotation `proxy.istio.io/overrides`; `image: auto` keeps the injected image. A pod already
injected (with `sidecar.istio.io/status`) is never seen here: `policy` skips it.

The merge, per field of the pod's container: a mapping (resources, securityContext, ...) is
merged key by key; the lists Kubernetes merges by a key (env by name, ports by containerPort,
volumeMounts by mountPath, volumeDevices by devicePath) are merged item by item, the pod's
items replacing ours with the same key and the others appended; any other value replaces ours,
and null removes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from injector.mesh.names import INIT_CONTAINER, PROXY_CONTAINER

AUTO_IMAGE = "auto"  # Istio's word for "the injected image"
_MERGE_KEYS = {"env": "name", "ports": "containerPort", "volumeMounts": "mountPath",
               "volumeDevices": "devicePath", "resizePolicy": "resourceName"}
# Nested mappings are merged this deep (a container's deepest, securityContext.capabilities or
# resources.claims, is three levels); deeper ones are replaced whole.
_MAX_DEPTH = 8


class Found(NamedTuple):
    """A container of the pod named like one of the sidecar's: where it is, and what it is."""

    field: str  # "containers" or "initContainers"
    position: int  # in that list
    container: dict[str, Any]


def _merged_map(base: Mapping[str, Any], overlay: Mapping[str, Any], depth: int) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
            continue
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and depth < _MAX_DEPTH:
            merged[key] = _merged_map(current, value, depth + 1)
        elif (depth == 0 and key in _MERGE_KEYS and isinstance(value, list)
              and isinstance(current, list)):
            merged[key] = _merged_list(current, value, _MERGE_KEYS[key])
        else:
            merged[key] = value
    return merged


def _merged_list(base: list[Any], overlay: list[Any], key: str) -> list[Any]:
    by_key = {item.get(key): item for item in overlay if isinstance(item, dict)}
    merged = [
        _merged_map(item, by_key.pop(item.get(key)), 1)
        if isinstance(item, dict) and item.get(key) in by_key else item
        for item in base
    ]
    return merged + [item for item in overlay
                     if not isinstance(item, dict) or item.get(key) in by_key]


def overlay(container: Mapping[str, Any]) -> dict[str, Any]:
    """What the pod's container asks to change: itself, less `image: auto`."""
    return {key: value for key, value in container.items()
            if not (key == "image" and value == AUTO_IMAGE)}


def merge(injected: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any]:
    """The injected container with the pod's own merged over it (its name kept)."""
    merged = _merged_map(injected, overlay(container), 0)
    merged["name"] = injected["name"]
    return merged


def is_sidecar_name(name: object) -> bool:
    return name in (PROXY_CONTAINER, INIT_CONTAINER)
