"""The sidecar's Envoy configuration: a pure builder for the bootstrap and the SDS files.

Nothing here touches the filesystem or the network: `build_bootstrap(config)` returns the bootstrap
as a dict and `certificate_secret` / `trust_secret` return the two file-based SDS documents. The
agent writes them as JSON (injector/proxy/volumes.py) and runs Envoy
(injector/proxy/envoy_process.py).

The data plane, as Istio lays it out, for REDIRECT interception (iptables sends the app's outbound
TCP to 15001 and the pod's inbound TCP to 15006; the proxy's own traffic, uid 1337, is not
captured):

- outbound 15001: the `original_dst` listener filter restores where the app meant to go. To a
  destination inside the mesh CIDRs the proxy originates mTLS with the pod's SVID and checks that
  the peer's SPIFFE ID is in the trust domain; anything else passes through as plain TCP. The
  `http_inspector` sniffs the app's plaintext: HTTP is sent with ALPN `istio-http/1.1` (then
  `istio`), other TCP with ALPN `istio`, so the receiving proxy knows what is inside the TLS it
  terminates (listener filters run before TLS is decrypted, so it cannot sniff that itself; this
  is how Istio's proxies tell each other too).
- inbound 15006: `original_dst`, `tls_inspector` and `http_inspector`. TLS offering ALPN `istio…`
  is mesh mTLS: a peer SVID from the trust domain is required; HTTP inside goes through an HTTP
  connection manager that sets `x-forwarded-client-cert` to the peer's identity (any such header
  the client sent is replaced), other TCP is proxied as TCP. In PERMISSIVE mode plaintext passes
  too, HTTP with any `x-forwarded-client-cert` removed; in STRICT mode it matches no filter chain
  and is closed. Upstream connections to the app leave from 127.0.0.6 (::6 for IPv6), which the
  iptables rules let through to the pod's own address without capturing them again.
- 15021 `/healthz/ready` and 15090 `/stats/prometheus`: routes to Envoy's own admin `/ready` and
  `/stats/prometheus`; the admin interface itself listens on 127.0.0.1 only. Envoy opens its
  listeners only once its initial configuration, the SDS secrets included, is loaded, so 15021
  answers 200 only once Envoy holds its certificate; the agent makes it 503 again while that
  certificate has expired unrenewed (admin `/healthcheck/fail`, which `/ready` reports).

Certificates reach Envoy through file-based SDS: each secret is one JSON file in a directory that
Envoy watches (`watched_directory`); the agent writes a new file beside it and renames it over the
old one, the move makes Envoy reload the secret, and a renewal needs no restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from injector.mesh import names
from injector.mesh.network import IpNetwork

MtlsMode = Literal["PERMISSIVE", "STRICT"]
# Istio's proxy types: a sidecar, or a router (a gateway: pilot-agent's `proxy router`).
ProxyType = Literal["sidecar", "router"]
PROXY_TYPES: tuple[ProxyType, ...] = ("sidecar", "router")

CERTIFICATE_SECRET = "default"  # Istio's names for the workload certificate and the roots
TRUST_SECRET = "ROOTCA"
CERTIFICATE_SECRET_FILE = "cert.json"
TRUST_SECRET_FILE = "root.json"

# ALPN between sidecars: what the outbound side offers, what the inbound side matches on.
MESH_ALPN = "istio"
MESH_HTTP_ALPNS: tuple[str, ...] = ("istio-http/1.0", "istio-http/1.1", "istio-h2")
# What Envoy's http_inspector reports for plaintext HTTP.
PLAINTEXT_HTTP_PROTOCOLS: tuple[str, ...] = ("http/1.0", "http/1.1", "h2c")

# Where the proxy's connections to the app come from (Istio's InboundPassthroughBindIpv4/6).
INBOUND_PASSTHROUGH_SOURCE_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_SOURCE_V6 = "::6"

_TYPE = "type.googleapis.com/"
_SECRET_TYPE = _TYPE + "envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True, slots=True)
class Ports:
    """The proxy's ports; Istio's defaults."""

    admin: int = 15000
    outbound: int = names.PROXY_OUTBOUND_PORT
    inbound: int = names.INBOUND_CAPTURE_PORT
    status: int = names.STATUS_PORT
    prometheus: int = names.PROMETHEUS_PORT


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the bootstrap depends on.

    `sds_dir` is the directory (inside the Envoy volume) holding the two SDS files.
    """

    node_id: str
    node_cluster: str
    trust_domain: str
    mesh_cidrs: tuple[IpNetwork, ...]
    mtls_mode: MtlsMode
    sds_dir: PurePosixPath
    ports: Ports = field(default_factory=Ports)
    connect_timeout_seconds: float = 10.0
    # How long the inspectors wait for the client's first bytes. A server-first protocol (the
    # client sends nothing until the server speaks) waits this long before it is treated as TCP;
    # a client slower than this is treated as TCP too (Istio waits 100 ms; we are more patient).
    protocol_detection_timeout_seconds: float = 1.0
    drain_seconds: float = 5.0
    # The pod has IPv6: every listener also binds `::` (IPv6 only; 0.0.0.0 keeps IPv4), so
    # connections the ip6tables rules redirect find the proxy. Off when IPv6 is disabled, since
    # Envoy refuses to start on an address it cannot bind.
    ipv6: bool = False
    # Istio's proxy types: `sidecar`, or `router`, a gateway (pilot-agent's `proxy router`):
    # the pod's main container, whose traffic nothing captures, so without the capture
    # listeners (outbound and inbound), which would only hold ports open.
    proxy_type: ProxyType = "sidecar"



