"""The JSON patch: applied, it gives exactly the meant pod; cached, the patch built afresh."""

from __future__ import annotations

import base64
import copy
import gc
import tracemalloc
from typing import Any

import jsonpatch
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.injection import patch, sidecar
from injector.injection.patch import escape
from injector.mesh.config import MeshConfig
from tests.support.pods import pod

MESH = MeshConfig()

# Keys with the characters RFC 6901 escapes, as real label and annotation keys have them.
keys = st.text(alphabet="ab~/.-_z9", min_size=1, max_size=12)
values = st.text(max_size=20)
names = st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=10).map(
    lambda name: "c" + name
)
absent_null_or_empty = st.sampled_from(["absent", "null", "empty"])


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": draw(names)}
    for field in ("labels", "annotations"):
        shape = draw(st.sampled_from(["absent", "null", "empty", "some"]))
        if shape == "null":
            metadata[field] = None
        elif shape == "empty":
            metadata[field] = {}
        elif shape == "some":
            metadata[field] = draw(st.dictionaries(keys, values, max_size=5))
    annotations = metadata.get("annotations") or {}
    for control in ("sidecar.istio.io/nativeSidecar", "proxy.istio.io/config",
                    "sidecar.istio.io/status"):
        annotations.pop(control, None)
    if draw(st.booleans()):
        metadata.setdefault("annotations", {})
        metadata["annotations"] = {**(metadata["annotations"] or {}),
                                   "sidecar.istio.io/nativeSidecar": "true"}
    elif draw(st.booleans()):
        metadata["annotations"] = {**(metadata.get("annotations") or {}),
                                   "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}
    if draw(st.integers(0, 3)) == 0:
        # No istio-init at all.
        metadata["annotations"] = {**(metadata.get("annotations") or {}),
                                   "sidecar.istio.io/interceptionMode": "NONE"}
    # Container names unique across containers and initContainers, as Kubernetes wants them.
    container_names = draw(st.lists(names, min_size=4, max_size=7, unique=True))
    spec: dict[str, Any] = {
        "containers": [{"name": name, "image": "app:1"}
                       for name in container_names[:draw(st.integers(1, 4))]]
    }
    for field in ("initContainers", "volumes"):
        shape = draw(absent_null_or_empty | st.just("some"))
        if shape == "null":
            spec[field] = None
        elif shape == "empty":
            spec[field] = []
        elif shape == "some":
            items = (container_names[len(spec["containers"]):][:3] if field == "initContainers"
                     else draw(st.lists(names, min_size=1, max_size=3, unique=True)))
            spec[field] = [{"name": name, "image": "init:1"} if field == "initContainers"
                           else {"name": name, "emptyDir": {}} for name in items]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def expected_pod(pod: dict[str, Any], injection: sidecar.Injection) -> dict[str, Any]:
    """What the builder means: the pod's own parts as they were, the additions in place."""
    want = copy.deepcopy(pod)
    metadata, spec = want["metadata"], want["spec"]
    for field, added in (("labels", injection.labels), ("annotations", injection.annotations)):
        if added:
            metadata[field] = {**(metadata.get(field) or {}), **added}
    own_init = spec.get("initContainers") or []
    istio_init = [] if injection.init_container is None else [injection.init_container]
    if injection.native:
        spec["initContainers"] = [*istio_init, injection.proxy_container, *own_init]
    else:
        if istio_init:  # else the pod's own are left as they were (absent, null or a list)
            spec["initContainers"] = [*own_init, *istio_init]
        if injection.hold:
            spec["containers"] = [injection.proxy_container, *spec["containers"]]
        else:
            spec["containers"] = [*spec["containers"], injection.proxy_container]
    spec["volumes"] = [*(spec.get("volumes") or []), *injection.volumes]
    return want


@settings(max_examples=300, deadline=None)
@given(pods())
def test_applying_the_patch_gives_exactly_the_meant_pod(pod: dict[str, Any]) -> None:
    original = copy.deepcopy(pod)
    injection = sidecar.build(pod, MESH)
    ops = patch.build(pod, injection)
    assert jsonpatch.apply_patch(pod, ops) == expected_pod(original, injection)
    assert pod == original, "building the patch must not mutate the pod"


@settings(max_examples=200, deadline=None)
@given(pods())
def test_the_patch_only_adds(pod: dict[str, Any]) -> None:
    ops = patch.build(pod, sidecar.build(pod, MESH))
    assert {op["op"] for op in ops} == {"add"}
    # Whole-list or whole-map adds only where the pod had none to replace.
    for op in ops:
        parts = op["path"].split("/")[1:]
        target: Any = pod
        for part in parts[:-1]:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        last = parts[-1].replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict):
            assert target.get(last) in (None, {}, []) or last not in target, op["path"]


