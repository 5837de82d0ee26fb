"""Probe rewriting (SPEC 8): kubelet probes the agent, and the agent probes the app.

Under STRICT mTLS the proxy refuses kubelet's plaintext probes, so, as Istio does, the app
containers' httpGet, tcpSocket and grpc probes become httpGet probes of the agent's port
(`mesh.agent_port`, 15020) at `/app-health/<container>/livez|readyz|startupz`, and their httpGet
and tcpSocket lifecycle hooks `/app-lifecycle/<container>/prestopz|poststartz`. The originals go
to the proxy, in env ISTIO_KUBE_APP_PROBERS (JSON: each new path to its original action, with
named ports resolved to numbers, and the probe's timeoutSeconds); the agent runs them
(`injector.proxy.app_health`). Exec probes are left alone: they run inside the container.

The rules are Istio's (pkg/kube/inject/app_probe.go): an HTTPS probe is sent to the agent over
HTTP and keeps its scheme in the prober; the rest of the probe (thresholds, period, headers) is
kept; a named port the container does not declare, or a port that is the agent's own, leaves
the probe rewritten but without a prober, so it fails as it would have without the rewrite.

Pure, and cheap for the common pod: without a probe or hook, `rewrite` is a few dict lookups
per container.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from injector.injection.overrides import InvalidAnnotation
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    APP_HEALTH_PREFIX,
    APP_LIFECYCLE_PREFIX,
    PROXY_CONTAINER,
    REWRITE_APP_PROBERS,
)

# (container field, its probe's path suffix)
_PROBES = (("readinessProbe", "readyz"), ("livenessProbe", "livez"),
           ("startupProbe", "startupz"))
_HOOKS = (("preStop", "prestopz"), ("postStart", "poststartz"))
_PROBE_ACTIONS = ("httpGet", "tcpSocket", "grpc")
_HOOK_ACTIONS = ("httpGet", "tcpSocket")

# Go's strconv.ParseBool, which Istio reads the annotation with.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class Rewrite(NamedTuple):
    """What rewriting changes in a pod: `replacements` are (JSON pointer, new value) for
    `replace` operations on the app containers' probes and hooks (pointers into the pod as it
    came, so they go before anything is inserted); `probers` is ISTIO_KUBE_APP_PROBERS' value
    ("" when no probe can be run by the agent: the env is then not added); `key` is all of it
    as JSON, for the patch cache."""

    replacements: tuple[tuple[str, dict[str, Any]], ...]
    probers: str
    key: bytes


def enabled(annotations: Mapping[str, Any], mesh: MeshConfig) -> bool:
    """The annotation, else the mesh config. A value Go's ParseBool would not read is refused
    (Istio ignores it silently; a pod is never injected other than its owner asked)."""
    value = annotations.get(REWRITE_APP_PROBERS)
    if value is None:
        return mesh.rewrite_app_http_probers
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidAnnotation(REWRITE_APP_PROBERS, value, 'must be "true" or "false"')


def _action(handler: Any, kinds: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """The handler's first action of `kinds`, when it is one the agent can run."""
    if type(handler) is not dict:
        return None
    for kind in kinds:
        action = handler.get(kind)
        if action is None:
            continue
        if type(action) is not dict:
            return None  # malformed: the API server refuses the pod; nothing to rewrite
        port = action.get("port")
        if type(port) not in (int, str) or type(port) is bool:
            return None
        return kind, action
    return None


def _agent_get(handler: dict[str, Any], kind: str, action: dict[str, Any], path: str,
               port: int) -> dict[str, Any]:
    """The handler, its action replaced by an httpGet of the agent's `path`."""
    http_get = dict(action) if kind == "httpGet" else {}
    http_get["path"] = path
    http_get["port"] = port
    if http_get.get("scheme") == "HTTPS":
        http_get["scheme"] = "HTTP"  # the agent serves HTTP; the prober keeps HTTPS
    rewritten = {key: value for key, value in handler.items() if key not in _PROBE_ACTIONS}
    rewritten["httpGet"] = http_get
    return rewritten


def _prober(kind: str, action: dict[str, Any], timeout: Any, ports: dict[str, int],
            agent_port: int) -> dict[str, Any] | None:
    """The original action for the agent, or None when it has nothing to run (see above)."""
    if kind != "grpc":
        port = action["port"]
        if type(port) is str:
            if port not in ports:
                return None
            action = {**action, "port": ports[port]}
        elif port == agent_port:
            return None
    prober: dict[str, Any] = {kind: action}
    if type(timeout) is int and timeout > 0:
        prober["timeoutSeconds"] = timeout
    return prober