def node_id(instance_ip: str, pod_name: str, namespace: str,
            proxy_type: ProxyType = "sidecar") -> str:
    """Istio's node ID: `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`, the
    type `sidecar` or `router`."""
    return f"{proxy_type}~{instance_ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local"


# --- building blocks -----------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _bind_all(config: ProxyConfig, port: int) -> dict[str, Any]:
    """`address`, and `additional_addresses` for IPv6, of a listener on every pod address."""
    where: dict[str, Any] = {"address": _socket_address("0.0.0.0", port)}
    if config.ipv6:
        # ipv4_compat stays false: the socket is IPv6-only and does not collide with 0.0.0.0.
        where["additional_addresses"] = [{"address": _socket_address("::", port)}]
    return where


def _sds(config: ProxyConfig, file_name: str) -> dict[str, Any]:
    """A file-based SDS source; a move into the watched directory makes Envoy re-read the file."""
    return {
        "path_config_source": {
            "path": str(config.sds_dir / file_name),
            "watched_directory": {"path": str(config.sds_dir)},
        },
        "resource_api_version": "V3",
    }


def _common_tls_context(config: ProxyConfig, alpn: Sequence[str]) -> dict[str, Any]:
    """Our SVID, the trust bundle, and the peer check: a URI SAN inside our trust domain.

    The trailing `/` matters: `spiffe://cluster.local.evil/...` must not pass for
    `spiffe://cluster.local`.
    """
    return {
        "alpn_protocols": list(alpn),
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [
            {"name": CERTIFICATE_SECRET, "sds_config": _sds(config, CERTIFICATE_SECRET_FILE)}
        ],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI",
                     "matcher": {"prefix": f"spiffe://{config.trust_domain}/"}}
                ]
            },
            "validation_context_sds_secret_config": {
                "name": TRUST_SECRET, "sds_config": _sds(config, TRUST_SECRET_FILE)
            },
        },
    }


def _upstream_mtls(config: ProxyConfig, alpn: Sequence[str]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": _common_tls_context(config, alpn),
        },
    }


def _downstream_mtls(config: ProxyConfig, alpn: Sequence[str]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls_context(config, alpn),
        },
    }


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    }


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router",
            # The app sees its own responses' headers, not Envoy's timing headers.
            "suppress_envoy_headers": True,
        },
    }


