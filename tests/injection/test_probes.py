"""Probe rewriting (SPEC 8), webhook side: the app's probes point at the agent, the originals go
to the proxy in ISTIO_KUBE_APP_PROBERS, by Istio's rules (pkg/kube/inject/app_probe.go).

Through the real webhook (HTTPS, `client`), kubectl's RFC 6902 implementation and Kubernetes'
schema; through the patch cache; and through kube-inject, which applies the same injection.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import orjson
import pytest
import yaml

from injector.injection import patch, probes, sidecar
from injector.injection.manifests import inject_yaml
from injector.injection.overrides import InvalidAnnotation
from injector.mesh.config import MeshConfig, load_mesh_config
from tests.support.pods import pod, review

MESH = MeshConfig()
KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
REWRITE = "sidecar.istio.io/rewriteAppHTTPProbers"


def web(**fields: Any) -> dict[str, Any]:
    """An app container with a named port, and the given probes or hooks."""
    return {"name": "web", "image": "shop:1",
            "ports": [{"name": "http", "containerPort": 8080},
                      {"name": "tls", "containerPort": 8443}], **fields}


EVERY_KIND = [
    web(livenessProbe={"httpGet": {"path": "/live", "port": "tls", "scheme": "HTTPS",
                                   "httpHeaders": [{"name": "x-probe", "value": "1"}]},
                       "timeoutSeconds": 3, "periodSeconds": 7, "failureThreshold": 4},
        readinessProbe={"tcpSocket": {"port": 8080}, "initialDelaySeconds": 2},
        startupProbe={"exec": {"command": ["cat", "/tmp/started"]}},
        lifecycle={"preStop": {"httpGet": {"path": "/stop", "port": "http"}},
                   "postStart": {"exec": {"command": ["true"]}}}),
    {"name": "grpc", "image": "shop-grpc:1",
     "startupProbe": {"grpc": {"port": 9000, "service": "shop"}, "timeoutSeconds": 5}},
]


def injected(original: dict[str, Any], mesh: MeshConfig = MESH) -> dict[str, Any]:
    """The pod the webhook's patch makes (as JSON, through the patch cache)."""
    injection = sidecar.build(original, mesh, as_json=True)
    ops = orjson.loads(base64.b64decode(patch.encoded(original, injection)))
    result: dict[str, Any] = jsonpatch.apply_patch(original, ops)
    return result


def proxy(pod_: dict[str, Any]) -> dict[str, Any]:
    spec = pod_["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"]
                if c["name"] == "istio-proxy")


def app_probers(pod_: dict[str, Any]) -> dict[str, Any] | None:
    env = {e["name"]: e.get("value") for e in proxy(pod_)["env"]}
    value = env.get("ISTIO_KUBE_APP_PROBERS")
    return None if value is None else json.loads(value)


def test_every_kind_of_probe_points_at_the_agent_and_the_originals_go_to_the_proxy() -> None:
    original = pod(containers=EVERY_KIND)
    result = injected(original)
    app, grpc_app = result["spec"]["containers"][:2]
    # httpGet: the agent's port and path, HTTP (the agent serves HTTP); the rest as it was.
    assert app["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP",
                    "httpHeaders": [{"name": "x-probe", "value": "1"}]},
        "timeoutSeconds": 3, "periodSeconds": 7, "failureThreshold": 4}
    # tcpSocket and grpc become httpGet.
    assert app["readinessProbe"] == {
        "httpGet": {"path": "/app-health/web/readyz", "port": 15020}, "initialDelaySeconds": 2}
    assert grpc_app["startupProbe"] == {
        "httpGet": {"path": "/app-health/grpc/startupz", "port": 15020}, "timeoutSeconds": 5}
    # Exec runs in the container: untouched; hooks too, except httpGet/tcpSocket ones.
    assert app["startupProbe"] == EVERY_KIND[0]["startupProbe"]
    assert app["lifecycle"] == {
        "preStop": {"httpGet": {"path": "/app-lifecycle/web/prestopz", "port": 15020}},
        "postStart": {"exec": {"command": ["true"]}}}
    # The originals, named ports resolved, scheme and timeout kept: Istio's format.
    assert app_probers(result) == {
        "/app-health/web/livez": {
            "httpGet": {"path": "/live", "port": 8443, "scheme": "HTTPS",
                        "httpHeaders": [{"name": "x-probe", "value": "1"}]},
            "timeoutSeconds": 3},
        "/app-health/web/readyz": {"tcpSocket": {"port": 8080}},
        "/app-health/grpc/startupz": {"grpc": {"port": 9000, "service": "shop"},
                                      "timeoutSeconds": 5},
        "/app-lifecycle/web/prestopz": {"httpGet": {"path": "/stop", "port": 8080}},
    }


