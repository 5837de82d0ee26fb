"""The containers and volumes a sidecar brings: istio-init, istio-proxy and their volumes.

They depend only on the mesh config and the pod's override annotations
(`injector.injection.overrides`), never on the rest of the pod; so they are built once per such
combination (`template`), kept as JSON, and every pod gets a fresh copy (or, for the webhook,
the JSON itself): no two pods ever share a dict, and no admission pays for building them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from injector.injection import overrides
from injector.injection.overrides import Overrides, Resources
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    INIT_CONTAINER,
    PROXY_CONTAINER,
    ROOT_CERT_CONFIGMAP,
    ROUTER_PROXY_TYPE,
    TOKEN_AUDIENCE,
    TOKEN_EXPIRATION_SECONDS,
    VOLUME_MOUNTS,
    VOLUME_NAMES,
)


def _resources(resources: Resources) -> dict[str, Any]:
    """Requests and limits of the quantities set; a section with none is left out."""
    requests = {name: value for name, value in (("cpu", resources.cpu),
                                                ("memory", resources.memory)) if value is not None}
    limits = {name: value for name, value in (("cpu", resources.cpu_limit),
                                              ("memory", resources.memory_limit))
              if value is not None}
    built: dict[str, Any] = {}
    if requests:
        built["requests"] = requests
    if limits:
        built["limits"] = limits
    return built


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def proxy_container(mesh: MeshConfig, settings: Overrides) -> dict[str, Any]:
    """istio-proxy: the agent, which runs Envoy with the pod's SPIFFE identity."""
    readiness = settings.readiness
    ready_probe: dict[str, Any] = {
        "httpGet": {"path": "/healthz/ready", "port": mesh.status_port, "scheme": "HTTP"},
    }
    if readiness is not None and readiness.initial_delay is not None:
        ready_probe["initialDelaySeconds"] = readiness.initial_delay
    ready_probe["periodSeconds"] = 2 if readiness is None else readiness.period
    ready_probe["timeoutSeconds"] = 3
    ready_probe["failureThreshold"] = 30 if readiness is None else readiness.failure_threshold
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": mesh.image_pull_policy,
        "command": ["injector", "agent"],
        "args": _agent_args(settings),
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
            {"name": "MTLS_MODE", "value": settings.mtls_mode},
            # The ProxyConfig's proxyMetadata, after ours, as Istio's template adds it.
            *({"name": name, "value": value} for name, value in settings.proxy_metadata),
        ],
        "resources": _resources(settings.resources),
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
            *({"name": name, "mountPath": path} for name, path in VOLUME_MOUNTS.items()),
            # userVolumeMount, after ours, as Istio's template adds them.
            *({"name": name, **mount} for name, mount in settings.user_volume_mounts),
        ],
    }
    if readiness is not None:
        container["readinessProbe"] = ready_probe
    # As Istio's (startupProbe.enabled by default): readiness waits until the proxy has started,
    # checked every second for up to 10 minutes; for a native sidecar it also holds the next
    # init containers and the app. None with status port 0: the pod asked for no probe; nor for
    # a gateway, as in Istio's gateway template (a gateway slow to get ready is not restarted).
    if readiness is not None and not settings.gateway:
        container["startupProbe"] = {**ready_probe, "periodSeconds": 1, "failureThreshold": 600}
        container["startupProbe"].pop("initialDelaySeconds", None)
    if settings.native:
        # A native sidecar is an init container that keeps running.
        container["restartPolicy"] = "Always"
    elif settings.hold and not settings.gateway:
        # (A gateway's proxy is its main container: Istio's gateway template has no hook.)
        container["lifecycle"] = {
            "postStart": {"exec": {"command": ["injector", "agent", "wait"]}}
        }
    return container


def _agent_args(settings: Overrides) -> list[str]:
    """The agent's flags: its log levels, as the pod's annotations set them (Istio's template
    passes the same three to pilot-agent: --proxyLogLevel, --proxyComponentLogLevel and
    --log_output_level)."""
    args = ["--log-level", settings.log_level]
    if settings.gateway:
        # pilot-agent's `proxy router`, as Istio's gateway template runs it.
        args += ["--proxy-type", ROUTER_PROXY_TYPE]
    if settings.component_log_level is not None:
        args += ["--component-log-level", settings.component_log_level]
    if settings.agent_log_level is not None:
        args += ["--agent-log-level", settings.agent_log_level]
    return args


