"""A pod's own istio-proxy / istio-init merged over the injected ones, as Istio does it."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from injector.injection import patch, policy, sidecar, user_containers
from injector.mesh.config import MeshConfig
from tests.support.pods import pod

MESH = MeshConfig()
ENABLED = {"istio-injection": "enabled"}

# As in Istio's own test data (proxy-override.yaml): more CPU, a mount, a hook, a probe.
OWN_PROXY: dict[str, Any] = {
    "name": "istio-proxy", "image": "auto",
    "resources": {"requests": {"cpu": "123m"}, "limits": {"cpu": "3000m"}},
    "volumeMounts": [{"mountPath": "/etc/certs", "name": "certs"}],
    "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
    "env": [{"name": "MTLS_MODE", "value": "STRICT"}, {"name": "EXTRA", "value": "1"}],
    "securityContext": {"runAsUser": 1234, "readOnlyRootFilesystem": False},
}
OWN_INIT: dict[str, Any] = {"name": "istio-init", "image": "fake/custom-image",
                            "args": ["my", "custom", "args"]}


def injected(original: dict[str, Any], mesh: MeshConfig = MESH) -> dict[str, Any]:
    before = copy.deepcopy(original)
    result: dict[str, Any] = jsonpatch.apply_patch(
        original, patch.build(original, sidecar.build(original, mesh)))
    assert original == before
    return result


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_the_pods_own_proxy_is_merged_over_the_injected_one() -> None:
    out = injected(pod(containers=[{"name": "app", "image": "a"}, copy.deepcopy(OWN_PROXY)],
                       volumes=[{"name": "certs", "secret": {"secretName": "c"}}]))
    containers = out["spec"]["containers"]
    assert [c["name"] for c in containers] == ["app", "istio-proxy"]  # one, where ours goes
    proxy = containers[1]
    assert proxy["image"] == MESH.proxy_image  # image: auto keeps the injected image
    assert proxy["resources"] == {"requests": {"cpu": "123m", "memory": "128Mi"},
                                  "limits": {"cpu": "3000m", "memory": "1Gi"}}
    mounts = by_name(proxy["volumeMounts"])
    assert "workload-certs" in mounts and mounts["certs"]["mountPath"] == "/etc/certs"
    env = {item["name"]: item.get("value") for item in proxy["env"]}
    assert env["MTLS_MODE"] == "STRICT" and env["EXTRA"] == "1" and "POD_NAME" in env
    assert proxy["securityContext"]["runAsUser"] == 1234
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}  # ours, kept
    assert proxy["lifecycle"] == OWN_PROXY["lifecycle"]
    recorded = json.loads(out["metadata"]["annotations"]["proxy.istio.io/overrides"])
    assert recorded == {"containers": [{k: v for k, v in OWN_PROXY.items() if k != "image"}]}


def test_the_pods_own_istio_init_is_merged_too() -> None:
    out = injected(pod(init_containers=[{"name": "setup", "image": "s"}, dict(OWN_INIT)]))
    inits = out["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["setup", "istio-init"]
    assert inits[1]["image"] == "fake/custom-image" and inits[1]["args"] == ["my", "custom",
                                                                             "args"]
    assert inits[1]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    recorded = json.loads(out["metadata"]["annotations"]["proxy.istio.io/overrides"])
    assert recorded == {"initContainers": [OWN_INIT]}


@pytest.mark.parametrize("hold", [False, True])
def test_a_native_or_held_proxy_moves_to_where_injection_puts_it(hold: bool) -> None:
    annotations = ({"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"} if hold
                   else {"sidecar.istio.io/nativeSidecar": "true"})
    out = injected(pod(annotations=annotations,
                       containers=[{"name": "app", "image": "a"}, copy.deepcopy(OWN_PROXY)]))
    spec = out["spec"]
    if hold:
        assert [c["name"] for c in spec["containers"]] == ["istio-proxy", "app"]
    else:
        assert [c["name"] for c in spec["containers"]] == ["app"]
        assert [c["name"] for c in spec["initContainers"]] == ["istio-init", "istio-proxy"]
        recorded = json.loads(out["metadata"]["annotations"]["proxy.istio.io/overrides"])
        assert list(recorded) == ["initContainers"]


def test_a_pod_we_injected_is_not_injected_again() -> None:
    out = injected(pod(containers=[{"name": "app", "image": "a"}, copy.deepcopy(OWN_PROXY)]))
    decision = policy.decide(out, "shop", ENABLED, MESH)
    assert (decision.inject, decision.reason) == (False, "already-injected")


def test_strategic_merge_rules() -> None:
    base = {"name": "istio-proxy", "image": "i", "args": ["a"], "ports": [
        {"containerPort": 15090, "name": "prom"}], "readinessProbe": {"periodSeconds": 2}}
    merged = user_containers.merge(base, {"name": "istio-proxy", "args": ["b"],
                                          "ports": [{"containerPort": 9000}],
                                          "readinessProbe": None})
    assert merged["args"] == ["b"]  # a list without a merge key is replaced
    assert merged["ports"] == [{"containerPort": 15090, "name": "prom"}, {"containerPort": 9000}]
    assert "readinessProbe" not in merged  # null removes
    assert base["args"] == ["a"]  # the injected container is not changed


def test_the_gateway_template_makes_the_proxy_the_main_container() -> None:
    # Istio's own example (gateway.yaml): the pod is its istio-proxy alone, image auto.
    gateway = pod(annotations={"inject.istio.io/templates": "gateway"},
                  labels={"istio": "ingressgateway"},
                  containers=[{"name": "istio-proxy", "image": "auto",
                               "imagePullPolicy": "IfNotPresent"}])
    out = injected(gateway)
    spec = out["spec"]
    assert "initContainers" not in spec  # no istio-init
    assert [c["name"] for c in spec["containers"]] == ["istio-proxy"]
    assert spec["containers"][0]["image"] == MESH.proxy_image
    assert "security.istio.io/tlsMode" not in out["metadata"]["labels"]
    status = json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["initContainers"] == [] and status["containers"] == ["istio-proxy"]
    sidecar_pod = injected(pod(annotations={"inject.istio.io/templates": "sidecar"}))
    assert sidecar_pod["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"


@pytest.mark.parametrize("templates", ["custom", "sidecar,gateway", "", "gateway,spire"])
def test_a_template_not_built_in_is_refused_by_name(templates: str) -> None:
    from injector.injection.overrides import InvalidAnnotation

    with pytest.raises(InvalidAnnotation) as refused:
        sidecar.build(pod(annotations={"inject.istio.io/templates": templates}), MESH)
    assert refused.value.annotation == "inject.istio.io/templates"
