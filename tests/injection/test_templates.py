"""The cached sidecar templates (issue 7's optimisation) change nothing a pod gets."""

from __future__ import annotations

import base64

import orjson
import pytest

from injector.injection import patch, sidecar
from injector.mesh.config import MeshConfig
from tests.support.pods import pod

MESH = MeshConfig()


def test_two_pods_never_share_a_dict() -> None:
    first = sidecar.build(pod(), MESH)
    first.proxy_container["env"].append({"name": "MUTATED", "value": "yes"})
    first.init_container["resources"]["limits"]["cpu"] = "1"
    first.volumes[0]["name"] = "mutated"
    second = sidecar.build(pod(), MESH)
    assert {"name": "MUTATED", "value": "yes"} not in second.proxy_container["env"]
    assert second.init_container["resources"]["limits"]["cpu"] == MESH.resources.cpu_limit
    assert second.volumes[0]["name"] == "workload-certs"
    # Nor do the init and proxy containers of one pod share their resources.
    assert second.init_container["resources"] is not second.proxy_container["resources"]


def test_the_json_form_is_the_same_injection() -> None:
    annotations = {"sidecar.istio.io/proxyCPU": "50m", "sidecar.istio.io/nativeSidecar": "true"}
    as_dicts = sidecar.build(pod(annotations=annotations), MESH)
    as_json = sidecar.build(pod(annotations=annotations), MESH, as_json=True)
    assert orjson.loads(orjson.dumps(as_json.proxy_container)) == as_dicts.proxy_container
    assert orjson.loads(orjson.dumps(as_json.init_container)) == as_dicts.init_container
    assert orjson.loads(orjson.dumps(as_json.volumes)) == as_dicts.volumes
    assert (as_json.labels, as_json.annotations, as_json.native, as_json.hold) == (
        as_dicts.labels, as_dicts.annotations, as_dicts.native, as_dicts.hold)


def test_each_mesh_config_and_override_gets_its_own_template() -> None:
    other = MeshConfig(proxy_image="registry.local/proxy:2", revision="canary")
    assert sidecar.build(pod(), other).proxy_container["image"] == "registry.local/proxy:2"
    assert sidecar.build(pod(), MESH).proxy_container["image"] == MESH.proxy_image
    assert '"revision":"canary"' in sidecar.build(pod(), other).annotations[
        "sidecar.istio.io/status"]
    overridden = pod(annotations={"sidecar.istio.io/proxyImage": "custom:1"})
    assert sidecar.build(overridden, MESH).proxy_container["image"] == "custom:1"
    assert sidecar.build(pod(), MESH).proxy_container["image"] == MESH.proxy_image
    # An annotation that is not an override shares the template, and changes nothing.
    unrelated = pod(annotations={"example.com/team": "payments"})
    assert sidecar.build(unrelated, MESH).proxy_container == sidecar.build(
        pod(), MESH).proxy_container


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_bad_override_is_refused_every_time(attempt: int) -> None:
    bad = pod(annotations={"sidecar.istio.io/proxyCPU": "lots"})
    with pytest.raises(sidecar.InvalidAnnotation, match="proxyCPU"):
        sidecar.build(bad, MESH)


PATCH_VARIANTS = {
    "minimal": pod(),
    "labels": pod(labels={"app": "shop", "version": "v2"}),
    "other labels": pod(labels={"app": "cart", "version": "v2"}),
    "annotations": pod(annotations={"example.com/team": "payments"}),
    "prometheus": pod(annotations={"prometheus.io/scrape": "false"}),
    "init and volumes": pod(init_containers=[{"name": "migrate", "image": "flyway:10"}],
                            volumes=[{"name": "config", "configMap": {"name": "shop"}}]),
    "empty init list": pod(init_containers=[]),
    "native": pod(annotations={"sidecar.istio.io/nativeSidecar": "true"},
                  init_containers=[{"name": "migrate", "image": "flyway:10"}]),
    "hold": pod(annotations={"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}),
    "no metadata": {"apiVersion": "v1", "kind": "Pod",
                    "spec": {"containers": [{"name": "app", "image": "nginx"}]}},
}


def test_the_cached_patch_is_the_patch_built_afresh() -> None:
    # Twice over: the second pass answers from the cache.
    for _ in range(2):
        for name, manifest in PATCH_VARIANTS.items():
            fresh = patch.build(manifest, sidecar.build(manifest, MESH))
            cached = patch.encoded(manifest, sidecar.build(manifest, MESH, as_json=True))
            assert orjson.loads(base64.b64decode(cached)) == fresh, name
