"""Ours and Istio's own injector, on the same generated pods.

Hypothesis makes pods with random combinations of the annotations and labels of issue 15's table
(and the other overrides), each with valid and invalid values, and app containers with every
kind of probe. Each pod is injected by ours in-process (as kube-inject does) and by Istio's
pkg/kube/inject with its default templates (tests/istio/inject, one process for the module).
Both must agree on the outcome (injected, skipped or refused) and on what users and the cluster
notice (`tests.support.istio_parity.observe`), except as the table "Differences from Istio's
injector on generated pods" of docs/istio-compatibility.md says, row by row, with why.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.injection.manifests import ManifestError, inject_yaml
from injector.mesh.config import MeshConfig
from tests.support import istio_parity as istio

SECTION = "Differences from Istio's injector on generated pods"
MESH = MeshConfig()

# Each annotation with values Istio takes and values it should not.
ANNOTATIONS: dict[str, list[str]] = {
    "sidecar.istio.io/rewriteAppHTTPProbers": ["true", "false", "maybe"],
    "sidecar.istio.io/proxyCPU": ["100m", "4", "lots"],
    "sidecar.istio.io/proxyMemory": ["128Mi", "2Gi", "1ZZ"],
    "sidecar.istio.io/proxyCPULimit": ["500m", "2"],
    "sidecar.istio.io/proxyMemoryLimit": ["1Gi", "4Gi"],
    "sidecar.istio.io/proxyImage": ["docker.io/istio/proxyv2:1.24.0", "proxyv2"],
    "sidecar.istio.io/logLevel": ["debug", "loud"],
    "sidecar.istio.io/interceptionMode": ["REDIRECT", "NONE", "SIDEWAYS"],
    "sidecar.istio.io/nativeSidecar": ["true", "false"],
    "sidecar.istio.io/userVolume": ['{"extra":{"emptyDir":{}}}',
                                    '[{"name":"extra","emptyDir":{}}]'],
    "sidecar.istio.io/userVolumeMount": ['{"extra":{"mountPath":"/extra"}}',
                                         '[{"name":"extra","mountPath":"/extra"}]'],
    "sidecar.istio.io/componentLogLevel": ["misc:error"],
    "sidecar.istio.io/agentLogLevel": ["debug"],
    "sidecar.istio.io/proxyImageType": ["distroless", "debug"],
    "sidecar.istio.io/inject": ["true", "false"],
    "traffic.sidecar.istio.io/includeOutboundIPRanges": ["*", "10.0.0.0/8", "10.1.2.3/8", "ten"],
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": ["192.168.0.0/16", "*"],
    "traffic.sidecar.istio.io/includeInboundPorts": ["*", "8080", "8080,9090", "x"],
    "traffic.sidecar.istio.io/excludeInboundPorts": ["9090", "*"],
    "traffic.sidecar.istio.io/excludeOutboundPorts": ["3306", "3306,5432", "db"],
    "traffic.sidecar.istio.io/includeOutboundPorts": ["443", "443,8443", "web"],
    "traffic.sidecar.istio.io/excludeInterfaces": ["eth1", "eth1,veth+"],
    "traffic.sidecar.istio.io/kubevirtInterfaces": ["net1", "net1,net2"],
    "istio.io/reroute-virtual-interfaces": ["net3"],
    "status.sidecar.istio.io/port": ["15020", "0", "15555", "x"],
    "readiness.status.sidecar.istio.io/initialDelaySeconds": ["1", "10", "soon"],
    "readiness.status.sidecar.istio.io/periodSeconds": ["5"],
    "readiness.status.sidecar.istio.io/failureThreshold": ["3"],
    "proxy.istio.io/config": ["holdApplicationUntilProxyStarts: true",
                              "holdApplicationUntilProxyStarts: false", "concurrency: 2", "{"],
    "inject.istio.io/templates": ["sidecar", "gateway"],
    "istio.io/rev": ["default", "canary"],
    "prometheus.io/scrape": ["true", "false"],
    "prometheus.io/port": ["9100"],
    "prometheus.io/path": ["/metrics"],
    "prometheus.istio.io/merge-metrics": ["false"],
    "prometheus.istio.io/scrape-targets": ["9100:/metrics,9200", ":/metrics"],
    "kubectl.kubernetes.io/default-logs-container": ["app"],
}
LABELS: dict[str, list[str]] = {
    "sidecar.istio.io/inject": ["true", "false"],
    "istio.io/rev": ["default", "canary"],
    "app": ["shop"],
    "version": ["v2"],
}

_PROBES: list[dict[str, Any] | None] = [
    None,
    {"httpGet": {"path": "/ready", "port": 8080}},
    {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTPS"}, "periodSeconds": 7},
    {"tcpSocket": {"port": 8080}},
    {"grpc": {"port": 9090}},
    {"exec": {"command": ["true"]}},
]


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    annotations = draw(st.dictionaries(st.sampled_from(sorted(ANNOTATIONS)), st.just(""),
                                       max_size=6))
    annotations = {key: draw(st.sampled_from(ANNOTATIONS[key])) for key in annotations}
    labels = draw(st.dictionaries(st.sampled_from(sorted(LABELS)), st.just(""), max_size=3))
    labels = {key: draw(st.sampled_from(LABELS[key])) for key in labels}
    app: dict[str, Any] = {"name": "app", "image": "shop:1"}
    if draw(st.booleans()):
        app["ports"] = [{"name": "http", "containerPort": 8080}]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        chosen = draw(st.sampled_from(_PROBES))
        if chosen is not None:
            app[probe] = chosen
    metadata: dict[str, Any] = {"name": "shop-1", "namespace": "shop"}
    if annotations:
        metadata["annotations"] = annotations
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": [app]}}


def ours(pod: dict[str, Any]) -> list[Any] | str:
    """Our kube-inject's documents for the pod, or its message when it refuses it."""
    try:
        text = inject_yaml(yaml.safe_dump(pod, sort_keys=False), MESH, "pod.yaml")
    except ManifestError as error:
        return str(error)
    return [document for document in yaml.safe_load_all(text) if document is not None]