def _http_connection_manager(
    stat_prefix: str, routes: list[dict[str, Any]], **settings: Any
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3."
                             "HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "server_header_transformation": "PASS_THROUGH",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": routes}],
            },
            "http_filters": [_router()],
            **settings,
        },
    }


def _to_app() -> list[dict[str, Any]]:
    # No route timeout: a long poll or a stream to the app is the app's business.
    return [{"match": {"prefix": "/"},
             "route": {"cluster": "inbound_passthrough", "timeout": "0s"}}]


def _prefix_ranges(cidrs: Sequence[IpNetwork]) -> list[dict[str, Any]]:
    return [
        {"address_prefix": str(cidr.network_address), "prefix_len": cidr.prefixlen}
        for cidr in cidrs
    ]


def _listener_filter(name: str, type_name: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": _TYPE + type_name}}


def _original_dst() -> dict[str, Any]:
    return _listener_filter("envoy.filters.listener.original_dst",
                            "envoy.extensions.filters.listener.original_dst.v3.OriginalDst")


def _tls_inspector() -> dict[str, Any]:
    return _listener_filter("envoy.filters.listener.tls_inspector",
                            "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector")


def _http_inspector() -> dict[str, Any]:
    return _listener_filter("envoy.filters.listener.http_inspector",
                            "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector")


# --- listeners -----------------------------------------------------------------------------------

def _outbound_listener(config: ProxyConfig) -> dict[str, Any]:
    chains: list[dict[str, Any]] = []
    if config.mesh_cidrs:  # no CIDRs: nothing is upgraded (an empty range list matches all)
        mesh = _prefix_ranges(config.mesh_cidrs)
        chains = [
            {
                "name": "outbound_mtls_http",
                "filter_chain_match": {"prefix_ranges": mesh,
                                       "application_protocols": list(PLAINTEXT_HTTP_PROTOCOLS)},
                "filters": [_tcp_proxy("outbound_mtls_http", "outbound_mtls_http")],
            },
            {
                "name": "outbound_mtls_tcp",
                "filter_chain_match": {"prefix_ranges": mesh},
                "filters": [_tcp_proxy("outbound_mtls_tcp", "outbound_mtls_tcp")],
            },
        ]
    return {
        "name": "virtualOutbound",
        **_bind_all(config, config.ports.outbound),
        "traffic_direction": "OUTBOUND",
        "listener_filters": [_original_dst(), _http_inspector()],
        "listener_filters_timeout": _duration(config.protocol_detection_timeout_seconds),
        "continue_on_listener_filters_timeout": True,
        "filter_chains": chains,
        "default_filter_chain": {
            "name": "outbound_passthrough",
            "filters": [_tcp_proxy("outbound_passthrough", "outbound_passthrough")],
        },
    }


def _inbound_listener(config: ProxyConfig) -> dict[str, Any]:
    chains: list[dict[str, Any]] = [
        {
            "name": "inbound_mtls_http",
            "filter_chain_match": {"transport_protocol": "tls",
                                   "application_protocols": list(MESH_HTTP_ALPNS)},
            "transport_socket": _downstream_mtls(
                config, ("istio-http/1.1", "istio-http/1.0", "istio-h2", "h2", "http/1.1")),
            "filters": [_http_connection_manager(
                "inbound_mtls_http", _to_app(),
                # The app learns who called: the verified peer's SPIFFE ID, and nothing a
                # client put in the header itself.
                forward_client_cert_details="SANITIZE_SET",
                set_current_client_cert_details={"uri": True},
            )],
        },
        {
            "name": "inbound_mtls_tcp",
            "filter_chain_match": {"transport_protocol": "tls",
                                   "application_protocols": [MESH_ALPN]},
            "transport_socket": _downstream_mtls(config, (MESH_ALPN,)),
            "filters": [_tcp_proxy("inbound_mtls_tcp", "inbound_passthrough")],
        },
    ]
    listener: dict[str, Any] = {
        "name": "virtualInbound",
        **_bind_all(config, config.ports.inbound),
        "traffic_direction": "INBOUND",
        "listener_filters": [_original_dst(), _tls_inspector(), _http_inspector()],
        "listener_filters_timeout": _duration(config.protocol_detection_timeout_seconds),
        "continue_on_listener_filters_timeout": True,
        "filter_chains": chains,
    }
    if config.mtls_mode == "PERMISSIVE":
        chains.append({
            "name": "inbound_plaintext_http",
            "filter_chain_match": {"transport_protocol": "raw_buffer",
                                   "application_protocols": list(PLAINTEXT_HTTP_PROTOCOLS)},
            "filters": [_http_connection_manager(
                "inbound_plaintext_http", _to_app(),
                # Plaintext proves no identity: a client-supplied header is removed.
                forward_client_cert_details="SANITIZE",
            )],
        })
        # Everything else (plain TCP, TLS that is not the mesh's) passes through untouched.
        listener["default_filter_chain"] = {
            "name": "inbound_passthrough",
            "filters": [_tcp_proxy("inbound_passthrough", "inbound_passthrough")],
        }
    return listener


def _admin_route_listener(config: ProxyConfig, name: str, port: int,
                          routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        **_bind_all(config, port),
        "filter_chains": [{"filters": [_http_connection_manager(name, routes)]}],
    }


def _status_listener(config: ProxyConfig) -> dict[str, Any]:
    return _admin_route_listener(config, "status", config.ports.status, [
        {"match": {"path": "/healthz/ready"},
         "route": {"cluster": "admin", "prefix_rewrite": "/ready"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ])


def _prometheus_listener(config: ProxyConfig) -> dict[str, Any]:
    return _admin_route_listener(config, "prometheus", config.ports.prometheus, [
        {"match": {"path": "/stats/prometheus"}, "route": {"cluster": "admin"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ])


# --- clusters ------------------------------------------------------------------------------------

def _original_dst_cluster(config: ProxyConfig, name: str, **extra: Any) -> dict[str, Any]:
    """Connects to wherever the downstream connection was originally going."""
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": _duration(config.connect_timeout_seconds),
        **extra,
    }


def _clusters(config: ProxyConfig) -> list[dict[str, Any]]:
    return [
        _original_dst_cluster(config, "outbound_passthrough"),
        _original_dst_cluster(config, "outbound_mtls_tcp",
                              transport_socket=_upstream_mtls(config, (MESH_ALPN,))),
        _original_dst_cluster(config, "outbound_mtls_http",
                              transport_socket=_upstream_mtls(
                                  config, ("istio-http/1.1", MESH_ALPN))),
        _original_dst_cluster(
            config, "inbound_passthrough",
            upstream_bind_config={
                "source_address": {"address": INBOUND_PASSTHROUGH_SOURCE_V4, "port_value": 0},
                "extra_source_addresses": [{"address": {
                    "address": INBOUND_PASSTHROUGH_SOURCE_V6, "port_value": 0}}],
            },
            # HTTP/2 from the caller stays HTTP/2 to the app, HTTP/1.1 stays HTTP/1.1.
            typed_extension_protocol_options={
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "use_downstream_protocol_config": {},
                }
            },
        ),
        {
            "name": "admin",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "admin",
                "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": _socket_address("127.0.0.1", config.ports.admin)}}]}],
            },
        },
    ]


