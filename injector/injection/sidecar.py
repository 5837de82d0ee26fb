"""What injection adds to a pod: containers, volumes, labels and annotations.

Pure: `build(pod, mesh, workload_name)` returns an `Injection` describing only the additions;
`injector.patch` turns it into a JSON patch. Nothing here reads or copies the pod's own
containers or volumes beyond their names, so a big pod costs no more than a small one.

The containers and volumes depend only on the mesh config and the pod's override annotations
(`OVERRIDES`): they are built once per such combination (`template`), kept as JSON, and handed
out as fresh dicts (or, to the webhook, as the JSON itself), so no two pods ever share a dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import yaml

from injector.errors import InvalidInput
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    CANONICAL_NAME_LABEL,
    CANONICAL_REVISION_LABEL,
    DEFAULT_CONTAINER_ANNOTATION,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_IP_RANGES,
    INIT_CONTAINER,
    LOG_LEVEL,
    LOG_LEVELS,
    MTLS_MODE,
    MTLS_MODES,
    NATIVE_SIDECAR,
    PROXY_CONFIG,
    PROXY_CONTAINER,
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_IMAGE,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    ROOT_CERT_CONFIGMAP,
    STATUS_ANNOTATION,
    TLS_MODE_LABEL,
    TOKEN_AUDIENCE,
    TOKEN_EXPIRATION_SECONDS,
    VOLUME_MOUNTS,
    VOLUME_NAMES,
)
from injector.mesh.network import parse_cidr_set, parse_cidrs, parse_port_set, parse_ports
from injector.mesh.quantity import parse_quantity
from injector.traffic.iptables import TrafficOptions


class InvalidAnnotation(InvalidInput):
    """A pod annotation that cannot be honoured; the pod is refused rather than injected wrong."""

    def __init__(self, annotation: str, value: object, problem: str) -> None:
        super().__init__(f"annotation {annotation}={value!r}: {problem}")
        self.annotation = annotation


class NameConflict(InvalidInput):
    """The pod already uses a name the sidecar needs; injecting would make an invalid pod."""


class Injection(NamedTuple):
    """The additions for one pod. `native` and `hold` say where the proxy goes.

    The containers and volumes are dicts, or `orjson.Fragment`s of their JSON when built with
    `build(..., as_json=True)` for a caller that only serialises them. A NamedTuple, not a
    frozen dataclass: one is built per admission, and a frozen dataclass sets each field
    through object.__setattr__ (ten times slower).
    """

    init_container: dict[str, Any]
    proxy_container: dict[str, Any]
    volumes: list[dict[str, Any]]
    labels: dict[str, str]
    annotations: dict[str, str]
    native: bool
    hold: bool
    # The template the containers and volumes came from (their JSON; see `template`).
    template: Template | None = None


def _annotation(annotations: Mapping[str, Any], key: str, default: str) -> str:
    value = annotations.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidAnnotation(key, value, "must be a string")
    return value


def _checked(annotations: Mapping[str, Any], key: str, default: str, parse: Any) -> str:
    """The annotation (or default) after `parse` accepted it; the failure names the annotation."""
    value = _annotation(annotations, key, default)
    try:
        parse(value)
    except ValueError as error:
        raise InvalidAnnotation(key, value, str(error)) from None
    return value


def _quantity(annotations: Mapping[str, Any], key: str, default: str) -> str:
    return _checked(annotations, key, default, parse_quantity).strip()


def _boolean(annotations: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _annotation(annotations, key, "true" if default else "false").strip().lower()
    if value not in ("true", "false"):
        raise InvalidAnnotation(key, value, 'expected "true" or "false"')
    return value == "true"


def _hold_application(annotations: Mapping[str, Any]) -> bool:
    """`holdApplicationUntilProxyStarts` from the `proxy.istio.io/config` annotation (YAML)."""
    text = annotations.get(PROXY_CONFIG)
    if text is None:
        return False
    if not isinstance(text, str):
        raise InvalidAnnotation(PROXY_CONFIG, text, "must be a string")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InvalidAnnotation(PROXY_CONFIG, text, "not valid YAML") from None
    if config is None:
        return False
    if not isinstance(config, dict):
        raise InvalidAnnotation(PROXY_CONFIG, text, "expected a mapping")
    hold = config.get("holdApplicationUntilProxyStarts", False)
    if not isinstance(hold, bool):
        raise InvalidAnnotation(
            PROXY_CONFIG, text, "holdApplicationUntilProxyStarts must be true or false"
        )
    return hold


def traffic_options(annotations: Mapping[str, Any], mesh: MeshConfig) -> TrafficOptions:
    """The init container's redirection options: mesh config, overridden by annotations."""
    default = TrafficOptions()

    def parsed(key: str, mesh_value: str, parse: Any) -> Any:
        value = _annotation(annotations, key, mesh_value)
        try:
            return parse(value)
        except ValueError as error:
            raise InvalidAnnotation(key, value, str(error)) from None

    # The proxy's own ports are always excluded; an annotation adds to them, as in Istio.
    excluded_inbound = parsed(EXCLUDE_INBOUND_PORTS, mesh.exclude_inbound_ports, parse_ports)
    always_excluded = (mesh.prometheus_port, mesh.status_port, mesh.agent_port)
    return TrafficOptions(
        proxy_port=mesh.proxy_port,
        inbound_capture_port=mesh.inbound_capture_port,
        proxy_uid=mesh.proxy_uid,
        proxy_gid=mesh.proxy_gid,
        mode=default.mode,
        include_outbound_cidrs=parsed(
            INCLUDE_OUTBOUND_IP_RANGES, mesh.include_outbound_ip_ranges, parse_cidr_set
        ),
        exclude_outbound_cidrs=parsed(
            EXCLUDE_OUTBOUND_IP_RANGES, mesh.exclude_outbound_ip_ranges, parse_cidrs
        ),
        include_inbound_ports=parsed(
            INCLUDE_INBOUND_PORTS, mesh.include_inbound_ports, parse_port_set
        ),
        exclude_inbound_ports=tuple(dict.fromkeys((*always_excluded, *excluded_inbound))),
        exclude_outbound_ports=parsed(
            EXCLUDE_OUTBOUND_PORTS, mesh.exclude_outbound_ports, parse_ports
        ),
    )


