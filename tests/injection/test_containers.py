"""istio-init, istio-proxy and their volumes; and the cache of them (issue 7's optimisation),
which must change nothing a pod gets."""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any, NamedTuple

import orjson
import pytest

from injector.injection import containers, overrides, sidecar
from injector.injection.overrides import InvalidAnnotation
from injector.mesh.config import MeshConfig
from injector.traffic.iptables import TrafficOptions
from tests.support.pods import pod

MESH = MeshConfig()


class Made(NamedTuple):
    init: dict[str, Any]
    proxy: dict[str, Any]
    volumes: list[dict[str, Any]]
    status: dict[str, Any]
    native: bool
    hold: bool


def made(annotations: dict[str, Any] | None = None, mesh: MeshConfig = MESH) -> Made:
    """What a pod with these annotations gets under `mesh`, as dicts."""
    template = containers.template(annotations or {}, mesh)
    return Made(orjson.loads(template.init_container), orjson.loads(template.proxy_container),
                 [orjson.loads(volume) for volume in template.volumes],
                 json.loads(template.status), template.native, template.hold)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_the_init_container_programs_iptables_with_istio_defaults() -> None:
    init = made().init
    assert init["name"] == "istio-init"
    assert init["command"] == ["injector", "iptables"]
    args = init["args"]
    assert args[args.index("-p") + 1] == "15001"
    assert args[args.index("-z") + 1] == "15006"
    assert args[args.index("-u") + 1] == "1337"
    assert args[args.index("-d") + 1] == "15090,15021,15020"
    assert init["securityContext"] == {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
    }