def test_escaping_follows_rfc_6901() -> None:
    assert escape("a/b") == "a~1b"
    assert escape("a~b") == "a~0b"
    assert escape("~1") == "~01"  # `~` first, or `~1` would turn into `/`
    assert escape("/~") == "~1~0"


def test_a_minimal_pod_gets_whole_maps_and_lists() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}}
    ops = patch.build(pod, sidecar.build(pod, MESH))
    paths = [op["path"] for op in ops]
    assert paths == ["/metadata/labels", "/metadata/annotations", "/spec/initContainers",
                     "/spec/containers/-", "/spec/volumes"]


PATCH_VARIANTS = {
    "minimal": pod(),
    "labels": pod(labels={"app": "shop", "version": "v2"}),
    "other labels": pod(labels={"app": "cart", "version": "v2"}),
    "annotations": pod(annotations={"example.com/team": "payments"}),
    "prometheus": pod(annotations={"prometheus.io/scrape": "false"}),
    "merged metrics": pod(annotations={"prometheus.io/port": "9100"}),
    "merged metrics elsewhere": pod(annotations={"prometheus.io/port": "9200"}),
    "merged metrics spelled otherwise": pod(annotations={"prometheus.io.port": "9100"}),
    "merged metrics, native": pod(annotations={"prometheus.io/port": "9100",
                                               "sidecar.istio.io/nativeSidecar": "true"}),
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


def test_the_patch_cache_is_bounded_in_bytes() -> None:
    cache = patch.PatchCache()
    for index in range(3 * cache.MAX_ENTRIES):
        cache.put(("key", index), 5000, 200, "p" * 3000)
        assert cache.bytes <= cache.MAX_BYTES and len(cache) <= cache.MAX_ENTRIES
    cache.put(("big",), 30_000, 0, "p" * 3000)  # over MAX_ENTRY_BYTES with its template
    assert cache.entries.get(("big",)) is None


def test_patches_of_many_kinds_of_pod_hold_a_bounded_memory() -> None:
    # One ReplicaSet's pods share a patch; a cluster of 1,000 apps with long CIDR lists does
    # not keep 1,000 patches of 9 KiB each (9 MB, when the cache counted entries).
    cidrs = ",".join(f"fd00:5678:9abc:def0:1234:5678:{n:x}:9a00/120" for n in range(32))

    def admit_apps() -> None:
        for index in range(1000):
            manifest = pod(labels={"app": f"shop-{index}"}, annotations={
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": cidrs,
                "traffic.sidecar.istio.io/includeOutboundIPRanges": cidrs})
            patch.encoded(manifest, sidecar.build(manifest, MESH, as_json=True))
            assert patch.PATCHES.bytes <= patch.PATCHES.MAX_BYTES

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        admit_apps()
        gc.collect()
        retained = sum(stat.size_diff for stat in
                       tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert retained < 5_000_000


def test_merged_metrics_reach_the_proxys_env_and_prometheus_scrapes_the_agent() -> None:
    """Applied, the patch overwrites the pod's prometheus.io/* to name the agent's 15020 and
    hands the pod's own to istio-proxy in ISTIO_PROMETHEUS_ANNOTATIONS, wherever the proxy is
    (a container, first with hold, or a native sidecar among the init containers)."""
    for extra in ({}, {"sidecar.istio.io/nativeSidecar": "true"},
                  {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}):
        manifest = pod(annotations={"prometheus.io/scrape": "true", "prometheus.io/port": "9100",
                                    "prometheus.io/path": "/app", **extra})
        fresh = patch.build(manifest, sidecar.build(manifest, MESH))
        cached = orjson.loads(base64.b64decode(
            patch.encoded(manifest, sidecar.build(manifest, MESH, as_json=True))))
        for ops in (fresh, cached):
            injected = jsonpatch.apply_patch(manifest, ops)
            annotations = injected["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == "15020", extra
            assert annotations["prometheus.io/path"] == "/stats/prometheus"
            proxy = next(container for field in ("containers", "initContainers")
                         for container in injected["spec"].get(field) or ()
                         if container["name"] == "istio-proxy")
            env = {item["name"]: item.get("value") for item in proxy["env"]}
            assert orjson.loads(env["ISTIO_PROMETHEUS_ANNOTATIONS"]) == {
                "scrape": "true", "path": "/app", "port": "9100"}, extra


def test_merging_removes_the_pods_other_spellings_of_prometheus_annotations() -> None:
    manifest = pod(annotations={"prometheus.io.port": "9100", "example.com/team": "a"})
    cached = orjson.loads(base64.b64decode(
        patch.encoded(manifest, sidecar.build(manifest, MESH, as_json=True))))
    annotations = jsonpatch.apply_patch(manifest, cached)["metadata"]["annotations"]
    assert "prometheus.io.port" not in annotations  # else Prometheus could scrape the app's port
    assert annotations["prometheus.io/port"] == "15020"
    assert annotations["example.com/team"] == "a"