def _resources(annotations: Mapping[str, Any], mesh: MeshConfig) -> dict[str, Any]:
    defaults = mesh.resources
    cpu = _quantity(annotations, PROXY_CPU, defaults.cpu)
    memory = _quantity(annotations, PROXY_MEMORY, defaults.memory)
    cpu_limit = _quantity(annotations, PROXY_CPU_LIMIT, defaults.cpu_limit)
    memory_limit = _quantity(annotations, PROXY_MEMORY_LIMIT, defaults.memory_limit)
    # Kubernetes refuses a request above its limit; say which annotation to fix instead.
    for request_key, request, limit_key, limit in (
        (PROXY_CPU, cpu, PROXY_CPU_LIMIT, cpu_limit),
        (PROXY_MEMORY, memory, PROXY_MEMORY_LIMIT, memory_limit),
    ):
        if parse_quantity(request) > parse_quantity(limit):
            raise InvalidAnnotation(
                request_key if request_key in annotations else limit_key,
                annotations.get(request_key, annotations.get(limit_key)),
                f"the request {request} exceeds the limit {limit}",
            )
    return {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu_limit, "memory": memory_limit},
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _proxy_container(
    annotations: Mapping[str, Any],
    mesh: MeshConfig,
    resources: dict[str, Any],
    native: bool,
    hold: bool,
) -> dict[str, Any]:
    image = _annotation(annotations, PROXY_IMAGE, mesh.proxy_image).strip()
    if not image:
        raise InvalidAnnotation(PROXY_IMAGE, image, "must not be empty")
    log_level = _annotation(annotations, LOG_LEVEL, mesh.proxy_log_level)
    if log_level not in LOG_LEVELS:
        raise InvalidAnnotation(LOG_LEVEL, log_level, f"expected one of {sorted(LOG_LEVELS)}")
    mtls_mode = _annotation(annotations, MTLS_MODE, mesh.mtls_mode)
    if mtls_mode not in MTLS_MODES:
        raise InvalidAnnotation(MTLS_MODE, mtls_mode, "expected PERMISSIVE or STRICT")
    ready_probe = {
        "httpGet": {"path": "/healthz/ready", "port": mesh.status_port, "scheme": "HTTP"},
        "periodSeconds": 2,
        "timeoutSeconds": 3,
        "failureThreshold": 30,
    }
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": image,
        "imagePullPolicy": mesh.image_pull_policy,
        "command": ["injector", "agent"],
        "args": ["--log-level", log_level],
        "ports": [
            {"name": "http-envoy-prom", "containerPort": mesh.prometheus_port, "protocol": "TCP"}
        ],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("INSTANCE_IP", "status.podIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "CA_ADDR", "value": mesh.ca_address},
            {"name": "TRUST_DOMAIN", "value": mesh.trust_domain},
            {"name": "MESH_CIDRS", "value": ",".join(mesh.mesh_cidrs)},
            {"name": "MTLS_MODE", "value": mtls_mode},
        ],
        "resources": resources,
        "readinessProbe": ready_probe,
        "securityContext": {
            "runAsUser": mesh.proxy_uid,
            "runAsGroup": mesh.proxy_gid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": name, "mountPath": path} for name, path in VOLUME_MOUNTS.items()
        ],
    }
    if native:
        # A native sidecar is an init container that keeps running; the startup probe holds
        # the next init containers and the app until the proxy is ready.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {**ready_probe, "periodSeconds": 1, "failureThreshold": 600}
    elif hold:
        container["lifecycle"] = {
            "postStart": {"exec": {"command": ["injector", "agent", "wait"]}}
        }
    return container