def _named_ports(container: dict[str, Any]) -> dict[str, int]:
    ports = container.get("ports")
    named: dict[str, int] = {}
    for port in ports if type(ports) is list else ():
        if type(port) is dict and type(port.get("name")) is str and port["name"]:
            number = port.get("containerPort")
            if type(number) is int:
                named[port["name"]] = number
    return named


def _container(container: dict[str, Any], where: str, port: int,
               replacements: list[tuple[str, dict[str, Any]]],
               probers: dict[str, dict[str, Any]], *, before_agent: bool) -> None:
    name = container.get("name")
    if type(name) is not str or not name or name == PROXY_CONTAINER:
        return
    # (where the handler is, the handler, the actions it may use, the agent's path for it,
    # its timeout): the probes, then the lifecycle hooks, rewritten alike.
    handlers: list[tuple[str, Any, Any, str, Any]] = []
    for field, suffix in _PROBES:
        if before_agent and field == "startupProbe":
            continue
        probe = container.get(field)
        timeout = probe.get("timeoutSeconds") if type(probe) is dict else None
        handlers.append((f"{where}/{field}", probe, _PROBE_ACTIONS,
                         f"{APP_HEALTH_PREFIX}{name}/{suffix}", timeout))
    lifecycle = container.get("lifecycle")
    if type(lifecycle) is dict:
        for hook, suffix in _HOOKS:
            if before_agent and hook == "postStart":
                continue
            handlers.append((f"{where}/lifecycle/{hook}", lifecycle.get(hook), _HOOK_ACTIONS,
                             f"{APP_LIFECYCLE_PREFIX}{name}/{suffix}", None))
    ports: dict[str, int] | None = None
    for location, handler, actions, path, timeout in handlers:
        found = _action(handler, actions)
        if found is None:
            continue
        kind, action = found
        replacements.append((location, _agent_get(handler, kind, action, path, port)))
        if ports is None:
            ports = _named_ports(container)
        prober = _prober(kind, action, timeout, ports, port)
        if prober is not None:
            probers[path] = prober


def _may_have_probes(items: Any) -> bool:
    if type(items) is not list:
        return False
    for container in items:
        if type(container) is dict and not _HANDLER_FIELDS.isdisjoint(container):
            return True
    return False


_HANDLER_FIELDS = frozenset(("readinessProbe", "livenessProbe", "startupProbe", "lifecycle"))


def rewrite(spec: Mapping[str, Any], annotations: Mapping[str, Any], mesh: MeshConfig,
            *, native: bool = False) -> Rewrite | None:
    """The rewrite of `spec`'s probes and hooks, or None when there is nothing to rewrite
    (no probe the agent can run, or rewriting turned off). `native`: the proxy is a native
    sidecar, started before the pod's own init containers.

    Raises InvalidAnnotation for a rewriteAppHTTPProbers value that is not a boolean.
    """
    init, containers = spec.get("initContainers"), spec.get("containers")
    if not (_may_have_probes(containers) or (init and _may_have_probes(init))):
        # The common pod: nothing to rewrite. The annotation is still checked (a dict lookup)
        # so that a malformed one is refused whatever the pod.
        if REWRITE_APP_PROBERS in annotations:
            enabled(annotations, mesh)
        return None
    if not enabled(annotations, mesh):
        return None
    replacements: list[tuple[str, dict[str, Any]]] = []
    probers: dict[str, dict[str, Any]] = {}
    # Init containers too, as Istio: a sidecar-style init container (restartPolicy: Always)
    # has probes; an ordinary one has none to rewrite. Unless the proxy is a native sidecar,
    # it starts after them, and kubelet holds the next init container until one's startup
    # probe and postStart hook pass: pointed at the agent, they would wait for it forever
    # (Istio rewrites them anyway). Left alone, they run before istio-init redirects anything.
    for field, items in (("initContainers", init), ("containers", containers)):
        before_agent = field == "initContainers" and not native
        for index, container in enumerate(items if type(items) is list else ()):
            if type(container) is dict:
                _container(container, f"/spec/{field}/{index}", mesh.agent_port,
                           replacements, probers, before_agent=before_agent)
    if not replacements:
        return None
    encoded = orjson.dumps(probers, option=orjson.OPT_SORT_KEYS).decode() if probers else ""
    return Rewrite(replacements=tuple(replacements), probers=encoded,
                   key=orjson.dumps([replacements, encoded]))