# --- the documents -------------------------------------------------------------------------------

def build_bootstrap(config: ProxyConfig) -> dict[str, Any]:
    """The Envoy bootstrap for one sidecar (or a router: the same, less the capture
    listeners)."""
    capture = ([_outbound_listener(config), _inbound_listener(config)]
               if config.proxy_type == "sidecar" else [])
    return {
        "node": {"id": config.node_id, "cluster": config.node_cluster},
        "admin": {"address": _socket_address("127.0.0.1", config.ports.admin)},
        "static_resources": {
            "listeners": [
                *capture,
                _status_listener(config),
                _prometheus_listener(config),
            ],
            "clusters": _clusters(config),
        },
        # No practical limit, but a configured one: Envoy warns at every start without it.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3."
                                 "DownstreamConnectionsConfig",
                "max_active_downstream_connections": 1_000_000,
            },
        }]},
    }


def certificate_secret(certificate_chain_pem: str, private_key_pem: str) -> dict[str, Any]:
    """The SDS file holding the SVID: leaf first, then intermediates, and its key."""
    return {"resources": [{
        "@type": _SECRET_TYPE,
        "name": CERTIFICATE_SECRET,
        "tls_certificate": {
            "certificate_chain": {"inline_string": certificate_chain_pem},
            "private_key": {"inline_string": private_key_pem},
        },
    }]}