def _init_container(
    annotations: Mapping[str, Any], mesh: MeshConfig, resources: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": INIT_CONTAINER,
        "image": mesh.init_image or mesh.proxy_image,
        "imagePullPolicy": mesh.image_pull_policy,
        "command": ["injector", "iptables"],
        "args": traffic_options(annotations, mesh).to_args(),
        "resources": resources,
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _volumes() -> list[dict[str, Any]]:
    return [
        {"name": "workload-certs", "emptyDir": {"medium": "Memory"}},
        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
        {"name": "istio-data", "emptyDir": {}},
        {
            "name": "istio-podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                ]
            },
        },
        {
            "name": "istio-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                            "path": "istio-token",
                        }
                    }
                ]
            },
        },
        {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
    ]


def _names(items: Any) -> set[str]:
    return {item.get("name") for item in items or () if isinstance(item, dict)}


def _check_names(spec: Mapping[str, Any]) -> None:
    init_names = _names(spec.get("initContainers"))
    if INIT_CONTAINER in init_names:
        raise NameConflict(f"the pod already has an init container named {INIT_CONTAINER}")
    taken = sorted(_names(spec.get("volumes")).intersection(VOLUME_NAMES))
    if taken:
        raise NameConflict(
            f"the pod already has volumes named {', '.join(taken)}, which the sidecar needs"
        )


