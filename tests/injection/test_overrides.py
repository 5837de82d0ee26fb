"""A pod's override annotations: read over the mesh config's defaults, or refused by name."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from injector.injection.overrides import (
    ANNOTATIONS,
    MAX_CIDRS,
    MAX_PORTS,
    InvalidAnnotation,
    Resources,
    read,
    traffic_options,
)
from injector.mesh import names
from injector.mesh.config import MeshConfig
from injector.traffic.iptables import TrafficOptions

MESH = MeshConfig()


def test_no_annotations_leave_the_mesh_configs_settings() -> None:
    settings = read({}, MESH)
    assert settings.image == MESH.proxy_image
    assert settings.log_level == MESH.proxy_log_level
    assert settings.mtls_mode == MESH.mtls_mode
    defaults = MESH.resources
    assert settings.resources == Resources(defaults.cpu, defaults.memory, defaults.cpu_limit,
                                           defaults.memory_limit)
    assert not settings.native and not settings.hold
    assert settings.traffic == TrafficOptions()


def test_every_override_is_read() -> None:
    settings = read({
        names.PROXY_IMAGE: " registry.local/injector:dev ",
        names.PROXY_CPU: "250m",
        names.PROXY_MEMORY: " 256Mi",
        names.PROXY_CPU_LIMIT: "1",
        names.PROXY_MEMORY_LIMIT: "512Mi",
        names.LOG_LEVEL: "debug",
        names.MTLS_MODE: "STRICT",
        names.NATIVE_SIDECAR: " True ",
        names.PROXY_CONFIG: "holdApplicationUntilProxyStarts: true\n",
    }, MESH)
    assert settings.image == "registry.local/injector:dev"
    assert settings.resources == Resources("250m", "256Mi", "1", "512Mi")
    assert (settings.log_level, settings.mtls_mode) == ("debug", "STRICT")
    assert settings.native and settings.hold


def test_the_mesh_config_sets_the_defaults_the_annotations_override() -> None:
    mesh = MeshConfig(native_sidecars=True, proxy_image="mesh:1", mtls_mode="STRICT")
    assert read({}, mesh).native
    assert not read({names.NATIVE_SIDECAR: "false"}, mesh).native
    assert read({}, mesh).image == "mesh:1"
    assert read({names.MTLS_MODE: "PERMISSIVE"}, mesh).mtls_mode == "PERMISSIVE"


@pytest.mark.parametrize(
    ("config", "hold"),
    [("holdApplicationUntilProxyStarts: true", True),
     ('{"holdApplicationUntilProxyStarts": false}', False),
     ("", False),
     ("concurrency: 2", False)],
)
def test_hold_comes_from_the_proxy_config_yaml(config: str, hold: bool) -> None:
    assert read({names.PROXY_CONFIG: config}, MESH).hold is hold


def test_traffic_annotations_override_the_mesh_config() -> None:
    options = traffic_options({
        names.INCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8,fd00::/8",
        names.EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.1/32",
        names.INCLUDE_INBOUND_PORTS: "8080,9090",
        names.EXCLUDE_INBOUND_PORTS: "9100",
        names.EXCLUDE_OUTBOUND_PORTS: "5432,6379",
    }, MESH)
    assert [cidr.network for cidr in options.include_outbound_cidrs or ()] == [
        ip_network("10.0.0.0/8"), ip_network("fd00::/8")]
    assert [cidr.network for cidr in options.exclude_outbound_cidrs] == [
        ip_network("10.96.0.1/32")]
    assert options.include_inbound_ports == (8080, 9090)
    assert options.exclude_outbound_ports == (5432, 6379)
    # The proxy's own ports stay excluded: the annotation adds to them.
    assert options.exclude_inbound_ports == (15090, 15021, 15020, 9100)


def test_the_mesh_configs_ports_and_user_reach_the_traffic_options() -> None:
    mesh = MeshConfig(proxy_port=16001, inbound_capture_port=16006, proxy_uid=2000,
                      proxy_gid=2001, status_port=16021, exclude_inbound_ports="15021")
    options = traffic_options({}, mesh)
    assert (options.proxy_port, options.inbound_capture_port) == (16001, 16006)
    assert (options.proxy_uid, options.proxy_gid) == (2000, 2001)
    # Excluded once, however often it is named.
    assert options.exclude_inbound_ports == (15090, 16021, 15020, 15021)


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("sidecar.istio.io/proxyCPU", "lots"),
        ("sidecar.istio.io/proxyMemory", "1Gb"),
        ("sidecar.istio.io/proxyCPULimit", "-1"),
        ("sidecar.istio.io/proxyMemoryLimit", ""),
        ("sidecar.istio.io/proxyMemoryLimit", "1Gi\n1Gi"),
        ("sidecar.istio.io/logLevel", "verbose"),
        ("sidecar.istio.io/mtlsMode", "DISABLE"),
        ("sidecar.istio.io/nativeSidecar", "maybe"),
        ("sidecar.istio.io/proxyImage", " "),
        ("proxy.istio.io/config", "holdApplicationUntilProxyStarts: [yes"),
        ("proxy.istio.io/config", "holdApplicationUntilProxyStarts: 1"),
        ("proxy.istio.io/config", "- a list"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "not-a-cidr"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "80,http"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "70000"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "0"),
        ("traffic.sidecar.istio.io/includeOutboundPorts", "mysql"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0/1"),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "a-name-far-too-long"),
        ("istio.io/reroute-virtual-interfaces", "k6t eth0"),
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("sidecar.istio.io/interceptionMode", "redirect"),
        ("proxy.istio.io/config", "holdApplicationUntilProxyStart: true"),  # a typo
        ("proxy.istio.io/config", "concurrency: two"),
        ("proxy.istio.io/config", "drainDuration: 5"),
        ("proxy.istio.io/config", "proxyMetadata: {DNS_CAPTURE: true}"),
        ("proxy.istio.io/config", "proxyMetadata: {'A=B': x}"),
        ("proxy.istio.io/config", "tracing: [zipkin]"),
        ("proxy.istio.io/config", "interceptionMode: TPROXY"),
        ("proxy.istio.io/config", "image: {imageType: distroless, tag: x}"),
        ("proxy.istio.io/config", "concurrency: 2\nconcurrency: 3"),
        ("sidecar.istio.io/userVolume", "[1]"),
        ("sidecar.istio.io/userVolume", '{"v": {"emptyDir": {}'),
        ("sidecar.istio.io/userVolume", '{"Bad_Name": {"emptyDir": {}}}'),
        ("sidecar.istio.io/userVolume", '{"v": {"name": "w", "emptyDir": {}}}'),
        ("sidecar.istio.io/userVolume", '{"istio-envoy": {"emptyDir": {}}}'),
        ("sidecar.istio.io/userVolumeMount", '{"v": {"readOnly": true}}'),
        ("sidecar.istio.io/userVolumeMount", '{"v": {"mountPath": "relative"}}'),
        ("sidecar.istio.io/proxyImageType", "dist roless"),
        ("sidecar.istio.io/componentLogLevel", "misc:loud"),
        ("sidecar.istio.io/componentLogLevel", "upstream"),
        ("sidecar.istio.io/agentLogLevel", "default:verbose"),
        ("status.sidecar.istio.io/port", "70000"),
        ("status.sidecar.istio.io/port", "-1"),
        ("readiness.status.sidecar.istio.io/initialDelaySeconds", "5s"),
        ("readiness.status.sidecar.istio.io/periodSeconds", "-3"),
        ("readiness.status.sidecar.istio.io/failureThreshold", "2147483648"),
        ("readiness.status.sidecar.istio.io/failureThreshold", "\uff13"),
        ("readiness.status.sidecar.istio.io/applicationPorts", "http"),
    ],
)
def test_a_malformed_override_is_refused_by_name(annotation: str, value: str) -> None:
    with pytest.raises(InvalidAnnotation) as refused:
        read({annotation: value}, MESH)
    assert refused.value.annotation == annotation
    assert annotation in str(refused.value)


@pytest.mark.parametrize("annotation", ANNOTATIONS)
def test_an_override_that_is_not_a_string_is_refused_by_name(annotation: str) -> None:
    with pytest.raises(InvalidAnnotation, match="must be a string") as refused:
        read({annotation: 5}, MESH)
    assert refused.value.annotation == annotation


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        # Istio's template: any resource annotation drops all four of the mesh's defaults.
        ({names.PROXY_CPU: "4"}, Resources("4", None, None, None)),
        ({names.PROXY_MEMORY: "2Gi"}, Resources(None, "2Gi", None, None)),
        ({names.PROXY_MEMORY_LIMIT: "64Mi"}, Resources(None, None, None, "64Mi")),
        ({names.PROXY_CPU: "3", names.PROXY_CPU_LIMIT: "3"}, Resources("3", None, "3", None)),
    ],
)
def test_any_resource_annotation_takes_the_place_of_every_default(
        annotations: dict[str, str], expected: Resources) -> None:
    assert read(annotations, MESH).resources == expected


def test_a_request_above_its_own_limit_names_the_request() -> None:
    with pytest.raises(InvalidAnnotation) as refused:
        read({names.PROXY_MEMORY: "1Gi", names.PROXY_MEMORY_LIMIT: "64Mi"}, MESH)
    assert refused.value.annotation == names.PROXY_MEMORY
    assert "exceeds the limit 64Mi" in str(refused.value)


def test_the_whole_proxy_config_is_read_by_istios_field_names() -> None:
    config = "\n".join([
        "concurrency: 2", "drain_duration: 45s", "terminationDrainDuration: 0.5s",
        "proxyMetadata:", "  ISTIO_META_DNS_CAPTURE: 'true'", "  B_SECOND: x",
        "tracing: {zipkin: {address: zipkin:9411}}", "image: {imageType: distroless}",
        "proxyStatsMatcher: {inclusionPrefixes: [cluster.outbound]}",
        "holdApplicationUntilProxyStarts: true", "interceptionMode: NONE",
    ])
    settings = read({names.PROXY_CONFIG: config}, MESH)
    assert settings.hold
    assert settings.proxy_metadata == (("B_SECOND", "x"), ("ISTIO_META_DNS_CAPTURE", "true"))
    assert not settings.capture  # the ProxyConfig's interceptionMode, when no annotation says
    assert read({names.PROXY_CONFIG: "interceptionMode: NONE",
                 names.INTERCEPTION_MODE: "REDIRECT"}, MESH).capture


def test_an_unknown_proxy_config_field_is_named() -> None:
    with pytest.raises(InvalidAnnotation, match="'holdApplication' is not a field of Istio's "
                                                "ProxyConfig") as refused:
        read({names.PROXY_CONFIG: "holdApplication: true"}, MESH)
    assert refused.value.annotation == names.PROXY_CONFIG


def test_log_levels_of_envoys_components_and_of_the_agent_are_read() -> None:
    settings = read({names.COMPONENT_LOG_LEVEL: "misc:error, upstream:debug",
                     names.AGENT_LOG_LEVEL: "default:info,ads:debug"}, MESH)
    assert settings.component_log_level == "misc:error,upstream:debug"
    assert settings.agent_log_level == "default:info,ads:debug"
    assert read({names.AGENT_LOG_LEVEL: "warn"}, MESH).agent_log_level == "warn"
    unset = read({}, MESH)
    assert (unset.component_log_level, unset.agent_log_level) == (None, None)


def test_an_image_pinned_by_digest_has_no_variant() -> None:
    mesh = MeshConfig(proxy_image="registry.local/injector@sha256:" + "a" * 64)
    with pytest.raises(InvalidAnnotation, match="pinned by digest") as refused:
        read({names.PROXY_IMAGE_TYPE: "distroless"}, mesh)
    assert refused.value.annotation == names.PROXY_IMAGE_TYPE


def test_tproxy_is_refused_naming_what_is_implemented() -> None:
    with pytest.raises(InvalidAnnotation, match="TPROXY is not supported: only REDIRECT") as no:
        read({names.INTERCEPTION_MODE: "TPROXY"}, MESH)
    assert no.value.annotation == names.INTERCEPTION_MODE
    assert not read({names.INTERCEPTION_MODE: "NONE"}, MESH).capture
    assert read({names.INTERCEPTION_MODE: "REDIRECT"}, MESH).capture


def test_of_several_bad_overrides_the_same_one_is_named_every_time() -> None:
    bad = {names.MTLS_MODE: "DISABLE", names.PROXY_CPU: "lots", names.NATIVE_SIDECAR: "maybe"}
    for order in (bad, dict(reversed(bad.items()))):
        with pytest.raises(InvalidAnnotation) as refused:
            read(order, MESH)
        assert refused.value.annotation == names.NATIVE_SIDECAR


@pytest.mark.parametrize(
    ("annotation", "value", "bound"),
    [
        (names.PROXY_CONFIG, "[" + "1," * 130_000 + "1]", "longer than 4096 characters"),
        (names.PROXY_CONFIG, "".join("  " * level + "k:\n" for level in range(20)),
         "deeper than 16"),
        (names.EXCLUDE_OUTBOUND_IP_RANGES, ",".join(["10.0.0.0/8"] * 33), "more than 32"),
        (names.INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8," * 500, "longer than 4096"),
        (names.INCLUDE_INBOUND_PORTS, ",".join(["80"] * 65), "more than 64"),
        (names.EXCLUDE_OUTBOUND_PORTS, " " * 5000, "longer than 4096"),
        (names.PROXY_IMAGE, "registry.local/" + "a" * 1024, "longer than 1024"),
        (names.PROXY_CPU, "1" * 65, "longer than 64"),
        (names.PROXY_CPU, "\uff11\uff10\uff10m", "not a resource quantity"),
        (names.PROXY_MEMORY, "\uff11Gi", "not a resource quantity"),
    ],
)
def test_an_override_past_its_bound_is_refused_unread_with_a_short_message(
        annotation: str, value: str, bound: str) -> None:
    with pytest.raises(InvalidAnnotation, match=bound) as refused:
        read({annotation: value}, MESH)
    assert refused.value.annotation == annotation
    assert len(str(refused.value)) < 400  # the value is cut, its length noted


def test_lists_at_their_bounds_are_read() -> None:
    ranges = ",".join(f"10.{index}.0.0/16" for index in range(MAX_CIDRS))
    ports = ",".join(str(8000 + index) for index in range(MAX_PORTS))
    options = traffic_options({names.EXCLUDE_OUTBOUND_IP_RANGES: ranges,
                               names.INCLUDE_INBOUND_PORTS: ports}, MESH)
    assert len(options.exclude_outbound_cidrs) == MAX_CIDRS == 32
    assert options.include_inbound_ports is not None
    assert len(options.include_inbound_ports) == MAX_PORTS == 64