def test_the_proxy_container_runs_the_agent_locked_down() -> None:
    proxy = made().proxy
    assert proxy["name"] == "istio-proxy"
    assert proxy["command"][:2] == ["injector", "agent"]
    assert proxy["ports"] == [
        {"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}
    ]
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    assert proxy["readinessProbe"]["httpGet"]["port"] == 15021
    security = proxy["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == 1337
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "restartPolicy" not in proxy and "lifecycle" not in proxy


def test_the_proxy_gets_the_pod_identity_and_mesh_settings_in_its_env() -> None:
    mesh = MeshConfig(trust_domain="example.org", ca_address="ca.mesh:8443",
                      mesh_cidrs=("10.0.0.0/8",), mtls_mode="STRICT")
    env = env_of(made(mesh=mesh).proxy)
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["INSTANCE_IP"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["SERVICE_ACCOUNT"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
    assert env["CA_ADDR"] == "ca.mesh:8443"
    assert env["TRUST_DOMAIN"] == "example.org"
    assert env["MESH_CIDRS"] == "10.0.0.0/8"
    assert env["MTLS_MODE"] == "STRICT"


def test_the_proxy_mounts_every_added_volume() -> None:
    parts = made()
    volumes = {volume["name"]: volume for volume in parts.volumes}
    assert list(volumes) == ["workload-certs", "istio-envoy", "istio-data", "istio-podinfo",
                             "istio-token", "istiod-ca-cert"]
    assert volumes["workload-certs"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["istio-envoy"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["istio-data"]["emptyDir"] == {}
    assert [item["fieldRef"]["fieldPath"] for item in volumes["istio-podinfo"]["downwardAPI"][
        "items"]] == ["metadata.labels", "metadata.annotations"]
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca" and token["expirationSeconds"] == 43200
    assert volumes["istiod-ca-cert"]["configMap"] == {"name": "istio-ca-root-cert"}
    mounted = {mount["name"] for mount in parts.proxy["volumeMounts"]}
    assert mounted == set(volumes)


def test_the_status_lists_what_was_added() -> None:
    assert made().status == {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": ["workload-certs", "istio-envoy", "istio-data", "istio-podinfo",
                    "istio-token", "istiod-ca-cert"],
        "revision": "default",
    }


def test_native_sidecars_run_the_proxy_as_a_restartable_init_container() -> None:
    for parts in (made(mesh=MeshConfig(native_sidecars=True)),
                  made({"sidecar.istio.io/nativeSidecar": "true"})):
        assert parts.native
        assert parts.proxy["restartPolicy"] == "Always"
        assert parts.proxy["startupProbe"]["httpGet"]["port"] == 15021
        assert parts.status["initContainers"] == ["istio-init", "istio-proxy"]
        assert parts.status["containers"] == []


def test_every_proxy_has_istios_startup_probe() -> None:
    probe = made().proxy["startupProbe"]
    assert probe == {"httpGet": {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"},
                     "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 600}


def test_the_log_level_annotations_reach_the_agent_as_its_flags() -> None:
    # As Istio's template hands them to pilot-agent (--proxyComponentLogLevel,
    # --log_output_level); the agent passes the first to Envoy, and logs at the second.
    assert made().proxy["args"] == ["--log-level", "warning"]
    proxy = made({"sidecar.istio.io/logLevel": "info",
                  "sidecar.istio.io/componentLogLevel": "misc:error, upstream:debug",
                  "sidecar.istio.io/agentLogLevel": "default:debug,ads:warn"}).proxy
    assert proxy["args"] == ["--log-level", "info", "--component-log-level",
                             "misc:error,upstream:debug", "--agent-log-level",
                             "default:debug,ads:warn"]


def test_a_gateways_proxy_is_sized_by_its_deployment_and_not_restarted_for_readiness() -> None:
    # Istio's gateway template: no resources of ours (the gateway's Deployment sizes its
    # istio-proxy; a default limit must not sit beside the requests it set) and no startup
    # probe; the readiness probe as every proxy's.
    gateway = orjson.loads(containers.template({"inject.istio.io/templates": "gateway"},
                                               MESH).proxy_container)
    assert "resources" not in gateway or gateway["resources"] == {}
    assert "startupProbe" not in gateway
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    # Its agent runs Envoy as a router (pilot-agent's `proxy router` in Istio's template).
    assert gateway["args"] == ["--log-level", "warning", "--proxy-type", "router"]
    assert "--proxy-type" not in made().proxy["args"]
    # The resource annotations, when a gateway has them, are still the ones it gets.
    sized = orjson.loads(containers.template({"inject.istio.io/templates": "gateway",
                                              "sidecar.istio.io/proxyCPU": "500m"},
                                             MESH).proxy_container)
    assert sized["resources"] == {"requests": {"cpu": "500m"}}
    assert made().proxy["resources"]["limits"]  # a sidecar keeps the mesh's defaults


def test_hold_application_adds_a_post_start_wait() -> None:
    held = made({"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\n"})
    assert held.hold
    assert held.proxy["lifecycle"]["postStart"]["exec"]["command"] == [
        "injector", "agent", "wait"]
    not_held = made({"proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": false}'})
    assert not not_held.hold and "lifecycle" not in not_held.proxy


def test_resource_and_image_overrides() -> None:
    parts = made({
        "sidecar.istio.io/proxyImage": "registry.local/injector:dev",
        "sidecar.istio.io/proxyCPU": "250m",
        "sidecar.istio.io/proxyMemory": "256Mi",
        "sidecar.istio.io/proxyCPULimit": "1",
        "sidecar.istio.io/proxyMemoryLimit": "512Mi",
        "sidecar.istio.io/logLevel": "debug",
    })
    assert parts.proxy["image"] == "registry.local/injector:dev"
    resources = {"requests": {"cpu": "250m", "memory": "256Mi"},
                 "limits": {"cpu": "1", "memory": "512Mi"}}
    assert parts.proxy["resources"] == parts.init["resources"] == resources
    assert parts.proxy["args"] == ["--log-level", "debug"]
    # As Istio's template: istio-init follows a proxyImage that names a repository.
    assert parts.init["image"] == "registry.local/injector:dev"


def test_a_bare_proxy_image_name_leaves_istio_init_the_meshs() -> None:
    mesh = MeshConfig(init_image="registry.local/init:1")
    assert made({"sidecar.istio.io/proxyImage": "injector:dev"}, mesh).init["image"] == (
        "registry.local/init:1")
    assert made({"sidecar.istio.io/proxyImage": "other.registry/proxy:2"}, mesh).init[
        "image"] == "other.registry/proxy:2"


@pytest.mark.parametrize(
    ("annotations", "resources"),
    [
        ({"sidecar.istio.io/proxyCPU": "4"}, {"requests": {"cpu": "4"}}),
        ({"sidecar.istio.io/proxyMemory": "2Gi", "sidecar.istio.io/proxyCPULimit": "3"},
         {"requests": {"memory": "2Gi"}, "limits": {"cpu": "3"}}),
        ({"sidecar.istio.io/proxyMemoryLimit": "64Mi"}, {"limits": {"memory": "64Mi"}}),
    ],
)
def test_the_resource_annotations_set_are_the_only_resources(
        annotations: dict[str, str], resources: dict[str, Any]) -> None:
    # As Istio: `proxyCPU: "4"` is not mixed with (and refused by) the default 2000m limit.
    parts = made(annotations)
    assert parts.proxy["resources"] == parts.init["resources"] == resources


def test_traffic_annotations_reach_the_init_container() -> None:
    args = made({
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::/8",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/32",
        "traffic.sidecar.istio.io/includeInboundPorts": "8080,9090",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9100",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
    }).init["args"]
    assert args[args.index("-i") + 1] == "10.0.0.0/8,fd00::/8"
    assert args[args.index("-x") + 1] == "10.96.0.1/32"
    assert args[args.index("-b") + 1] == "8080,9090"
    assert args[args.index("-d") + 1] == "15090,15021,15020,9100"
    assert args[args.index("-o") + 1] == "5432,6379"


def test_every_other_traffic_annotation_reaches_the_init_container_as_istio_passes_it() -> None:
    args = made({
        "traffic.sidecar.istio.io/includeOutboundPorts": "3306, 5432",
        "traffic.sidecar.istio.io/excludeInterfaces": "eth1,net2",
        "traffic.sidecar.istio.io/kubevirtInterfaces": "k6t-eth0",
        # Host bits kept as written, as Istio passes the annotation on.
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/12",
    }).init["args"]
    assert args[args.index("-q") + 1] == "3306,5432"
    assert args[args.index("-c") + 1] == "eth1,net2"
    assert args[args.index("-k") + 1] == "k6t-eth0"
    assert args[args.index("-x") + 1] == "10.96.0.1/12"
    assert args[args.index("-m") + 1] == "REDIRECT"


def test_reroute_virtual_interfaces_wins_over_kubevirt_interfaces() -> None:
    args = made({"traffic.sidecar.istio.io/kubevirtInterfaces": "old0",
                 "istio.io/reroute-virtual-interfaces": "new0"}).init["args"]
    assert args[args.index("-k") + 1] == "new0"


@pytest.mark.parametrize("native", ["false", "true"])
def test_interception_mode_none_means_no_istio_init(native: str) -> None:
    template = containers.template({"sidecar.istio.io/interceptionMode": "NONE",
                                    "sidecar.istio.io/nativeSidecar": native}, MESH)
    assert template.init_container is None
    status = json.loads(template.status)
    assert "istio-init" not in status["initContainers"]
    injected = sidecar.build(pod(), MESH)
    assert injected.init_container is not None  # REDIRECT, the default, keeps it


@pytest.mark.parametrize("native", [False, True])
def test_status_port_0_removes_the_proxys_probes(native: bool) -> None:
    annotations = {"status.sidecar.istio.io/port": "0",
                   "sidecar.istio.io/nativeSidecar": str(native).lower()}
    proxy = made(annotations).proxy
    assert "readinessProbe" not in proxy and "startupProbe" not in proxy
    assert "readinessProbe" in made().proxy


def test_the_readiness_annotations_set_the_probes_timings() -> None:
    parts = made({"readiness.status.sidecar.istio.io/initialDelaySeconds": "5",
                  "readiness.status.sidecar.istio.io/periodSeconds": "15",
                  "readiness.status.sidecar.istio.io/failureThreshold": "4",
                  "readiness.status.sidecar.istio.io/applicationPorts": "8080,9090"})
    probe = parts.proxy["readinessProbe"]
    assert (probe["initialDelaySeconds"], probe["periodSeconds"], probe["failureThreshold"]) == (
        5, 15, 4)
    assert probe["httpGet"]["port"] == 15021


def test_a_status_port_is_excluded_from_inbound_capture() -> None:
    args = made({"status.sidecar.istio.io/port": "15030"}).init["args"]
    assert args[args.index("-d") + 1] == "15090,15021,15020,15030"


def test_proxy_metadata_becomes_env_of_the_proxy_after_its_own() -> None:
    proxy = made({"proxy.istio.io/config": "proxyMetadata: {ZED: '1', ALPHA: two}"}).proxy
    names = [item["name"] for item in proxy["env"]]
    assert names[-2:] == ["ALPHA", "ZED"]
    assert env_of(proxy)["ALPHA"] == "two" and env_of(proxy)["ZED"] == "1"
    assert names[:-2] == [item["name"] for item in made().proxy["env"]]


# Istio's own example (its injector's test data, user-volume.yaml).
USER_VOLUMES = {
    "sidecar.istio.io/userVolume": '{"user-volume-1":{"persistentVolumeClaim":{"claimName":'
    '"pvc-claim"}},"user-volume-2":{"configMap":{"name":"configmap-volume","items":[{"key":'
    '"some-key","path":"/some-path"}]}}}',
    "sidecar.istio.io/userVolumeMount": '{"user-volume-1":{"mountPath":"/mnt/volume-1",'
    '"readOnly":true},"user-volume-2":{"mountPath":"/mnt/volume-2"}}',
}


def test_user_volumes_are_added_and_mounted_in_the_proxy() -> None:
    parts = made(USER_VOLUMES)
    assert parts.volumes[-2:] == [
        {"name": "user-volume-1", "persistentVolumeClaim": {"claimName": "pvc-claim"}},
        {"name": "user-volume-2", "configMap": {"name": "configmap-volume", "items": [
            {"key": "some-key", "path": "/some-path"}]}},
    ]
    assert parts.proxy["volumeMounts"][-2:] == [
        {"name": "user-volume-1", "mountPath": "/mnt/volume-1", "readOnly": True},
        {"name": "user-volume-2", "mountPath": "/mnt/volume-2"},
    ]
    assert parts.status["volumes"][-2:] == ["user-volume-1", "user-volume-2"]


def test_a_user_volume_the_pod_already_has_is_refused() -> None:
    with pytest.raises(sidecar.NameConflict, match="user-volume-1"):
        sidecar.build(pod(annotations=USER_VOLUMES,
                          volumes=[{"name": "user-volume-1", "emptyDir": {}}]), MESH)


def test_the_image_type_varies_the_meshs_images_as_istio_does() -> None:
    mesh = MeshConfig(proxy_image="registry.local/injector:1.2-debug")
    parts = made({"sidecar.istio.io/proxyImageType": "distroless"}, mesh)
    assert parts.proxy["image"] == parts.init["image"] == "registry.local/injector:1.2-distroless"
    assert made({"sidecar.istio.io/proxyImageType": "default"}, mesh).proxy["image"] == (
        "registry.local/injector:1.2")
    # From the ProxyConfig too; the annotation wins.
    config = {"proxy.istio.io/config": "image: {imageType: distroless}"}
    assert made(config, mesh).proxy["image"] == "registry.local/injector:1.2-distroless"
    # A proxyImage of the pod's own is taken as written.
    assert made({"sidecar.istio.io/proxyImage": "other.registry/proxy:9",
                 "sidecar.istio.io/proxyImageType": "distroless"}, mesh).proxy["image"] == (
        "other.registry/proxy:9")


def test_default_traffic_args_match_the_shared_options_model() -> None:
    assert made().init["args"] == TrafficOptions().to_args()


def test_a_separate_init_image_is_used_for_istio_init_only() -> None:
    parts = made(mesh=MeshConfig(init_image="registry.local/init:1"))
    assert parts.init["image"] == "registry.local/init:1"
    assert parts.proxy["image"] == MESH.proxy_image


# --- The cache -----------------------------------------------------------------------------------

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


def test_equal_mesh_configs_share_templates_and_no_other_config_gets_them() -> None:
    first = containers.template({}, MeshConfig(proxy_image="registry.local/equal:1"))
    assert containers.template({}, MeshConfig(proxy_image="registry.local/equal:1")) is first
    # A config made after another is collected may take its place in memory (and its id()):
    # it still gets its own template.
    for index in range(20):
        gc.collect()
        image = f"registry.local/fresh:{index}"
        assert containers.template({}, MeshConfig(proxy_image=image)).proxy_container.count(
            image.encode()) == 1


def test_the_cache_stays_bounded_whatever_pods_carry() -> None:
    cache = containers.TemplateCache()
    meshes = [MeshConfig(revision=f"r{index}") for index in range(cache.MAX_MESHES + 2)]
    for mesh in meshes:
        for index in range(cache.MAX_PER_MESH + 10):
            cache.get((("sidecar.istio.io/proxyImage", f"image:{index}"),), mesh)
    assert len(cache) <= cache.MAX_MESHES * cache.MAX_PER_MESH
    assert len(containers.TEMPLATES) <= cache.MAX_MESHES * cache.MAX_PER_MESH


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_bad_override_is_refused_every_time(attempt: int) -> None:
    bad = pod(annotations={"sidecar.istio.io/proxyCPU": "lots"})
    with pytest.raises(InvalidAnnotation, match="proxyCPU"):
        sidecar.build(bad, MESH)


def test_an_override_that_is_not_a_string_is_refused_not_cached() -> None:
    with pytest.raises(InvalidAnnotation, match="must be a string"):
        containers.template({"sidecar.istio.io/proxyCPU": 1}, MESH)


def retained_by(work: Any) -> int:
    """Bytes still allocated once `work()` is done and its garbage collected."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        work()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


# Overrides at their bounds: a template and key of about 17 KiB, over MAX_ENTRY_BYTES.
def big_overrides(index: int) -> dict[str, str]:
    cidrs = ",".join(f"fd00:{index:x}:5678:9abc:def0:1234:{n:x}:9a00/120"
                     for n in range(overrides.MAX_CIDRS))
    ports = ",".join(str(10000 + n) for n in range(overrides.MAX_PORTS))
    return {
        "sidecar.istio.io/proxyImage": f"registry.local/{'p' * 990}:{index}",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": cidrs,
        "traffic.sidecar.istio.io/includeOutboundIPRanges": cidrs,
        "traffic.sidecar.istio.io/includeInboundPorts": ports,
        "traffic.sidecar.istio.io/excludeInboundPorts": ports,
        "traffic.sidecar.istio.io/excludeOutboundPorts": ports,
        "proxy.istio.io/config": "proxyMetadata: {A: " + "v" * 4070 + "}",
    }


def test_a_template_over_the_entry_bound_is_built_but_not_kept() -> None:
    cache = containers.TemplateCache()
    key = tuple(sorted(big_overrides(0).items()))
    first = cache.get(key, MESH)
    assert first.size + sum(len(name) + len(value) for name, value in key) > (
        cache.MAX_ENTRY_BYTES)
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.get(key, MESH) == first  # built again, the same

    def admit_many() -> None:
        for index in range(60):
            assert sidecar.build(pod(annotations=big_overrides(index)), MESH)

    # Each kept would hold about 30 KiB: 1.8 MB for these, when the cache counted entries.
    assert retained_by(admit_many) < 300_000


def test_the_cache_is_bounded_in_bytes_whatever_pods_carry() -> None:
    cache = containers.TemplateCache()
    for index in range(3 * cache.MAX_PER_MESH):
        key = (("sidecar.istio.io/proxyImage", f"registry.local/{'i' * 1000}:{index}"),)
        cache.get(key, MESH)
        assert cache.bytes <= cache.MAX_BYTES
    assert 0 < len(cache) < cache.MAX_PER_MESH


def test_twenty_7_mib_proxy_images_leave_nothing_behind() -> None:
    # The issue's row: each was kept, twice over (key and template), and RSS grew by 490 MB.
    def admit_images() -> None:
        for index in range(20):
            image = f"registry.local/{index}/" + "i" * (7 * 1024 * 1024)
            with pytest.raises(InvalidAnnotation, match="longer than 1024"):
                sidecar.build(pod(annotations={"sidecar.istio.io/proxyImage": image}), MESH)

    assert retained_by(admit_images) < 1_000_000
