"""A pod's override annotations, read and checked into one typed value.

Istio lets a pod change parts of its sidecar with annotations (`sidecar.istio.io/proxyCPU`,
`traffic.sidecar.istio.io/excludeOutboundIPRanges`, ...). They arrive as free text from whoever
wrote the pod, so each is checked here, once, and a bad one refuses the pod naming the
annotation (`InvalidAnnotation`) instead of producing a pod Kubernetes or the proxy rejects
later. What comes out (`Overrides`) is what the container specs are built from
(`injector.injection.containers`), with the mesh config's value wherever the pod says nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from injector.errors import InvalidInput
from injector.injection import proxyconfig
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    AGENT_LOG_LEVEL,
    AGENT_LOG_LEVELS,
    COMPONENT_LOG_LEVEL,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_INTERFACES,
    EXCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_PORTS,
    IMAGE_TYPE_DEFAULT,
    INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_PORTS,
    INTERCEPTION_MODE,
    INTERCEPTION_NONE,
    KNOWN_IMAGE_TYPES,
    KUBEVIRT_INTERFACES,
    LOG_LEVEL,
    LOG_LEVELS,
    MTLS_MODE,
    MTLS_MODES,
    NATIVE_SIDECAR,
    PROXY_CONFIG,
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_IMAGE,
    PROXY_IMAGE_TYPE,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    READINESS_APPLICATION_PORTS,
    READINESS_FAILURE_THRESHOLD,
    READINESS_INITIAL_DELAY,
    READINESS_PERIOD,
    REROUTE_VIRTUAL_INTERFACES,
    STATUS_PORT_ANNOTATION,
    TEMPLATES,
    TEMPLATES_ANNOTATION,
    USER_VOLUME,
    USER_VOLUME_MOUNT,
    VOLUME_NAMES,
)
from injector.mesh.network import (
    parse_interfaces,
    parse_port,
    parse_port_set,
    parse_ports,
    parse_written_cidr_set,
    parse_written_cidrs,
)
from injector.mesh.quantity import parse_quantity
from injector.traffic.iptables import TrafficOptions, parse_mode

# Every annotation read here: nothing else of a pod changes its sidecar's containers or volumes
# (so they are all the template cache needs to key on).
ANNOTATIONS: tuple[str, ...] = (
    PROXY_IMAGE, PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT, LOG_LEVEL,
    MTLS_MODE, NATIVE_SIDECAR, PROXY_CONFIG, INCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_IP_RANGES, INCLUDE_INBOUND_PORTS, EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS, INCLUDE_OUTBOUND_PORTS, EXCLUDE_INTERFACES, KUBEVIRT_INTERFACES,
    REROUTE_VIRTUAL_INTERFACES, INTERCEPTION_MODE, STATUS_PORT_ANNOTATION,
    READINESS_INITIAL_DELAY, READINESS_PERIOD, READINESS_FAILURE_THRESHOLD,
    READINESS_APPLICATION_PORTS, USER_VOLUME, USER_VOLUME_MOUNT, PROXY_IMAGE_TYPE,
    COMPONENT_LOG_LEVEL, AGENT_LOG_LEVEL, TEMPLATES_ANNOTATION,
)

_Parsed = TypeVar("_Parsed")

# Bounds on what one annotation may hold, checked before it is parsed, so that no pod makes an
# admission slow (each is read on the webhook's event loop): a pod with every override at its
# bound, none of it cached, is admitted in about 0.8 ms (bench/bench_fuzz.py); with 64 CIDRs
# and 128 ports a list it took 2 ms. Kubernetes bounds them only as a whole (256 KiB of
# annotations). The ProxyConfig's bounds are in
# `injector.injection.proxyconfig`; a quantity's in `injector.mesh.quantity`.
MAX_IMAGE_CHARS = 1024  # an image reference: registry, repository, tag and digest
MAX_LIST_CHARS = 4096  # a CIDR or port list
MAX_CIDRS = 32
MAX_PORTS = 64
MAX_INTERFACES = 32
MAX_USER_VOLUMES_CHARS = 4096  # each of userVolume and userVolumeMount, as JSON
MAX_USER_VOLUMES = 16


class InvalidAnnotation(InvalidInput):
    """A pod annotation that cannot be honoured; the pod is refused rather than injected wrong."""

    def __init__(self, annotation: str, value: object, problem: str) -> None:
        super().__init__(f"annotation {annotation}={_shown(value)}: {problem}")
        self.annotation = annotation


def _shown(value: object) -> str:
    """The value for a message: short (the pod's author may have sent 256 KiB), and never
    the repr of a structure (which recurses, and may be deep)."""
    if not isinstance(value, str):
        return f"(a {type(value).__name__})"
    if len(value) <= 80:
        return repr(value)
    return f"{value[:60]!r}... ({len(value)} characters)"


@dataclass(frozen=True, slots=True)
class Resources:
    """The proxy's (and istio-init's) requests and limits, as the Kubernetes quantities given.

    None is a quantity the pod does not get: as in Istio, once a pod sets any of the four
    resource annotations, it gets the ones it set and none of the mesh config's defaults (so
    `proxyCPU: "4"` is not held to the default 2000m limit; Kubernetes takes a missing request
    to be the limit).
    """

    cpu: str | None
    memory: str | None
    cpu_limit: str | None
    memory_limit: str | None


@dataclass(frozen=True, slots=True)
class Readiness:
    """istio-proxy's readiness probe, as `readiness.status.sidecar.istio.io/*` leave it."""

    initial_delay: int | None  # None: Kubernetes' default (0)
    period: int
    failure_threshold: int