def trust_secret(roots_pem: str) -> dict[str, Any]:
    """The SDS file holding the trust bundle that peers' SVIDs must chain to."""
    return {"resources": [{
        "@type": _SECRET_TYPE,
        "name": TRUST_SECRET,
        "validation_context": {"trusted_ca": {"inline_string": roots_pem}},
    }]}


ENVOY_LOG_LEVELS: dict[str, str] = {
    "trace": "trace", "debug": "debug", "info": "info", "warning": "warning",
    "error": "error", "critical": "critical", "off": "off",
}
# Envoy's `--component-log-level` takes spdlog's names, `warn` among them.
_COMPONENT_LEVELS = frozenset({*ENVOY_LOG_LEVELS, "warn"})
MAX_COMPONENT_LOG_LEVEL_CHARS = 4096


def component_log_levels(text: str) -> str:
    """Envoy's per-component levels (`upstream:debug,misc:error`, Istio's componentLogLevel)
    as Envoy's `--component-log-level` takes them, spaces dropped. Raises ValueError saying
    which pair is malformed. A component Envoy does not have is Envoy's to refuse: its
    components differ between versions, and it names the one it does not know."""
    if len(text) > MAX_COMPONENT_LOG_LEVEL_CHARS:
        raise ValueError(f"longer than {MAX_COMPONENT_LOG_LEVEL_CHARS} characters")
    pairs = [item.strip() for item in text.split(",")]
    for pair in pairs:
        component, colon, level = pair.partition(":")
        if not (colon and component and level in _COMPONENT_LEVELS
                and component.replace("_", "").isalnum() and component.isascii()
                and component == component.lower()):
            raise ValueError(f"{pair[:64]!r} is not a component:level pair (levels: "
                             f"{', '.join(sorted(_COMPONENT_LEVELS))})")
    return ",".join(pairs)


def envoy_command(
    envoy_binary: str, bootstrap_path: str, log_level: str, config: ProxyConfig,
    concurrency: int = 2, component_log_level: str | None = None,
) -> list[str]:
    """Envoy's command line. No hot restart: the agent restarts nothing, and without it Envoy
    needs no shared memory, so several Envoys can run on one host. `component_log_level`
    (checked by `component_log_levels`) sets some components apart from `log_level`, as
    pilot-agent passes Istio's componentLogLevel."""
    components = (["--component-log-level", component_log_level] if component_log_level
                  else [])
    return [
        envoy_binary,
        "-c", bootstrap_path,
        "--disable-hot-restart",
        "--log-level", ENVOY_LOG_LEVELS.get(log_level, "warning"),
        *components,
        "--concurrency", str(concurrency),
        "--drain-time-s", str(max(1, round(config.drain_seconds))),
        "--drain-strategy", "immediate",
        "--parent-shutdown-time-s", str(max(2, round(config.drain_seconds)) + 1),
        "--service-node", config.node_id,
        "--service-cluster", config.node_cluster,
    ]
