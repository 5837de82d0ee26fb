"""The mesh config: Istio's defaults when a key is absent, camelCase keys as Istio writes them,
and a one-line error naming the key for anything that would make wrong pods."""

from __future__ import annotations

import pytest

from injector.errors import ConfigError
from injector.mesh import names
from injector.mesh.config import MeshConfig, load_mesh_config


def test_defaults_are_istios() -> None:
    mesh = load_mesh_config({})
    assert (mesh.proxy_port, mesh.inbound_capture_port, mesh.proxy_uid) == (15001, 15006, 1337)
    assert (mesh.status_port, mesh.agent_port, mesh.prometheus_port) == (15021, 15020, 15090)
    assert mesh.trust_domain == "cluster.local"
    assert mesh.ca_address == "injector.mesh-system.svc:443"
    assert mesh.mesh_cidrs == ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
    assert mesh.mtls_mode == "PERMISSIVE" and mesh.policy == "enabled"
    assert mesh == MeshConfig()


def test_camel_case_keys_as_istio_writes_them() -> None:
    mesh = load_mesh_config({"proxyImage": "registry.local/proxy:2", "proxyUID": 2000,
                             "meshCIDRs": ["10.8.0.0/16"], "includeOutboundIPRanges": "10.0.0.0/8",
                             "resources": {"cpuLimit": "500m"}, "nativeSidecars": True})
    assert mesh.proxy_image == "registry.local/proxy:2"
    assert mesh.proxy_uid == 2000
    assert mesh.mesh_cidrs == ("10.8.0.0/16",)
    assert mesh.include_outbound_ip_ranges == "10.0.0.0/8"
    assert mesh.resources.cpu_limit == "500m" and mesh.resources.memory == "128Mi"
    assert mesh.native_sidecars is True


def test_the_injectors_namespace_is_always_ignored() -> None:
    mesh = load_mesh_config({"ignoredNamespaces": ["legacy"], "injectorNamespace": "mesh"})
    assert mesh.all_ignored_namespaces == {"legacy", "mesh"}
    assert set(names.DEFAULT_IGNORED_NAMESPACES) <= MeshConfig().all_ignored_namespaces


@pytest.mark.parametrize(("data", "where"), [
    ({"proxyImgae": "x"}, "proxyImgae"),  # a typo is not silently ignored
    ({"proxyPort": 70000}, "proxyPort"),
    ({"mtlsMode": "strict-ish"}, "mtlsMode"),
    ({"meshCIDRs": ["10.0.0.0/33"]}, "meshCIDRs"),
    ({"excludeInboundPorts": "80,http"}, "excludeInboundPorts"),
    ({"includeInboundPorts": "*,80"}, "includeInboundPorts"),
    ({"resources": {"cpu": "lots"}}, "resources.cpu"),
    ({"csrBurst": 0}, "csrBurst"),
])
def test_a_bad_value_is_one_line_naming_the_key(data: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_mesh_config(data, source="mesh.yaml")
    message = str(refused.value)
    assert message.startswith(f"mesh.yaml: {where}: ")
    assert "\n" not in message