def init_container(mesh: MeshConfig, settings: Overrides) -> dict[str, Any]:
    """istio-init: programs the pod's iptables to send its traffic through the proxy."""
    return {
        "name": INIT_CONTAINER,
        "image": settings.init_image,
        "imagePullPolicy": mesh.image_pull_policy,
        "command": ["injector", "iptables"],
        "args": settings.traffic.to_args(),
        "resources": _resources(settings.resources),
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


def volumes() -> list[dict[str, Any]]:
    """The volumes istio-proxy mounts (`VOLUME_MOUNTS`), in `VOLUME_NAMES` order."""
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


@dataclass(frozen=True, slots=True)
class Template:
    """The part of an injection fixed by the mesh config and the override annotations, as JSON
    (immutable: the cache can hand it to every pod, and it can key other caches)."""

    init_container: bytes | None  # None: no istio-init (interceptionMode NONE)
    proxy_container: bytes
    volumes: tuple[bytes, ...]
    user_volume_names: frozenset[str]  # userVolume's, which the pod's own must not clash with
    status: str  # the sidecar.istio.io/status annotation
    native: bool
    hold: bool
    gateway: bool = False  # the proxy is the pod's main container (no istio-init, no tlsMode)

    @property
    def size(self) -> int:
        """The bytes of its JSON: what a cache holding it is charged."""
        return (len(self.init_container or b"") + len(self.proxy_container)
                + sum(len(volume) for volume in self.volumes) + len(self.status))


def _make_template(annotations: Mapping[str, Any], mesh: MeshConfig) -> Template:
    settings = overrides.read(annotations, mesh)
    inits = [INIT_CONTAINER] if settings.capture else []
    status = {
        "initContainers": [*inits, PROXY_CONTAINER] if settings.native else inits,
        "containers": [] if settings.native else [PROXY_CONTAINER],
        "volumes": [*VOLUME_NAMES, *(name for name, _ in settings.user_volumes)],
        "revision": mesh.revision,
    }
    return Template(
        init_container=(orjson.dumps(init_container(mesh, settings)) if settings.capture
                        else None),
        proxy_container=orjson.dumps(proxy_container(mesh, settings)),
        volumes=(*(orjson.dumps(volume) for volume in volumes()),
                 *(orjson.dumps({"name": name, **volume})
                   for name, volume in settings.user_volumes)),
        user_volume_names=frozenset(name for name, _ in settings.user_volumes),
        status=orjson.dumps(status).decode(),
        native=settings.native,
        hold=settings.hold,
        gateway=settings.gateway,
    )


# The override annotations a pod carries, as (name, value) pairs in `overrides.ANNOTATIONS`
# order: all a template depends on besides the mesh config.
_Key = tuple[tuple[str, str], ...]
_Table = dict[_Key, Template]


def _key_size(key: _Key) -> int:
    return sum(len(name) + len(value) for name, value in key)


class TemplateCache:
    """Templates by mesh config, then by override annotations; bounded in bytes whatever pods
    carry: a template is kept only if it and its key (the annotation values) come to at most
    MAX_ENTRY_BYTES, and all kept come to at most MAX_BYTES (counted as the lengths of the
    keys' strings and the templates' JSON), in at most MAX_MESHES tables of MAX_PER_MESH.
    When a bound would be passed, everything is dropped and the cache fills again: simple, and
    a server's working set (a few templates) is back after as many admissions.

    A default template is about 3.5 KiB; annotations at their bounds (ProxyConfig 4 KiB, CIDR
    lists 4 KiB, ...) can make one bigger than MAX_ENTRY_BYTES: it is then built for each pod
    that has it, which costs well under a millisecond, rather than kept.

    Configs are keyed by value: a config is immutable (a frozen model), so two equal ones
    rightly share templates, and no other config can be mistaken for one (an `id()` could be,
    once the config it was taken from is collected). Hashing a config costs about a tenth of an
    admission, though, so the table last used is also kept with its config, and found by
    identity: a server has one mesh config, and hashes it for its first pod only.
    """

    MAX_MESHES = 4
    MAX_PER_MESH = 512
    MAX_ENTRY_BYTES = 16 * 1024
    MAX_BYTES = 2 * 1024 * 1024

    def __init__(self) -> None:
        self._tables: dict[MeshConfig, _Table] = {}
        # One tuple, replaced whole: a thread never sees one config with another's table. It
        # holds the config, so no other object can take its identity while it is here.
        self._last: tuple[MeshConfig, _Table] | None = None
        self.bytes = 0  # held by the entries of every table

    def get(self, key: _Key, mesh: MeshConfig) -> Template:
        last = self._last
        table = last[1] if last is not None and last[0] is mesh else self._table(mesh)
        cached = table.get(key)
        if cached is None:
            cached = _make_template(dict(key), mesh)
            size = cached.size + _key_size(key)
            if size <= self.MAX_ENTRY_BYTES:
                if len(table) >= self.MAX_PER_MESH or self.bytes + size > self.MAX_BYTES:
                    self._drop_entries()
                table[key] = cached
                self.bytes += size
        return cached

    def _drop_entries(self) -> None:
        for table in self._tables.values():
            table.clear()  # in place: `_last` may hold one of them
        self.bytes = 0

    def _table(self, mesh: MeshConfig) -> _Table:
        table = self._tables.get(mesh)
        if table is None:
            if len(self._tables) >= self.MAX_MESHES:
                self._drop_entries()
                self._tables.clear()
            table = self._tables[mesh] = {}
        self._last = (mesh, table)
        return table

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())


TEMPLATES = TemplateCache()
_OVERRIDE_SET = frozenset(overrides.ANNOTATIONS)


def template(annotations: Mapping[str, Any], mesh: MeshConfig) -> Template:
    """The template for these override annotations under `mesh`, from the cache when it can.

    Raises InvalidAnnotation (never cached) for an override the pod cannot have.
    """
    # Most pods have none of the overrides: one pass over their few annotations says so.
    key = tuple([(name, annotations[name]) for name in overrides.ANNOTATIONS
                 if name in annotations]
                if not _OVERRIDE_SET.isdisjoint(annotations) else ())
    if not all(type(value) is str for _, value in key):
        return _make_template(annotations, mesh)  # refused, with the annotation's name
    return TEMPLATES.get(key, mesh)