@dataclass(frozen=True, slots=True)
class Overrides:
    """The mesh config's sidecar settings as one pod's annotations leave them, all checked."""

    image: str
    init_image: str  # istio-init's: the mesh's, or a proxyImage naming a repository (Istio's)
    log_level: str
    # componentLogLevel (Envoy's `--component-log-level`) and agentLogLevel (pilot-agent's
    # scoped levels), as written less spaces; None: not set, and the agent keeps its defaults.
    component_log_level: str | None
    agent_log_level: str | None
    mtls_mode: str
    resources: Resources
    native: bool  # the proxy runs as a native sidecar (a restartable init container)
    hold: bool  # the proxy goes first and the app waits for it (a gateway: first, no wait)
    proxy_metadata: tuple[tuple[str, str], ...]  # ProxyConfig's proxyMetadata: the proxy's env
    # userVolume and userVolumeMount: (name, the rest of the volume or mount), in name order.
    user_volumes: tuple[tuple[str, dict[str, Any]], ...]
    user_volume_mounts: tuple[tuple[str, dict[str, Any]], ...]
    traffic: TrafficOptions  # istio-init's redirection
    capture: bool  # istio-init is added at all (not with interceptionMode NONE)
    readiness: Readiness | None  # None: no readiness probe (status port 0)
    gateway: bool  # inject.istio.io/templates: gateway, the proxy as the pod's main container


def _annotation(annotations: Mapping[str, Any], key: str, default: str) -> str:
    value = annotations.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidAnnotation(key, value, "must be a string")
    return value


def _parsed(
    annotations: Mapping[str, Any], key: str, default: str, parse: Callable[[str], _Parsed]
) -> _Parsed:
    """The annotation (or default) through `parse`; the failure names the annotation."""
    value = _annotation(annotations, key, default)
    try:
        return parse(value)
    except ValueError as error:
        raise InvalidAnnotation(key, value, str(error)) from None


def _list(annotations: Mapping[str, Any], key: str, default: str, parse: Callable[[str], _Parsed],
          max_items: int) -> _Parsed:
    """A CIDR or port list, refused unread past MAX_LIST_CHARS characters or `max_items`
    entries (the mesh config's default is the operator's, and not bounded here)."""
    value = annotations.get(key)
    if isinstance(value, str):
        if len(value) > MAX_LIST_CHARS:
            raise InvalidAnnotation(key, value, f"longer than {MAX_LIST_CHARS} characters")
        if value.count(",") >= max_items:
            raise InvalidAnnotation(key, value, f"more than {max_items} entries")
    return _parsed(annotations, key, default, parse)


def _quantity(annotations: Mapping[str, Any], key: str, default: str) -> str:
    value = _annotation(annotations, key, default)
    try:
        parse_quantity(value)
    except ValueError as error:
        raise InvalidAnnotation(key, value, str(error)) from None
    # Kept as written (less the spaces): the pod shows the quantity its author chose.
    return value.strip()


