"""What a pod gets from injection: containers, volumes, labels and annotations.

Pure: `build(pod, mesh, workload_name)` returns an `Injection` describing only the additions;
`injector.injection.patch` turns it into a JSON patch. Nothing here reads or copies the pod's
own containers or volumes beyond their names, so a big pod costs no more than a small one.

The containers and volumes come ready-made from `injector.injection.containers` (which reads
the override annotations through `injector.injection.overrides`); what is left here is what
depends on the rest of the pod: the names it already uses, its workload's name, and the labels
and annotations it lacks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from injector.errors import InvalidInput
from injector.injection import probes, user_containers
from injector.injection.containers import Template, template
from injector.injection.overrides import MAX_LIST_CHARS, InvalidAnnotation
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    CANONICAL_NAME_LABEL,
    CANONICAL_REVISION_LABEL,
    DEFAULT_APP_METRICS_PATH,
    DEFAULT_CONTAINER_ANNOTATION,
    DEFAULT_LOGS_CONTAINER_ANNOTATION,
    DEFAULT_REVISION,
    INIT_CONTAINER,
    PROMETHEUS_MERGE_ANNOTATION,
    PROMETHEUS_PATH_ANNOTATION,
    PROMETHEUS_PORT_ANNOTATION,
    PROMETHEUS_SCRAPE_ANNOTATION,
    PROMETHEUS_SCRAPE_TARGETS_ANNOTATION,
    PROMETHEUS_STATS_PATH,
    PROXY_CONTAINER,
    PROXY_OVERRIDES_ANNOTATION,
    REVISION_LABEL,
    STATUS_ANNOTATION,
    TLS_MODE_LABEL,
    UNPRIVILEGED_PORT_START,
    UNPRIVILEGED_PORT_SYSCTL,
    VOLUME_NAMES,
)


class NameConflict(InvalidInput):
    """The pod already uses a name the sidecar needs; injecting would make an invalid pod."""


class UnreadableField(InvalidInput):
    """A field of the pod that injection must add to is not of the shape Kubernetes gives it
    (the pod is refused as `invalid-pod`, as `injector.injection.limits` refuses others)."""


# A container or volume: a dict, or its JSON as an `orjson.Fragment` (see `build`).
Part = dict[str, Any] | orjson.Fragment


class Injection(NamedTuple):
    """The additions for one pod. `native` and `hold` say where the proxy goes.

    The containers and volumes are dicts, or `orjson.Fragment`s of their JSON when built with
    `build(..., as_json=True)` for a caller that only serialises them. A NamedTuple, not a
    frozen dataclass: one is built per admission, and a frozen dataclass sets each field
    through object.__setattr__ (ten times slower).
    """

    init_container: Part | None  # None: no istio-init (interceptionMode NONE)
    proxy_container: Part
    volumes: list[Part]
    labels: dict[str, str]
    annotations: dict[str, str]
    native: bool
    hold: bool
    # The template the containers and volumes came from (their JSON; see
    # `injector.injection.containers.template`).
    template: Template | None = None
    # Probe rewriting (SPEC 8, `injector.injection.probes`): None when nothing is rewritten.
    rewritten_probes: probes.Rewrite | None = None
    # The pod's own istio-proxy / istio-init, merged into the containers above: where they were
    # (JSON pointers, each list's last first), to be removed from there; and with metrics
    # merging, the pod's other spellings of prometheus.io/* (`prometheus.io.port`).
    removals: tuple[str, ...] = ()
    # Metrics merging: the pod's own prometheus.io/* as ISTIO_PROMETHEUS_ANNOTATIONS' JSON, for
    # the proxy's env (None: nothing to hand over).
    prometheus_env: str | None = None
    # Sysctls (name, value) to add to the pod's securityContext (a gateway's; see `_sysctls`).
    sysctls: tuple[tuple[str, str], ...] = ()


def _names(items: Any) -> set[object]:
    return {item.get("name") for item in items or () if isinstance(item, dict)}


_VOLUME_NAME_SET = frozenset(VOLUME_NAMES)


def _check_names(spec: Mapping[str, Any]) -> list[user_containers.Found]:
    """Container names are unique across containers and initContainers (which
    `injector.injection.limits` checks of the pod's own), and volume names among volumes:
    refuse a pod whose names the sidecar's would clash with. The pod's own istio-proxy (in
    either list) and istio-init (an init container) are returned, to be merged over the
    injected ones (`injector.injection.user_containers`); a pod injected already, with
    sidecar.istio.io/status, never gets here (`policy` skips it)."""
    found: list[user_containers.Found] = []
    for field in ("initContainers", "containers"):
        items = spec.get(field)
        if not items:
            continue
        for index, container in enumerate(items):
            if type(container) is not dict or not user_containers.is_sidecar_name(
                    container.get("name")):
                continue
            if container["name"] == INIT_CONTAINER and field == "containers":
                raise NameConflict(f"the pod already has a container named {INIT_CONTAINER}, "
                                   "which the sidecar needs as an init container")
            found.append(user_containers.Found(field, index, container))
    volume_names = _names(spec.get("volumes"))
    if volume_names.isdisjoint(_VOLUME_NAME_SET):
        return found  # the common case, in one set operation
    taken = sorted(name for name in VOLUME_NAMES if name in volume_names)
    if taken:
        raise NameConflict(
            f"the pod already has volumes named {', '.join(taken)}, which the sidecar needs"
        )
    return found


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


def _labels_to_add(labels: Mapping[str, Any], name: str, gateway: bool = False,
                   ) -> dict[str, str]:
    wanted = {
        TLS_MODE_LABEL: "istio",
        CANONICAL_NAME_LABEL: (
            labels.get("app.kubernetes.io/name") or labels.get("app") or _label_value(name)
        ),
        CANONICAL_REVISION_LABEL: (
            labels.get("app.kubernetes.io/version") or labels.get("version") or "latest"
        ),
    }
    if gateway:  # Istio's gateway template: a gateway takes plaintext and mTLS alike
        del wanted[TLS_MODE_LABEL]
    # The pod's own labels win: nothing it set is altered.
    return {key: str(value) for key, value in wanted.items() if key not in labels}


def _annotations_to_add(
    annotations: Mapping[str, Any],
    spec: Mapping[str, Any],
    mesh: MeshConfig,
    status: str,
) -> dict[str, str]:
    added = {STATUS_ANNOTATION: status}
    # The revision that injected the pod, as Istio's template records it (unless the pod has
    # its own: what the pod already has is never changed).
    if REVISION_LABEL not in annotations:
        added[REVISION_LABEL] = mesh.revision or DEFAULT_REVISION
    # The first container that is not the proxy, as Istio's templates pick it: a pod's own
    # istio-proxy (merged over ours) may come first, and a gateway's may be its only one.
    first = None
    for container in spec.get("containers") or ():
        name = container.get("name") if isinstance(container, dict) else None
        if name != PROXY_CONTAINER:
            first = name
            break
    if isinstance(first, str) and first:
        # The app, not the proxy, for `kubectl logs` and `exec`; as Istio, each unless set.
        if DEFAULT_LOGS_CONTAINER_ANNOTATION not in annotations:
            added[DEFAULT_LOGS_CONTAINER_ANNOTATION] = first
        if DEFAULT_CONTAINER_ANNOTATION not in annotations:
            added[DEFAULT_CONTAINER_ANNOTATION] = first
    return added


# Go's strconv.ParseBool, which Istio reads its boolean annotations with.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# Ports of the proxy that an app's metrics cannot be on, as Istio's agent reserves them: each
# is the proxy's own (scraping 15020 would scrape ourselves; 15090 is Envoy's, merged already).
_RESERVED_METRICS_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15053})


# Prometheus reads an annotation by its name with every character outside [A-Za-z0-9_] made
# `_`: `prometheus.io.scrape` and `prometheus-io/scrape` are `prometheus.io/scrape` to it, and so
# to Istio's injector.
_NOT_IN_PROMETHEUS_NAME = re.compile(r"[^A-Za-z0-9_]")
_PROMETHEUS_NAMES = {_NOT_IN_PROMETHEUS_NAME.sub("_", name): name for name in (
    PROMETHEUS_SCRAPE_ANNOTATION, PROMETHEUS_PORT_ANNOTATION, PROMETHEUS_PATH_ANNOTATION,
    PROMETHEUS_SCRAPE_TARGETS_ANNOTATION)}
# At most this many of the app's metrics endpoints (Istio sets no bound): the agent fetches
# them at once, each bounded as one (`injector.proxy.app_health`).
MAX_SCRAPE_TARGETS = 8


def _pods_prometheus(annotations: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The pod's prometheus.io/{scrape,port,path} and prometheus.istio.io/scrape-targets,
    whatever spelling Prometheus reads as them, by their canonical names; and the keys to
    remove when merging: the other spellings (Istio removes them when it writes its own, so
    that Prometheus is not left to pick one), and scrape-targets, handed over whole."""
    found: dict[str, Any] = {}
    removed: list[str] = []
    for key, value in annotations.items():
        if key.startswith("prometheus"):  # one cheap test for the many keys that are not
            name = _PROMETHEUS_NAMES.get(_NOT_IN_PROMETHEUS_NAME.sub("_", key))
            if name is not None:
                found[name] = value
                if key != name or name == PROMETHEUS_SCRAPE_TARGETS_ANNOTATION:
                    removed.append(key)
    return found, removed


def _merges_metrics(annotations: Mapping[str, Any], mesh: MeshConfig) -> bool:
    """Istio's enablePrometheusMerge: the pod's annotation, else the mesh config's key."""
    merge = annotations.get(PROMETHEUS_MERGE_ANNOTATION)
    if merge is None:
        return mesh.enable_prometheus_merge
    if merge in _GO_TRUE or merge in _GO_FALSE:
        return merge in _GO_TRUE
    raise InvalidAnnotation(PROMETHEUS_MERGE_ANNOTATION, merge, "expected true or false")


def _check_metrics_port(port: str, mesh: MeshConfig, annotation: str, value: str) -> None:
    """An app's metrics port, as Istio checks it: a port number, and not one of the proxy's."""
    number = int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else 0
    if not 0 < number < 65536:
        raise InvalidAnnotation(annotation, value, f"{port[:20]!r} is not a port number")
    if number in (mesh.agent_port, mesh.status_port, mesh.prometheus_port) or (
            number in _RESERVED_METRICS_PORTS):
        raise InvalidAnnotation(annotation, value,
                                f"{number} is a port of the proxy's, not the app's: its "
                                "metrics cannot be merged")


def _scrape_targets(text: str, mesh: MeshConfig) -> list[tuple[str, str]]:
    """prometheus.istio.io/scrape-targets, `port:path,...` (a path left out is /metrics), read
    as Istio reads it, each port checked. Where Istio would drop the whole annotation silently
    (an entry without a port) the pod is refused by name, as is a path that cannot be asked
    for (a space or a control character in it) and more than MAX_SCRAPE_TARGETS."""
    if len(text) > MAX_LIST_CHARS:
        raise InvalidAnnotation(PROMETHEUS_SCRAPE_TARGETS_ANNOTATION, text,
                                f"longer than {MAX_LIST_CHARS} characters")
    targets: list[tuple[str, str]] = []
    for entry in (entry.strip() for entry in text.split(",")):
        if not entry:
            continue
        port, _, path = entry.partition(":")
        port, path = port.strip(), path.strip() or DEFAULT_APP_METRICS_PATH
        _check_metrics_port(port, mesh, PROMETHEUS_SCRAPE_TARGETS_ANNOTATION, text)
        if not path.isprintable() or " " in path:
            raise InvalidAnnotation(PROMETHEUS_SCRAPE_TARGETS_ANNOTATION, text,
                                    f"the path of {entry[:64]!r} cannot be asked for")
        targets.append((port, path))
    if len(targets) > MAX_SCRAPE_TARGETS:
        raise InvalidAnnotation(PROMETHEUS_SCRAPE_TARGETS_ANNOTATION, text,
                                f"more than {MAX_SCRAPE_TARGETS} targets")
    return targets


def _merge_metrics(own: Mapping[str, Any], removed: list[str], mesh: MeshConfig,
                   added: dict[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """Point the pod's prometheus.io/* at the agent (as Istio does: the pod's own are
    overwritten, other spellings of them and scrape-targets removed) and return the pod's own,
    in ISTIO_PROMETHEUS_ANNOTATIONS' JSON, for the agent to scrape the app with (None when the
    pod has none), with the JSON pointers of the annotations to remove."""
    agent_port = str(mesh.agent_port)
    port = own.get(PROMETHEUS_PORT_ANNOTATION)
    if port == agent_port:
        return None, ()  # pointed at the agent already: re-injected, or its owner's choice
    for name, value in own.items():
        if type(value) is not str:
            raise InvalidAnnotation(name, value, "expected a string")
    targets_text = own.get(PROMETHEUS_SCRAPE_TARGETS_ANNOTATION)
    targets = [] if targets_text is None else _scrape_targets(targets_text, mesh)
    if port is not None and not targets:  # with targets, Istio scrapes those, not this port
        _check_metrics_port(port, mesh, PROMETHEUS_PORT_ANNOTATION, port)
    added[PROMETHEUS_SCRAPE_ANNOTATION] = "true"
    added[PROMETHEUS_PORT_ANNOTATION] = agent_port
    added[PROMETHEUS_PATH_ANNOTATION] = PROMETHEUS_STATS_PATH
    removals = tuple("/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")
                     for key in removed)  # RFC 6901 escaped
    if not own:
        return None, removals
    # Istio's PrometheusScrapeConfiguration, its fields in Go's order; with targets, the first
    # is also the port and path (for an agent that knows no targets).
    config: dict[str, Any] = {
        "scrape": own.get(PROMETHEUS_SCRAPE_ANNOTATION, ""),
        "path": targets[0][1] if targets else own.get(PROMETHEUS_PATH_ANNOTATION, ""),
        "port": targets[0][0] if targets else port or ""}
    if targets:
        config["targets"] = [{"port": target_port, "path": path}
                             for target_port, path in targets]
    elif not any(config.values()):
        return None, removals  # nothing to hand over (Istio's IsEmpty)
    return orjson.dumps(config).decode(), removals


def _prometheus(annotations: Mapping[str, Any], mesh: MeshConfig,
                added: dict[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """Metrics merging when on for this pod (see `_merge_metrics`), unless the pod says
    prometheus.io/scrape is false (it asked not to be scraped: nothing is added, as Istio);
    with merging off, Envoy's metrics on prometheus_port, unless the pod has prometheus.io/*
    of its own."""
    own, removed = _pods_prometheus(annotations)
    if _merges_metrics(annotations, mesh):
        if own.get(PROMETHEUS_SCRAPE_ANNOTATION) in _GO_FALSE:
            return None, ()
        return _merge_metrics(own, removed, mesh, added)
    own.pop(PROMETHEUS_SCRAPE_TARGETS_ANNOTATION, None)  # Istio's, for merging alone
    if not own and not any(key.startswith("prometheus.io/") for key in annotations):
        added[PROMETHEUS_SCRAPE_ANNOTATION] = "true"
        added[PROMETHEUS_PORT_ANNOTATION] = str(mesh.prometheus_port)
        added[PROMETHEUS_PATH_ANNOTATION] = PROMETHEUS_STATS_PATH
    return None, ()


def _sysctls(spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A gateway's sysctls, as Istio's gateway template gives them: ports under 1024 bindable
    by the proxy's unprivileged user. Added to the pod's own, of which none is lost (Istio's
    template replaces the pod's whole list); a pod that sets the sysctl itself keeps its value,
    as everything else it has.

    Raises UnreadableField when the pod's securityContext or its sysctls are not of
    Kubernetes' shape (an object; a list of objects with a string name)."""
    security = spec.get("securityContext")
    if security is None:
        return ((UNPRIVILEGED_PORT_SYSCTL, UNPRIVILEGED_PORT_START),)
    if type(security) is not dict:
        raise UnreadableField("spec.securityContext must be an object")
    own = security.get("sysctls")
    if own is None:
        return ((UNPRIVILEGED_PORT_SYSCTL, UNPRIVILEGED_PORT_START),)
    if type(own) is not list or not all(type(item) is dict and type(item.get("name")) is str
                                        for item in own):
        raise UnreadableField("spec.securityContext.sysctls must be a list of objects with a "
                              "name")
    if any(item["name"] == UNPRIVILEGED_PORT_SYSCTL for item in own):
        return ()
    return ((UNPRIVILEGED_PORT_SYSCTL, UNPRIVILEGED_PORT_START),)


def build(
    pod: Mapping[str, Any], mesh: MeshConfig, name: str | None = None, *, as_json: bool = False
) -> Injection:
    """The additions for `pod` under `mesh`; `name` is its workload's name when known.

    The containers and volumes are fresh dicts, or with `as_json` `orjson.Fragment`s of their
    JSON, for a caller that only serialises them (the webhook): that skips building dicts.

    Raises InvalidAnnotation for an override the pod cannot have, NameConflict when the pod
    already uses a name the sidecar needs, UnreadableField when a gateway's securityContext
    cannot take its sysctl.
    """
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    found = _check_names(spec)
    parts = template(annotations, mesh)
    if parts.user_volume_names:
        taken = sorted(parts.user_volume_names & _names(spec.get("volumes")))
        if taken:
            raise NameConflict(f"the pod already has volumes named {', '.join(taken)}, which "
                               "sidecar.istio.io/userVolume adds")
    thaw: Any = orjson.Fragment if as_json else orjson.loads
    if found:
        return _with_pods_own(pod, mesh, name, parts, found)
    added = _annotations_to_add(annotations, spec, mesh, parts.status)
    prometheus_env, prometheus_removals = _prometheus(annotations, mesh, added)
    return Injection(
        init_container=None if parts.init_container is None else thaw(parts.init_container),
        proxy_container=thaw(parts.proxy_container),
        volumes=[thaw(volume) for volume in parts.volumes],
        labels=_labels_to_add(labels, name or workload_name(pod), parts.gateway),
        annotations=added,
        native=parts.native,
        hold=parts.hold,
        template=parts,
        # Probe rewriting (SPEC 8).
        rewritten_probes=probes.rewrite(spec, annotations, mesh, native=parts.native),
        removals=prometheus_removals,
        prometheus_env=prometheus_env,
        sysctls=_sysctls(spec) if parts.gateway else (),
    )


def _with_pods_own(pod: Mapping[str, Any], mesh: MeshConfig, name: str | None, parts: Template,
                   found: list[user_containers.Found]) -> Injection:
    """The injection with the pod's own istio-proxy / istio-init merged over the injected ones
    and recorded in proxy.istio.io/overrides, as Istio does. Dicts, not JSON: each such pod's
    containers are its own (and so its patch is never taken from the cache)."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    proxy: dict[str, Any] = orjson.loads(parts.proxy_container)
    init = None if parts.init_container is None else orjson.loads(parts.init_container)
    recorded: dict[str, list[dict[str, Any]]] = {"containers": [], "initContainers": []}
    removals: dict[str, list[int]] = {"containers": [], "initContainers": []}
    for item in found:
        if item.container["name"] == PROXY_CONTAINER:
            proxy = user_containers.merge(proxy, item.container)
            where = "initContainers" if parts.native else "containers"
        elif init is not None:
            init = user_containers.merge(init, item.container)
            where = "initContainers"
        else:
            continue  # no istio-init injected (interceptionMode NONE): the pod's own stays
        recorded[where].append(user_containers.overlay(item.container))
        removals[item.field].append(item.position)
    added = _annotations_to_add(annotations, spec, mesh, parts.status)
    prometheus_env, prometheus_removals = _prometheus(annotations, mesh, added)
    added[PROXY_OVERRIDES_ANNOTATION] = orjson.dumps(
        {field: items for field, items in recorded.items() if items}).decode()
    return Injection(
        init_container=init,
        proxy_container=proxy,
        volumes=[orjson.loads(volume) for volume in parts.volumes],
        labels=_labels_to_add(metadata.get("labels") or {}, name or workload_name(pod),
                              parts.gateway),
        annotations=added,
        native=parts.native,
        hold=parts.hold,
        template=parts,
        rewritten_probes=probes.rewrite(spec, annotations, mesh, native=parts.native),
        removals=prometheus_removals + tuple(
            f"/spec/{field}/{index}" for field, indexes in removals.items()
            for index in sorted(indexes, reverse=True)),
        prometheus_env=prometheus_env,
        sysctls=_sysctls(spec) if parts.gateway else (),
    )
