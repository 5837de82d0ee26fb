"""The mesh config: what every injected pod gets unless its annotations say otherwise.

Read from the `--config` YAML file (camelCase keys, as Istio's mesh config), validated by
pydantic so that a typo or a bad value stops the command with a clear message instead of
producing wrong pods.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from injector.errors import ConfigError
from injector.mesh import names
from injector.mesh.network import parse_cidrs, parse_port_set, parse_ports
from injector.mesh.quantity import parse_quantity


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ProxyResources(_Model):
    cpu: str = "100m"
    memory: str = "128Mi"
    cpu_limit: str = "2000m"
    memory_limit: str = "1Gi"

    @field_validator("cpu", "memory", "cpu_limit", "memory_limit")
    @classmethod
    def _quantity(cls, value: str) -> str:
        parse_quantity(value)
        return value


class MeshConfig(_Model):
    """Mesh-wide injection settings. Field names are the YAML keys in camelCase."""

    proxy_image: str = "injector:0.1.0"
    init_image: str | None = None  # None: the proxy image, as Istio's proxyv2 serves both
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    proxy_port: int = Field(names.PROXY_OUTBOUND_PORT, ge=1, le=65535)
    inbound_capture_port: int = Field(names.INBOUND_CAPTURE_PORT, ge=1, le=65535)
    status_port: int = Field(names.STATUS_PORT, ge=1, le=65535)
    agent_port: int = Field(names.AGENT_PORT, ge=1, le=65535)
    prometheus_port: int = Field(names.PROMETHEUS_PORT, ge=1, le=65535)
    proxy_uid: int = Field(names.PROXY_UID, ge=1, alias="proxyUID")
    proxy_gid: int = Field(names.PROXY_UID, ge=1, alias="proxyGID")
    resources: ProxyResources = ProxyResources()
    # The sidecar's log level; not `logLevel`, which in a config file is serve's own option.
    proxy_log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = (
        "warning"
    )
    trust_domain: str = names.DEFAULT_TRUST_DOMAIN
    ca_address: str = names.DEFAULT_CA_ADDR
    mesh_cidrs: tuple[str, ...] = Field(names.DEFAULT_MESH_CIDRS, alias="meshCIDRs")
    mtls_mode: Literal["PERMISSIVE", "STRICT"] = "PERMISSIVE"
    injector_namespace: str = names.DEFAULT_NAMESPACE
    ignored_namespaces: tuple[str, ...] = names.DEFAULT_IGNORED_NAMESPACES
    policy: Literal["enabled", "disabled"] = "enabled"
    native_sidecars: bool = False
    # The app's HTTP, TCP and gRPC probes go through the agent (per pod: names.REWRITE_APP_PROBERS).
    rewrite_app_http_probers: bool = Field(True, alias="rewriteAppHTTPProbers")
    # Prometheus scrapes the agent (15020), which merges the app's metrics into Envoy's
    # (per pod: names.PROMETHEUS_MERGE_ANNOTATION); off, it scrapes Envoy on prometheus_port.
    enable_prometheus_merge: bool = True
    revision: str = "default"
    include_outbound_ip_ranges: str = Field("*", alias="includeOutboundIPRanges")
    exclude_outbound_ip_ranges: str = Field("", alias="excludeOutboundIPRanges")
    include_inbound_ports: str = "*"
    exclude_inbound_ports: str = ""
    exclude_outbound_ports: str = ""
    default_ttl_seconds: int = Field(86400, ge=60)
    max_ttl_seconds: int = Field(90 * 86400, ge=60)
    # Certificate requests per identity (service account): a rollout of many replicas renews
    # at once, so the burst is generous; a runaway client is held off with 429 + Retry-After.
    csr_rate_per_second: float = Field(20.0, gt=0)
    csr_burst: int = Field(200, ge=1)

    @field_validator("mesh_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_cidrs(",".join(value))
        return value

    @field_validator("include_outbound_ip_ranges")
    @classmethod
    def _cidr_set(cls, value: str) -> str:
        if value.strip() != "*":
            parse_cidrs(value)
        return value

    @field_validator("exclude_outbound_ip_ranges")
    @classmethod
    def _cidr_list(cls, value: str) -> str:
        parse_cidrs(value)
        return value

    @field_validator("include_inbound_ports")
    @classmethod
    def _port_set(cls, value: str) -> str:
        parse_port_set(value)
        return value

    @field_validator("exclude_inbound_ports", "exclude_outbound_ports")
    @classmethod
    def _port_list(cls, value: str) -> str:
        parse_ports(value)
        return value

    @functools.cached_property
    def all_ignored_namespaces(self) -> frozenset[str]:
        """The ignore list plus the injector's own namespace: it must never wait on itself.
        (Computed once: the decision asks for every pod.)"""
        return frozenset((*self.ignored_namespaces, self.injector_namespace))


def load_mesh_config(data: dict[str, Any], source: str = "config") -> MeshConfig:
    """Validate the mesh config part of a config file, with a one-line message on failure."""
    try:
        return MeshConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}: {first['msg']}{more}") from None
