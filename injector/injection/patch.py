"""The RFC 6902 JSON patch that adds an `Injection` to a pod.

Built straight from the additions, never by diffing whole pods: its cost does not grow with the
pod's size, and it cannot touch anything the pod already has.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import orjson

from injector.injection.sidecar import Injection, Part
from injector.mesh.names import APP_PROBERS_ENV, PROMETHEUS_ANNOTATIONS_ENV

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
    if not isinstance(metadata.get(field), dict):
        ops.append({"op": "add", "path": path, "value": dict(entries)})
        return
    for key, value in entries.items():
        ops.append({"op": "add", "path": f"{path}/{escape(key)}", "value": value})


def _append(
    ops: list[Operation], spec: Mapping[str, Any], field: str, items: list[Part]
) -> None:
    path = f"/spec/{field}"
    if not isinstance(spec.get(field), list):
        ops.append({"op": "add", "path": path, "value": items})
        return
    ops.extend({"op": "add", "path": f"{path}/-", "value": item} for item in items)


def _prepend(
    ops: list[Operation], spec: Mapping[str, Any], field: str, items: list[Part]
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
    if not isinstance(metadata, dict):
        ops.append({"op": "add", "path": "/metadata", "value": {}})
        metadata = {}
    _add_entries(ops, metadata, "labels", injection.labels)
    _add_entries(ops, metadata, "annotations", injection.annotations)
    spec = pod.get("spec") or {}
    rewrite = injection.rewritten_probes
    if rewrite is not None:
        # Probe rewriting (SPEC 8): the pointers index the pod's lists as they came, so these
        # replacements go before anything is inserted into them.
        ops.extend({"op": "replace", "path": path, "value": value}
                   for path, value in rewrite.replacements)
    # The pod's own istio-proxy / istio-init, merged into the injected ones: out of the lists
    # (each list's last first, so that the indexes hold) before anything is added to them.
    ops.extend({"op": "remove", "path": path} for path in injection.removals)
    # No istio-init with interceptionMode NONE.
    inits = [] if injection.init_container is None else [injection.init_container]
    if injection.native:
        # istio-init, then the proxy, before the pod's own init containers.
        _prepend(ops, spec, "initContainers", [*inits, injection.proxy_container])
    else:
        # After the pod's own init containers, which keep the network before redirection.
        if inits:
            _append(ops, spec, "initContainers", inits)
        if injection.hold:
            _prepend(ops, spec, "containers", [injection.proxy_container])
        else:
            _append(ops, spec, "containers", [injection.proxy_container])
    _append(ops, spec, "volumes", injection.volumes)
    if rewrite is not None and rewrite.probers:
        ops.append({"op": "add", "path": f"{_proxy_pointer(spec, injection)}/env/-",
                    "value": {"name": APP_PROBERS_ENV, "value": rewrite.probers}})
    if injection.prometheus_env is not None:
        # Metrics merging: where the agent scrapes the app's own metrics.
        ops.append({"op": "add", "path": f"{_proxy_pointer(spec, injection)}/env/-",
                    "value": {"name": PROMETHEUS_ANNOTATIONS_ENV,
                              "value": injection.prometheus_env}})
    if injection.sysctls:
        _add_sysctls(ops, spec, injection.sysctls)
    return ops


def _add_sysctls(ops: list[Operation], spec: Mapping[str, Any],
                 sysctls: tuple[tuple[str, str], ...]) -> None:
    """Append to the pod's securityContext.sysctls, making what is missing (`sidecar.build`
    checked the shapes, and left out what the pod has already)."""
    items = [{"name": name, "value": value} for name, value in sysctls]
    security = spec.get("securityContext")
    if not isinstance(security, dict):
        ops.append({"op": "add", "path": "/spec/securityContext", "value": {"sysctls": items}})
    elif not isinstance(security.get("sysctls"), list):
        ops.append({"op": "add", "path": "/spec/securityContext/sysctls", "value": items})
    else:
        ops.extend({"op": "add", "path": "/spec/securityContext/sysctls/-", "value": item}
                   for item in items)


def _proxy_pointer(spec: Mapping[str, Any], injection: Injection) -> str:
    """Where `build` put istio-proxy (for probe rewriting's env, added to it afterwards)."""
    if injection.native:  # after istio-init, when there is one
        return f"/spec/initContainers/{0 if injection.init_container is None else 1}"
    if injection.hold:
        return "/spec/containers/0"
    containers = spec.get("containers")
    removed = sum(path.startswith("/spec/containers/") for path in injection.removals)
    return f"/spec/containers/{len(containers) - removed if isinstance(containers, list) else 0}"


def _shape(pod: Mapping[str, Any]) -> tuple[Any, ...]:
    """What `build` reads of the pod, besides the injection: which fields exist. (Pods are
    decoded JSON or YAML: their objects are dicts, cheaper to check for than Mapping.)"""
    metadata = pod.get("metadata")
    if isinstance(metadata, dict):
        meta = (isinstance(metadata.get("labels"), dict),
                isinstance(metadata.get("annotations"), dict))
    else:
        meta = None
    spec = pod.get("spec") or {}
    init, containers, volumes = (spec.get("initContainers"), spec.get("containers"),
                                 spec.get("volumes"))
    return (meta, isinstance(init, list) and bool(init), isinstance(init, list),
            isinstance(containers, list) and bool(containers), isinstance(containers, list),
            isinstance(volumes, list))


class PatchCache:
    """Encoded patches by everything `build` reads (see `encoded`), bounded in bytes: a patch
    is kept only if it, its template and the labels and annotations it adds come to at most
    MAX_ENTRY_BYTES, and all kept to at most MAX_BYTES (counted as string and JSON lengths; a
    template shared by several entries is charged to each), and at most MAX_ENTRIES. When a
    bound would be passed everything is dropped, and the working set (one patch per kind of
    pod) is back after as many admissions. A default patch is about 8 KiB with its template.
    """

    MAX_ENTRIES = 1024
    MAX_ENTRY_BYTES = 32 * 1024
    MAX_BYTES = 4 * 1024 * 1024

    def __init__(self) -> None:
        # Read directly by `encoded` (`entries.get`: a method call less per admission).
        self.entries: dict[tuple[Any, ...], str] = {}
        self.bytes = 0

    def put(self, key: tuple[Any, ...], template_size: int, added: int, patch: str) -> None:
        size = len(patch) + template_size + added
        if size > self.MAX_ENTRY_BYTES:
            return
        if len(self.entries) >= self.MAX_ENTRIES or self.bytes + size > self.MAX_BYTES:
            self.entries.clear()
            self.bytes = 0
        self.entries[key] = patch
        self.bytes += size

    def __len__(self) -> int:
        return len(self.entries)


PATCHES = PatchCache()


def _strings_size(entries: tuple[tuple[str, str], ...]) -> int:
    return sum(len(key) + len(value) for key, value in entries)


def encoded(pod: Mapping[str, Any], injection: Injection) -> str:
    """`build`'s patch as base64 of its JSON, as an AdmissionReview carries it.

    For an injection in JSON form (`sidecar.build(..., as_json=True)`) the answer is cached
    (`PATCHES`) by everything `build` reads: the pod's shape, the labels and annotations to
    add, the probe rewriting (`injector.injection.probes`), and the template the containers,
    volumes, `native` and `hold` came from. The pods of one ReplicaSet all get the same patch:
    it is built once.
    """
    # Dicts may have been changed since the template made them; Fragments cannot be.
    # Removals (rare: a prometheus.io annotation spelled otherwise) and a gateway's sysctls
    # (which depend on the pod's securityContext) are not in the key: no cache.
    if (injection.template is None or type(injection.proxy_container) is not orjson.Fragment
            or injection.removals or injection.sysctls):
        return base64.b64encode(orjson.dumps(build(pod, injection))).decode()
    labels, annotations = tuple(injection.labels.items()), tuple(injection.annotations.items())
    # Probe rewriting's replacements and env, whole: two pods share a patch only if they are
    # rewritten alike (None, for the many pods without probes, costs nothing).
    # (Where the env goes depends on how many containers the pod has, which `_shape` omits.)
    rewrite = injection.rewritten_probes
    rewrite_key = None if rewrite is None else rewrite.key
    # The merged metrics' env likewise (None for a pod without prometheus.io/* of its own).
    prometheus_env = injection.prometheus_env
    key = (_shape(pod), injection.template, labels, annotations,
           None if rewrite is None else (rewrite_key, _proxy_pointer(pod.get("spec") or {},
                                                                     injection)),
           None if prometheus_env is None else (prometheus_env,
                                                _proxy_pointer(pod.get("spec") or {},
                                                               injection)))
    cached = PATCHES.entries.get(key)
    if cached is None:
        cached = base64.b64encode(orjson.dumps(build(pod, injection))).decode()
        PATCHES.put(key, injection.template.size,
                    _strings_size(labels) + _strings_size(annotations)
                    + (len(rewrite_key) if rewrite_key is not None else 0)
                    + (len(prometheus_env) if prometheus_env is not None else 0), cached)
    return cached