def test_a_pod_without_probes_gets_the_patch_it_always_had() -> None:
    original = pod(containers=[web(startupProbe={"exec": {"command": ["true"]}})])
    injection = sidecar.build(original, MESH, as_json=True)
    assert injection.rewritten_probes is None
    ops = orjson.loads(orjson.dumps(patch.build(original, injection)))
    assert all(op["op"] == "add" for op in ops)
    assert app_probers(jsonpatch.apply_patch(original, ops)) is None


@pytest.mark.parametrize("annotations, mesh, rewritten", [
    ({}, MESH, True),
    ({REWRITE: "false"}, MESH, False),
    ({REWRITE: "False"}, MESH, False),
    ({}, load_mesh_config({"rewriteAppHTTPProbers": False}), False),
    ({REWRITE: "true"}, load_mesh_config({"rewriteAppHTTPProbers": False}), True),
    ({REWRITE: "1"}, load_mesh_config({"rewriteAppHTTPProbers": False}), True),
])
def test_the_annotation_then_the_mesh_config_turn_it_on_or_off(
    annotations: dict[str, str], mesh: MeshConfig, rewritten: bool
) -> None:
    original = pod(annotations=annotations, containers=EVERY_KIND)
    result = injected(original, mesh)
    assert (result["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] == 15020) is (
        rewritten)
    assert (app_probers(result) is not None) is rewritten
    if not rewritten:
        assert result["spec"]["containers"][:2] == EVERY_KIND


def test_a_value_that_is_not_a_boolean_is_refused_naming_the_annotation(
    client: httpx.Client,
) -> None:
    with pytest.raises(InvalidAnnotation, match=REWRITE):
        sidecar.build(pod(annotations={REWRITE: "yes"}), MESH)
    reply = client.post("/inject", json=review(pod(annotations={REWRITE: "nope"},
                                                   containers=EVERY_KIND)))
    assert reply.status_code == 200
    response = reply.json()["response"]
    assert response["allowed"] is False
    assert REWRITE in response["status"]["message"]


def test_unresolvable_ports_are_rewritten_without_a_prober_as_istio_does() -> None:
    # Kubelet would fail these probes; through the agent (no prober: 404) they fail alike.
    original = pod(containers=[web(
        livenessProbe={"httpGet": {"path": "/", "port": "missing"}},
        readinessProbe={"tcpSocket": {"port": 15020}})])
    result = injected(original)
    assert result["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] == 15020
    assert result["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == 15020
    assert app_probers(result) is None


@pytest.mark.parametrize("annotations", [
    {}, {"sidecar.istio.io/nativeSidecar": "true"},
    {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"},
    {"sidecar.istio.io/nativeSidecar": "true", "sidecar.istio.io/interceptionMode": "NONE"},
])
def test_through_the_webhook_kubectl_applies_it_and_kubernetes_accepts_the_pod(
    client: httpx.Client, tmp_path: Path, annotations: dict[str, str]
) -> None:
    init = [{"name": "setup", "image": "busybox", "command": ["true"]},
            {"name": "log-shipper", "image": "ship:1", "restartPolicy": "Always",
             "readinessProbe": {"tcpSocket": {"port": 24224}}}]
    original = pod(annotations=annotations, containers=EVERY_KIND, init_containers=init)
    reply = client.post("/inject", json=review(original))
    response = reply.json()["response"]
    assert response["allowed"] is True, response
    ops = json.loads(base64.b64decode(response["patch"]))
    # Only the probes and hooks are replaced, and only on the pod's own containers.
    replaced = sorted(op["path"] for op in ops if op["op"] != "add")
    assert replaced == ["/spec/containers/0/lifecycle/preStop",
                        "/spec/containers/0/livenessProbe", "/spec/containers/0/readinessProbe",
                        "/spec/containers/1/startupProbe",
                        "/spec/initContainers/1/readinessProbe"]
    result = jsonpatch.apply_patch(original, ops)
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(original))
    done = subprocess.run([KUBECTL, "patch", "--local", "-f", str(manifest), "--type=json",
                           "-p", json.dumps(ops), "-o", "json"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == result
    kubernetes_validate.validate(result, "1.33", strict=True)
    # The env lands on istio-proxy wherever it went, and names the init container's probe.
    assert set(app_probers(result) or {}) == {
        "/app-health/web/livez", "/app-health/web/readyz", "/app-health/grpc/startupz",
        "/app-lifecycle/web/prestopz", "/app-health/log-shipper/readyz"}
    every = result["spec"].get("initContainers", []) + result["spec"]["containers"]
    assert sum("ISTIO_KUBE_APP_PROBERS" in json.dumps(c.get("env", [])) for c in every) == 1


@pytest.mark.parametrize("native", [False, True])
def test_an_init_sidecars_startup_probe_and_post_start_wait_for_no_proxy_that_comes_later(
    native: bool,
) -> None:
    log_shipper = {"name": "log-shipper", "image": "ship:1", "restartPolicy": "Always",
                   "startupProbe": {"tcpSocket": {"port": 24224}},
                   "livenessProbe": {"tcpSocket": {"port": 24224}},
                   "lifecycle": {"postStart": {"httpGet": {"path": "/", "port": 24224}}}}
    annotations = {"sidecar.istio.io/nativeSidecar": "true"} if native else {}
    original = pod(annotations=annotations, init_containers=[log_shipper])
    result = injected(original)
    shipper = next(c for c in result["spec"]["initContainers"] if c["name"] == "log-shipper")
    # Liveness runs once started, by when the proxy runs: rewritten either way.
    assert shipper["livenessProbe"]["httpGet"]["port"] == 15020
    if native:  # the proxy starts first: everything goes through it
        assert shipper["startupProbe"]["httpGet"]["port"] == 15020
        assert shipper["lifecycle"]["postStart"]["httpGet"]["port"] == 15020
    else:  # kubelet holds the proxy until these pass: they must not need it
        assert shipper["startupProbe"] == log_shipper["startupProbe"]
        assert shipper["lifecycle"] == log_shipper["lifecycle"]


def test_the_patch_cache_tells_pods_apart_by_their_probes_and_where_the_proxy_goes() -> None:
    patch.PATCHES.entries.clear()
    first = pod(containers=[web(livenessProbe={"tcpSocket": {"port": 8080}})])
    other_port = pod(containers=[web(livenessProbe={"tcpSocket": {"port": 8081}})])
    # Same first container, one container more: istio-proxy (appended) is at another index.
    more = pod(containers=[web(livenessProbe={"tcpSocket": {"port": 8080}}),
                           {"name": "extra", "image": "x:1"}])
    for original, port in ((first, 8080), (other_port, 8081), (more, 8080), (first, 8080)):
        result = injected(original)
        assert app_probers(result) == {"/app-health/web/livez": {"tcpSocket": {"port": port}}}
        assert result["spec"]["containers"][-1]["name"] == "istio-proxy"
        fresh = jsonpatch.apply_patch(original, patch.build(original, sidecar.build(original,
                                                                                     MESH)))
        assert result == fresh


def test_kube_inject_rewrites_a_deployments_probes() -> None:
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "shop"}}, "template": {
            "metadata": {"labels": {"app": "shop"}},
            "spec": {"containers": EVERY_KIND}}}}
    out = yaml.safe_load(inject_yaml(yaml.safe_dump(deployment), MESH, "shop.yaml"))
    template = out["spec"]["template"]
    assert template["spec"]["containers"][0]["readinessProbe"] == {
        "httpGet": {"path": "/app-health/web/readyz", "port": 15020}, "initialDelaySeconds": 2}
    assert "/app-health/grpc/startupz" in (app_probers(template) or {})


def test_rewrite_reads_only_what_it_rewrites() -> None:
    # Malformed probes are left for the API server to refuse, never half-rewritten.
    odd = pod(containers=[{"name": "odd", "image": "x",
                           "livenessProbe": {"httpGet": "not an object"},
                           "readinessProbe": {"tcpSocket": {"port": [1]}},
                           "lifecycle": "nope"}])
    assert probes.rewrite(odd["spec"], {}, MESH) is None