def _outcome(answer: list[Any] | str) -> str:
    if isinstance(answer, str):
        return "refused"
    annotations = (answer[0].get("metadata") or {}).get("annotations") or {}
    return "injected" if istio.STATUS_ANNOTATION in annotations else "skipped"


# The annotation a refusal names: ours says "annotation NAME=...", Istio "for annotation 'NAME'"
# (or "could not parse proxy config" for proxy.istio.io/config).
_OUR_NAMED = re.compile(r"annotation ([^\s=]+)=")
_ISTIO_NAMED = re.compile(r"annotation '([^']+)'")


def _named(message: str, pattern: re.Pattern[str]) -> str:
    if "proxy config" in message:
        return "proxy.istio.io/config"
    match = pattern.search(message)
    return match.group(1) if match else "(none)"


def compared(pod: dict[str, Any], answer_ours: list[Any] | str,
             answer_istio: list[Any] | str) -> dict[str, tuple[Any, Any]]:
    """{field: (ours, Istio's)} that differ. When the outcomes differ, that alone: the field
    `outcome.ours-refuses` or `outcome.istio-refuses` (the value names the annotation the
    refusal names first), else `outcome`."""
    outcome_ours, outcome_istio = _outcome(answer_ours), _outcome(answer_istio)
    if outcome_ours != outcome_istio:
        if isinstance(answer_ours, str):
            return {"outcome.ours-refuses": (_named(answer_ours, _OUR_NAMED), outcome_istio)}
        if isinstance(answer_istio, str):
            return {"outcome.istio-refuses": (outcome_ours, _named(answer_istio, _ISTIO_NAMED))}
        return {"outcome": (outcome_ours, outcome_istio)}
    if outcome_ours != "injected":
        return {}
    assert not isinstance(answer_ours, str) and not isinstance(answer_istio, str)
    return istio.differences(istio.observe_documents([pod], answer_ours)[0],
                             istio.observe_documents([pod], answer_istio)[0])


def undocumented(pod: dict[str, Any], found: dict[str, tuple[Any, Any]],
                 rows: list[istio.Difference]) -> dict[str, tuple[Any, Any]]:
    """The differences no row covers. A row applies where the pod has its annotation or label
    (or everywhere, `*`); a refusal's row must be that of the annotation the refusal names."""
    metadata = pod["metadata"]
    present = {"*", *(metadata.get("annotations") or {}), *(metadata.get("labels") or {})}
    left: dict[str, tuple[Any, Any]] = {}
    for field, values in found.items():
        wheres = present
        if field == "outcome.ours-refuses":
            wheres = {values[0]}
        elif field == "outcome.istio-refuses":
            wheres = {values[1]}
        if not any(row.covers(where, field) for row in rows for where in wheres):
            left[field] = values
    return left


@pytest.fixture(scope="module")
def istio_injector() -> Iterator[istio.IstioInjector]:
    # Native sidecars off, as ours by default (and Istio's on clusters before Kubernetes 1.33).
    injector = istio.IstioInjector(native_sidecars=False)
    yield injector
    injector.close()


@pytest.fixture(scope="module")
def documented() -> list[istio.Difference]:
    return istio.documented_differences(SECTION)


# 500 pods in about 15 s on the shared 2-core machine (the issue asks for at least 300).
@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(pod=pods())
def test_ours_and_istios_injector_agree_on_generated_pods(
        pod: dict[str, Any], istio_injector: istio.IstioInjector,
        documented: list[istio.Difference]) -> None:
    found = undocumented(pod, compared(pod, ours(pod), istio_injector.inject(pod)), documented)
    shown = "\n".join(f"  {field}: ours {values[0]!r:.400}\n  {' ' * len(field)}  Istio "
                      f"{values[1]!r:.400}" for field, values in found.items())
    assert not found, (f"differences from Istio's injector not listed in "
                       f"docs/istio-compatibility.md ({SECTION}):\n{shown}")


@pytest.mark.parametrize("name", ["hello.yaml", "hello-probes.yaml", "frontend.yaml",
                                  "traffic-annotations-wildcards.yaml", "resource_annotations.yaml",
                                  "status_annotations.yaml", "user-volume.yaml"])
def test_the_oracle_is_istios_injector_as_its_goldens_show(name: str) -> None:
    """tests/istio/inject with native sidecars on (as Istio's goldens were made) reproduces
    Istio's golden for inputs its tests inject with default settings: it is Istio's injector."""
    path = istio.testdata_dir() / name
    originals = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    golden = [doc for doc in yaml.safe_load_all(path.with_name(name + ".injected").read_text())
              if doc is not None]
    injector = istio.IstioInjector(native_sidecars=True)
    try:
        answers = [injector.inject(document) for document in originals]
    finally:
        injector.close()
    produced = [doc for answer in answers for doc in answer if not isinstance(answer, str)]
    assert istio.observe_documents(originals, produced) == \
        istio.observe_documents(originals, golden)
