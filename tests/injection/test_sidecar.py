from __future__ import annotations

import json
from typing import Any

import pytest

from injector.injection.sidecar import InvalidAnnotation, NameConflict, build, workload_name
from injector.mesh.config import MeshConfig
from injector.traffic.iptables import TrafficOptions
from tests.support.pods import pod, replicaset_pod

MESH = MeshConfig()


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_the_init_container_programs_iptables_with_istio_defaults() -> None:
    init = build(pod(), MESH).init_container
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
    proxy = build(pod(), MESH).proxy_container
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
    env = env_of(build(pod(), mesh).proxy_container)
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["INSTANCE_IP"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["SERVICE_ACCOUNT"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
    assert env["CA_ADDR"] == "ca.mesh:8443"
    assert env["TRUST_DOMAIN"] == "example.org"
    assert env["MESH_CIDRS"] == "10.0.0.0/8"
    assert env["MTLS_MODE"] == "STRICT"


def test_the_proxy_mounts_every_added_volume() -> None:
    injection = build(pod(), MESH)
    volumes = {volume["name"]: volume for volume in injection.volumes}
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
    mounted = {mount["name"] for mount in injection.proxy_container["volumeMounts"]}
    assert mounted == set(volumes)


def test_status_and_default_container_annotations() -> None:
    injection = build(pod(containers=[{"name": "shop", "image": "a"},
                                      {"name": "cache", "image": "b"}]), MESH)
    status = json.loads(injection.annotations["sidecar.istio.io/status"])
    assert status == {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": ["workload-certs", "istio-envoy", "istio-data", "istio-podinfo",
                    "istio-token", "istiod-ca-cert"],
        "revision": "default",
    }
    assert injection.annotations["kubectl.kubernetes.io/default-container"] == "shop"
    assert injection.annotations["prometheus.io/scrape"] == "true"
    assert injection.annotations["prometheus.io/port"] == "15090"
    assert injection.annotations["prometheus.io/path"] == "/stats/prometheus"


def test_the_pods_own_prometheus_and_default_container_annotations_win() -> None:
    injection = build(pod(annotations={"prometheus.io/port": "9090",
                                       "kubectl.kubernetes.io/default-container": "app"}), MESH)
    assert not any(key.startswith("prometheus.io/") for key in injection.annotations)
    assert "kubectl.kubernetes.io/default-container" not in injection.annotations


@pytest.mark.parametrize(
    ("labels", "name", "revision"),
    [
        ({"app.kubernetes.io/name": "cart", "app": "x", "app.kubernetes.io/version": "2.1",
          "version": "v9"}, "cart", "2.1"),
        ({"app": "cart", "version": "v3"}, "cart", "v3"),
        ({}, "web-7d4b9c-x2x9z", "latest"),
    ],
)
def test_canonical_labels(labels: dict[str, str], name: str, revision: str) -> None:
    added = build(pod(labels=labels), MESH).labels
    assert added["security.istio.io/tlsMode"] == "istio"
    assert added["service.istio.io/canonical-name"] == name
    assert added["service.istio.io/canonical-revision"] == revision


def test_a_replicaset_pod_is_named_after_its_deployment() -> None:
    unlabelled = replicaset_pod()
    del unlabelled["metadata"]["labels"]["app"]
    assert workload_name(unlabelled) == "reviews-v1"
    assert build(unlabelled, MESH).labels["service.istio.io/canonical-name"] == "reviews-v1"


def test_native_sidecars_run_the_proxy_as_a_restartable_init_container() -> None:
    for injection in (build(pod(), MeshConfig(native_sidecars=True)),
                      build(pod(annotations={"sidecar.istio.io/nativeSidecar": "true"}), MESH)):
        assert injection.native
        assert injection.proxy_container["restartPolicy"] == "Always"
        assert injection.proxy_container["startupProbe"]["httpGet"]["port"] == 15021
        status = json.loads(injection.annotations["sidecar.istio.io/status"])
        assert status["initContainers"] == ["istio-init", "istio-proxy"]
        assert status["containers"] == []


def test_hold_application_adds_a_post_start_wait() -> None:
    held = build(pod(annotations={
        "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\n"}), MESH)
    assert held.hold
    assert held.proxy_container["lifecycle"]["postStart"]["exec"]["command"] == [
        "injector", "agent", "wait"]
    not_held = build(pod(annotations={
        "proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": false}'}), MESH)
    assert not not_held.hold and "lifecycle" not in not_held.proxy_container


def test_resource_and_image_overrides() -> None:
    injection = build(pod(annotations={
        "sidecar.istio.io/proxyImage": "registry.local/injector:dev",
        "sidecar.istio.io/proxyCPU": "250m",
        "sidecar.istio.io/proxyMemory": "256Mi",
        "sidecar.istio.io/proxyCPULimit": "1",
        "sidecar.istio.io/proxyMemoryLimit": "512Mi",
        "sidecar.istio.io/logLevel": "debug",
    }), MESH)
    proxy = injection.proxy_container
    assert proxy["image"] == "registry.local/injector:dev"
    assert proxy["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                  "limits": {"cpu": "1", "memory": "512Mi"}}
    assert proxy["args"] == ["--log-level", "debug"]
    # The init container keeps the mesh's image: only the proxy's is overridden.
    assert injection.init_container["image"] == MESH.proxy_image


def test_traffic_annotations_reach_the_init_container() -> None:
    injection = build(pod(annotations={
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::/8",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/32",
        "traffic.sidecar.istio.io/includeInboundPorts": "8080,9090",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9100",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
    }), MESH)
    args = injection.init_container["args"]
    assert args[args.index("-i") + 1] == "10.0.0.0/8,fd00::/8"
    assert args[args.index("-x") + 1] == "10.96.0.1/32"
    assert args[args.index("-b") + 1] == "8080,9090"
    assert args[args.index("-d") + 1] == "15090,15021,15020,9100"
    assert args[args.index("-o") + 1] == "5432,6379"


def test_default_traffic_args_match_the_shared_options_model() -> None:
    assert build(pod(), MESH).init_container["args"] == TrafficOptions().to_args()


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("sidecar.istio.io/proxyCPU", "lots"),
        ("sidecar.istio.io/proxyMemory", "1Gb"),
        ("sidecar.istio.io/proxyCPULimit", "-1"),
        ("sidecar.istio.io/proxyMemoryLimit", ""),
        ("sidecar.istio.io/proxyCPU", "3"),  # over the default 2000m limit
        ("sidecar.istio.io/logLevel", "verbose"),
        ("sidecar.istio.io/mtlsMode", "DISABLE"),
        ("sidecar.istio.io/nativeSidecar", "maybe"),
        ("sidecar.istio.io/proxyImage", " "),
        ("proxy.istio.io/config", "holdApplicationUntilProxyStarts: [yes"),
        ("proxy.istio.io/config", "holdApplicationUntilProxyStarts: 1"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "not-a-cidr"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "80,http"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "70000"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "0"),
    ],
)
def test_a_malformed_override_is_refused_by_name(annotation: str, value: str) -> None:
    with pytest.raises(InvalidAnnotation) as refused:
        build(pod(annotations={annotation: value}), MESH)
    assert refused.value.annotation == annotation
    assert annotation in str(refused.value)


@pytest.mark.parametrize(
    "conflicting",
    [
        pod(volumes=[{"name": "istio-envoy", "emptyDir": {}}]),
        pod(init_containers=[{"name": "istio-init", "image": "busybox"}]),
    ],
)
def test_a_pod_using_the_sidecars_names_is_refused(conflicting: dict) -> None:
    with pytest.raises(NameConflict):
        build(conflicting, MESH)


@pytest.mark.parametrize(
    ("metadata", "name"),
    [
        ({"name": "web-1", "ownerReferences": True}, "web-1"),
        ({"name": "web-1", "ownerReferences": [{"controller": True, "name": 7}]}, "web-1"),
        ({"name": {"not": "a name"}, "generateName": "batch-"}, "batch"),
        ({"name": 12}, "unknown"),
    ],
)
def test_a_malformed_owner_or_name_never_breaks_injection(metadata: dict, name: str) -> None:
    malformed = pod()
    malformed["metadata"] = metadata
    assert workload_name(malformed) == name
    assert build(malformed, MESH).labels["service.istio.io/canonical-name"] == name


def test_canonical_names_are_valid_label_values() -> None:
    long_pod = pod(name="a" * 70 + "-0")
    assert build(long_pod, MESH).labels["service.istio.io/canonical-name"] == "a" * 63
    dotted = pod()
    dotted["metadata"] = {"name": "odd name/with:chars-"}
    assert build(dotted, MESH).labels["service.istio.io/canonical-name"] == "odd-name-with-chars"