def workload_name(pod: Mapping[str, Any]) -> str:
    """The name of what runs the pod: the Deployment for a ReplicaSet's pod, else the owner,
    else the pod's own name (or its generateName prefix)."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    owners = metadata.get("ownerReferences")
    for owner in owners if isinstance(owners, list) else ():
        if not isinstance(owner, dict) or not owner.get("controller"):
            continue
        name = owner.get("name")
        name = name if isinstance(name, str) else ""
        template_hash = labels.get("pod-template-hash")
        if owner.get("kind") == "ReplicaSet" and template_hash and name.endswith(
            "-" + template_hash
        ):
            return name[: -len(template_hash) - 1]
        if name:
            return name
    for key in ("name", "generateName"):
        name = metadata.get(key)
        if isinstance(name, str) and name.rstrip("-"):
            return name.rstrip("-")
    return "unknown"


def _label_value(text: str) -> str:
    """A label value Kubernetes accepts: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both
    ends (a name from a malformed object may hold anything)."""
    return _NOT_IN_LABEL_VALUE.sub("-", text)[:63].strip("-_.") or "unknown"


_NOT_IN_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]")


def _labels_to_add(labels: Mapping[str, Any], name: str) -> dict[str, str]:
    wanted = {
        TLS_MODE_LABEL: "istio",
        CANONICAL_NAME_LABEL: (
            labels.get("app.kubernetes.io/name") or labels.get("app") or _label_value(name)
        ),
        CANONICAL_REVISION_LABEL: (
            labels.get("app.kubernetes.io/version") or labels.get("version") or "latest"
        ),
    }
    # The pod's own labels win: nothing it set is altered.
    return {key: str(value) for key, value in wanted.items() if key not in labels}


def _annotations_to_add(
    annotations: Mapping[str, Any],
    spec: Mapping[str, Any],
    mesh: MeshConfig,
    status: str,
) -> dict[str, str]:
    added = {STATUS_ANNOTATION: status}
    containers = spec.get("containers") or ()
    if DEFAULT_CONTAINER_ANNOTATION not in annotations and containers:
        first = containers[0].get("name") if isinstance(containers[0], dict) else None
        if isinstance(first, str) and first:
            added[DEFAULT_CONTAINER_ANNOTATION] = first
    if not any(key.startswith("prometheus.io/") for key in annotations):
        added["prometheus.io/scrape"] = "true"
        added["prometheus.io/port"] = str(mesh.prometheus_port)
        added["prometheus.io/path"] = "/stats/prometheus"
    return added


# Every annotation the containers and volumes depend on; nothing else of the pod changes them.
OVERRIDES: tuple[str, ...] = (
    PROXY_IMAGE, PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT, LOG_LEVEL,
    MTLS_MODE, NATIVE_SIDECAR, PROXY_CONFIG, INCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_IP_RANGES, INCLUDE_INBOUND_PORTS, EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
)


@dataclass(frozen=True, slots=True)
class Template:
    """The part of an injection fixed by the mesh config and the override annotations, as JSON
    (immutable: the cache can hand it to every pod)."""

    init_container: bytes
    proxy_container: bytes
    volumes: tuple[bytes, ...]
    status: str  # the sidecar.istio.io/status annotation
    native: bool
    hold: bool


def _make_template(annotations: Mapping[str, Any], mesh: MeshConfig) -> Template:
    native = _boolean(annotations, NATIVE_SIDECAR, mesh.native_sidecars)
    hold = _hold_application(annotations)
    resources = _resources(annotations, mesh)
    injected_init = [INIT_CONTAINER, PROXY_CONTAINER] if native else [INIT_CONTAINER]
    status = {
        "initContainers": injected_init,
        "containers": [] if native else [PROXY_CONTAINER],
        "volumes": list(VOLUME_NAMES),
        "revision": mesh.revision,
    }
    return Template(
        init_container=orjson.dumps(_init_container(annotations, mesh, resources)),
        proxy_container=orjson.dumps(
            _proxy_container(annotations, mesh, resources, native, hold)),
        volumes=tuple(orjson.dumps(volume) for volume in _volumes()),
        status=orjson.dumps(status).decode(),
        native=native,
        hold=hold,
    )


_OVERRIDE_SET = frozenset(OVERRIDES)
_TEMPLATES: dict[tuple[int, tuple[Any, ...]], tuple[MeshConfig, Template]] = {}
_MAX_TEMPLATES = 512


def template(annotations: Mapping[str, Any], mesh: MeshConfig) -> Template:
    """The template for these override annotations under `mesh`, from the cache when it can.

    Raises InvalidAnnotation (never cached) for an override the pod cannot have.
    """
    # Most pods have none of the overrides: one pass over their few annotations says so.
    key = tuple([(name, annotations[name]) for name in OVERRIDES if name in annotations]
                if not _OVERRIDE_SET.isdisjoint(annotations) else ())
    if not all(type(value) is str for _, value in key):
        return _make_template(annotations, mesh)  # refused below, with the annotation's name
    # Keyed by the mesh's identity (hashing a config model costs more than a lookup); the
    # entry holds the mesh, so its id cannot be reused while the entry exists.
    cached = _TEMPLATES.get((id(mesh), key))
    if cached is not None and cached[0] is mesh:
        return cached[1]
    made = _make_template(dict(key), mesh)
    if len(_TEMPLATES) >= _MAX_TEMPLATES:
        _TEMPLATES.clear()  # a bound on memory, whatever annotation values pods carry
    _TEMPLATES[(id(mesh), key)] = (mesh, made)
    return made


def build(
    pod: Mapping[str, Any], mesh: MeshConfig, name: str | None = None, *, as_json: bool = False
) -> Injection:
    """The additions for `pod` under `mesh`; `name` is its workload's name when known.

    The containers and volumes are fresh dicts, or with `as_json` `orjson.Fragment`s of their
    JSON, for a caller that only serialises them (the webhook): that skips building dicts.

    Raises InvalidAnnotation for an override the pod cannot have, NameConflict when the pod
    already uses a name the sidecar needs.
    """
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    _check_names(spec)
    parts = template(annotations, mesh)
    thaw: Any = orjson.Fragment if as_json else orjson.loads
    return Injection(
        init_container=thaw(parts.init_container),
        proxy_container=thaw(parts.proxy_container),
        volumes=[thaw(volume) for volume in parts.volumes],
        labels=_labels_to_add(labels, name or workload_name(pod)),
        annotations=_annotations_to_add(annotations, spec, mesh, parts.status),
        native=parts.native,
        hold=parts.hold,
        template=parts,
    )