def _boolean(annotations: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _annotation(annotations, key, "true" if default else "false").strip().lower()
    if value not in ("true", "false"):
        raise InvalidAnnotation(key, value, 'expected "true" or "false"')
    return value == "true"


def _proxy_config(annotations: Mapping[str, Any]) -> dict[str, Any]:
    """The `proxy.istio.io/config` annotation (YAML) as Istio's ProxyConfig, every field
    checked (`injector.injection.proxyconfig.check`)."""
    text = annotations.get(PROXY_CONFIG)
    if text is None:
        return {}
    if not isinstance(text, str):
        raise InvalidAnnotation(PROXY_CONFIG, text, "must be a string")
    try:
        config = proxyconfig.parse(text)
    except proxyconfig.ProxyConfigError as error:
        raise InvalidAnnotation(PROXY_CONFIG, text, f"not read as YAML: {error}") from None
    try:
        return proxyconfig.check(config)
    except proxyconfig.ProxyConfigError as error:
        raise InvalidAnnotation(PROXY_CONFIG, text, str(error)) from None


# An environment variable's name as Kubernetes has always taken it (C_IDENTIFIER, and `-`, `.`).
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def _proxy_metadata(config: Mapping[str, Any], text: object) -> tuple[tuple[str, str], ...]:
    """`proxyMetadata`: env of the proxy, as Istio's template adds it, in name order."""
    metadata: dict[str, str] = config.get("proxyMetadata") or {}
    for name in metadata:
        if not _ENV_NAME.fullmatch(name) or len(name) > 256:
            raise InvalidAnnotation(PROXY_CONFIG, text,
                                    f"proxyMetadata: {name[:64]!r} is not an environment "
                                    "variable's name")
    return tuple(sorted(metadata.items()))


# A volume's name: a DNS label, as Kubernetes wants it.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _user_volumes(annotations: Mapping[str, Any], key: str,
                  ) -> tuple[tuple[str, dict[str, Any]], ...]:
    """A JSON object of volume name to a volume (or, for the mount, volumeMount) without its
    name, as Istio's template reads `userVolume` and `userVolumeMount`; in name order."""
    text = annotations.get(key)
    if text is None:
        return ()
    if not isinstance(text, str):
        raise InvalidAnnotation(key, text, "must be a string")
    if len(text) > MAX_USER_VOLUMES_CHARS:
        raise InvalidAnnotation(key, text, f"longer than {MAX_USER_VOLUMES_CHARS} characters")
    try:
        # Bounded above; orjson caps nesting at 1024 levels without recursion in Python.
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidAnnotation(key, text, f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidAnnotation(key, text, "expected a JSON object of volume names")
    if len(value) > MAX_USER_VOLUMES:
        raise InvalidAnnotation(key, text, f"more than {MAX_USER_VOLUMES} volumes")
    for name, item in value.items():
        if not _DNS_LABEL.fullmatch(name):
            raise InvalidAnnotation(key, text, f"{name[:64]!r} is not a volume name (a DNS "
                                               "label: a-z, 0-9 and -, at most 63)")
        if not isinstance(item, dict) or "name" in item:
            raise InvalidAnnotation(key, text, f"{name}: expected a JSON object without "
                                               "\"name\" (the key is the name)")
        if key == USER_VOLUME and name in VOLUME_NAMES:
            raise InvalidAnnotation(key, text, f"{name}: the sidecar's own volume")
        if key == USER_VOLUME_MOUNT and not (isinstance(item.get("mountPath"), str)
                                             and item["mountPath"].startswith("/")):
            raise InvalidAnnotation(key, text, f"{name}: mountPath must be an absolute path")
    return tuple(sorted(value.items()))


_IMAGE_TYPE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _with_image_type(image: str, image_type: str) -> str:
    """`image` with Istio's image variant on its tag (`:1.2` and `distroless` give
    `:1.2-distroless`; a known variant already there is replaced; `default` leaves none)."""
    if "@" in image:
        raise ValueError(f"the image {image!r} is pinned by digest: no variant of it")
    slash = image.rfind("/")
    colon = image.rfind(":")
    name, tag = (image[:colon], image[colon + 1:]) if colon > slash else (image, "latest")
    for known in KNOWN_IMAGE_TYPES:
        if tag.endswith("-" + known):
            tag = tag[: -len(known) - 1]
            break
    return f"{name}:{tag}" if image_type == IMAGE_TYPE_DEFAULT else f"{name}:{tag}-{image_type}"


def _image_type(annotations: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    """The image variant: the annotation, else the ProxyConfig's `image.imageType`."""
    value = annotations.get(PROXY_IMAGE_TYPE)
    if value is None:
        image = config.get("image") or {}
        configured = image.get("imageType", image.get("image_type"))
        return configured or None
    text = _annotation(annotations, PROXY_IMAGE_TYPE, "").strip()
    if not _IMAGE_TYPE.fullmatch(text):
        raise InvalidAnnotation(PROXY_IMAGE_TYPE, text,
                                "expected an image variant such as distroless, debug or default")
    return text


_COMPONENT_LEVEL = re.compile(r"[a-z0-9_]{1,64}:(?:trace|debug|info|warning|warn|error|critical"
                              r"|off)")
_AGENT_LEVEL = re.compile(r"(?:[a-zA-Z0-9_.-]{1,64}:)?(?:" + "|".join(AGENT_LOG_LEVELS) + ")")


def _log_levels(annotations: Mapping[str, Any], key: str) -> str | None:
    """componentLogLevel, Envoy's per-component levels (`upstream:debug,misc:error`), or
    agentLogLevel, pilot-agent's (`info`, `default:info,ads:debug`): checked, so that a
    malformed one is refused by name rather than stop the proxy at its start, and handed to the
    agent as written, less spaces (None when the pod has none)."""
    if key not in annotations:
        return None
    pattern = _COMPONENT_LEVEL if key == COMPONENT_LOG_LEVEL else _AGENT_LEVEL
    text = _annotation(annotations, key, "")
    if len(text) > MAX_LIST_CHARS:
        raise InvalidAnnotation(key, text, f"longer than {MAX_LIST_CHARS} characters")
    items = [item.strip() for item in text.split(",")]
    for item in items:
        if not pattern.fullmatch(item):
            raise InvalidAnnotation(key, text, f"{item[:64]!r} is not a "
                                    + ("component:level" if key == COMPONENT_LOG_LEVEL
                                       else "[scope:]level") + " pair")
    return ",".join(items)


def _gateway(annotations: Mapping[str, Any]) -> bool:
    """`inject.istio.io/templates`: `sidecar` (the default) or `gateway`, Istio's two built-in
    templates; any other (a custom template of Istio's mesh config) or a mix is refused."""
    text = _annotation(annotations, TEMPLATES_ANNOTATION, "sidecar")
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in TEMPLATES]
    if unknown or len(set(chosen)) != 1:
        raise InvalidAnnotation(TEMPLATES_ANNOTATION, text,
                                "expected one template, sidecar or gateway (no custom "
                                "templates here)")
    return chosen[0] == "gateway"


_RESOURCE_ANNOTATIONS = (PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT)


def _resources(annotations: Mapping[str, Any], mesh: MeshConfig, gateway: bool = False,
               ) -> Resources:
    defaults = mesh.resources
    if not any(key in annotations for key in _RESOURCE_ANNOTATIONS):
        if gateway:
            # Istio's gateway template sets none: a gateway is sized by its own Deployment
            # (the pod's istio-proxy, merged over ours), and a limit of ours it did not ask
            # for must not be left beside the requests it set.
            return Resources(None, None, None, None)
        return Resources(defaults.cpu, defaults.memory, defaults.cpu_limit, defaults.memory_limit)
    # Istio's template: the annotations set, and only those.
    cpu, memory, cpu_limit, memory_limit = (
        _quantity(annotations, key, "") if key in annotations else None
        for key in _RESOURCE_ANNOTATIONS
    )
    # Kubernetes refuses a request above its limit; say which annotation to fix instead.
    for request_key, request, limit in (
        (PROXY_CPU, cpu, cpu_limit),
        (PROXY_MEMORY, memory, memory_limit),
    ):
        if request is not None and limit is not None and (
            parse_quantity(request) > parse_quantity(limit)
        ):
            raise InvalidAnnotation(request_key, request,
                                    f"the request {request} exceeds the limit {limit}")
    return Resources(cpu, memory, cpu_limit, memory_limit)


# A probe's seconds and thresholds are int32 in the pod (Istio checks them as uint32; a value
# past int32 would be refused by Kubernetes when it decodes the patched pod).
MAX_PROBE_VALUE = 2**31 - 1


def _probe_value(annotations: Mapping[str, Any], key: str) -> int | None:
    """A non-negative whole number of ASCII digits (Kubernetes reads 0 as its default)."""
    value = annotations.get(key)
    if value is None:
        return None
    text = _annotation(annotations, key, "").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_PROBE_VALUE:
        raise InvalidAnnotation(key, text, f"expected a whole number from 0 to {MAX_PROBE_VALUE}")
    return int(text)


def _status_port(annotations: Mapping[str, Any], mesh: MeshConfig) -> int:
    """`status.sidecar.istio.io/port`: Istio's agent status port (15020 by default), excluded
    from inbound capture; 0 means none, and no readiness probe."""
    value = annotations.get(STATUS_PORT_ANNOTATION)
    if value is None:
        return mesh.agent_port
    text = _annotation(annotations, STATUS_PORT_ANNOTATION, "").strip()
    if text == "0":
        return 0
    try:
        return parse_port(text)
    except ValueError as error:
        raise InvalidAnnotation(STATUS_PORT_ANNOTATION, text, f"{error} (or 0: none)") from None


def _readiness(annotations: Mapping[str, Any], mesh: MeshConfig) -> Readiness | None:
    initial_delay = _probe_value(annotations, READINESS_INITIAL_DELAY)
    period = _probe_value(annotations, READINESS_PERIOD)
    failure_threshold = _probe_value(annotations, READINESS_FAILURE_THRESHOLD)
    # Deprecated in Istio and without effect there (its agent finds the app's ports itself);
    # checked, so that a malformed one is still refused by name.
    _list(annotations, READINESS_APPLICATION_PORTS, "", parse_port_set, MAX_PORTS)
    if _status_port(annotations, mesh) == 0:
        return None
    return Readiness(initial_delay=initial_delay,
                     period=2 if period is None else period,
                     failure_threshold=30 if failure_threshold is None else failure_threshold)


def traffic_options(annotations: Mapping[str, Any], mesh: MeshConfig) -> TrafficOptions:
    """The init container's redirection options: mesh config, overridden by annotations."""
    # The proxy's own ports are always excluded; an annotation adds to them, as in Istio.
    excluded_inbound = _list(
        annotations, EXCLUDE_INBOUND_PORTS, mesh.exclude_inbound_ports, parse_ports, MAX_PORTS
    )
    # Istio's `excludeInboundPort`: the status port unless it is 0. Istio's agent moves to that
    # port; ours keeps serving on `agent_port`, so that stays excluded whatever the annotation
    # says (else the agent's own port would be captured).
    status_port = _status_port(annotations, mesh)
    always_excluded = (mesh.prometheus_port, mesh.status_port, mesh.agent_port,
                       *((status_port,) if status_port else ()))
    # Istio's template: the newer annotation wins, else KubeVirt's own.
    virtual_key = (REROUTE_VIRTUAL_INTERFACES if REROUTE_VIRTUAL_INTERFACES in annotations
                   else KUBEVIRT_INTERFACES)
    return TrafficOptions(
        proxy_port=mesh.proxy_port,
        inbound_capture_port=mesh.inbound_capture_port,
        proxy_uid=mesh.proxy_uid,
        proxy_gid=mesh.proxy_gid,
        mode=TrafficOptions().mode,
        include_outbound_cidrs=_list(
            annotations, INCLUDE_OUTBOUND_IP_RANGES, mesh.include_outbound_ip_ranges,
            parse_written_cidr_set, MAX_CIDRS,
        ),
        exclude_outbound_cidrs=_list(
            annotations, EXCLUDE_OUTBOUND_IP_RANGES, mesh.exclude_outbound_ip_ranges,
            parse_written_cidrs, MAX_CIDRS,
        ),
        include_inbound_ports=_list(
            annotations, INCLUDE_INBOUND_PORTS, mesh.include_inbound_ports, parse_port_set,
            MAX_PORTS,
        ),
        exclude_inbound_ports=tuple(dict.fromkeys((*always_excluded, *excluded_inbound))),
        exclude_outbound_ports=_list(
            annotations, EXCLUDE_OUTBOUND_PORTS, mesh.exclude_outbound_ports, parse_ports,
            MAX_PORTS,
        ),
        include_outbound_ports=_list(
            annotations, INCLUDE_OUTBOUND_PORTS, "", parse_ports, MAX_PORTS,
        ),
        exclude_interfaces=_list(
            annotations, EXCLUDE_INTERFACES, "", parse_interfaces, MAX_INTERFACES,
        ),
        reroute_virtual_interfaces=_list(
            annotations, virtual_key, "", parse_interfaces, MAX_INTERFACES,
        ),
    )


def _capture(annotations: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether istio-init is added: `interceptionMode` NONE says no; REDIRECT (the default)
    yes; TPROXY, which this injector does not implement, refuses the pod by name. The
    annotation wins over the ProxyConfig's `interceptionMode`, as in Istio's template."""
    key = INTERCEPTION_MODE if INTERCEPTION_MODE in annotations else PROXY_CONFIG
    default = config.get("interceptionMode", "REDIRECT")
    mode = _annotation(annotations, INTERCEPTION_MODE, default).strip()
    if mode == INTERCEPTION_NONE:
        return False
    try:
        parse_mode(mode)
    except ValueError as error:
        shown = mode if key == INTERCEPTION_MODE else annotations.get(PROXY_CONFIG)
        raise InvalidAnnotation(key, shown,
                                f"{error} (or NONE: no traffic capture)") from None
    return True


def read(annotations: Mapping[str, Any], mesh: MeshConfig) -> Overrides:
    """The sidecar settings for a pod with these annotations under `mesh`.

    Raises InvalidAnnotation for the first annotation the pod cannot have. The annotations are
    checked in a fixed order, so a pod with several bad ones is always told of the same one.
    """
    native = _boolean(annotations, NATIVE_SIDECAR, mesh.native_sidecars)
    config = _proxy_config(annotations)
    hold = config.get("holdApplicationUntilProxyStarts", False)
    proxy_metadata = _proxy_metadata(config, annotations.get(PROXY_CONFIG))
    gateway = _gateway(annotations)
    resources = _resources(annotations, mesh, gateway)
    traffic = traffic_options(annotations, mesh)
    # A gateway's traffic is its own: no istio-init (Istio's gateway template has none).
    capture = _capture(annotations, config) and not gateway
    user_volumes = _user_volumes(annotations, USER_VOLUME)
    user_volume_mounts = _user_volumes(annotations, USER_VOLUME_MOUNT)
    readiness = _readiness(annotations, mesh)
    image = _annotation(annotations, PROXY_IMAGE, mesh.proxy_image).strip()
    if not image:
        raise InvalidAnnotation(PROXY_IMAGE, image, "must not be empty")
    if len(image) > MAX_IMAGE_CHARS:
        raise InvalidAnnotation(PROXY_IMAGE, image, f"longer than {MAX_IMAGE_CHARS} characters")
    # Istio's template: istio-init takes the annotation's image when it names a repository
    # ("registry/name:tag"); a bare name is a proxy image of the mesh's own registry, and
    # istio-init keeps the mesh's. The image variant goes on the mesh's images only.
    init_image = mesh.init_image or mesh.proxy_image
    image_type = _image_type(annotations, config)
    if image_type is not None:
        key = PROXY_IMAGE_TYPE if PROXY_IMAGE_TYPE in annotations else PROXY_CONFIG
        try:
            init_image = _with_image_type(init_image, image_type)
            if PROXY_IMAGE not in annotations:
                image = _with_image_type(image, image_type)
        except ValueError as error:
            raise InvalidAnnotation(key, annotations.get(key), str(error)) from None
    if PROXY_IMAGE in annotations and "/" in image:
        init_image = image
    component_log_level = _log_levels(annotations, COMPONENT_LOG_LEVEL)
    agent_log_level = _log_levels(annotations, AGENT_LOG_LEVEL)
    log_level = _annotation(annotations, LOG_LEVEL, mesh.proxy_log_level)
    if log_level not in LOG_LEVELS:
        raise InvalidAnnotation(LOG_LEVEL, log_level, f"expected one of {sorted(LOG_LEVELS)}")
    mtls_mode = _annotation(annotations, MTLS_MODE, mesh.mtls_mode)
    if mtls_mode not in MTLS_MODES:
        raise InvalidAnnotation(MTLS_MODE, mtls_mode, "expected PERMISSIVE or STRICT")
    # A gateway's proxy is the pod's main container, never a native sidecar; held for, it
    # comes first (as Istio orders it), though no app waits for it (`proxy_container`).
    return Overrides(image=image, init_image=init_image, log_level=log_level,
                     component_log_level=component_log_level, agent_log_level=agent_log_level,
                     mtls_mode=mtls_mode, resources=resources, native=native and not gateway,
                     hold=hold,
                     proxy_metadata=proxy_metadata, user_volumes=user_volumes,
                     user_volume_mounts=user_volume_mounts,
                     traffic=traffic, capture=capture, readiness=readiness, gateway=gateway)
