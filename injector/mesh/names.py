"""Every Istio name and default the mesh shares, in one place.

The webhook writes these into pods, the agent reads them back, the CA checks the token audience
and the cluster duties keep the objects they name. Istio's users rely on the exact spellings, so
each is written once, here.
"""

from __future__ import annotations

from typing import Final

# --- Labels and annotations: who gets injected, and the record of what was -----------------------
INJECT_LABEL: Final = "sidecar.istio.io/inject"  # also read as an annotation
NAMESPACE_LABEL: Final = "istio-injection"
STATUS_ANNOTATION: Final = "sidecar.istio.io/status"
# The pod's own istio-proxy / istio-init, as merged over the injected ones (JSON).
PROXY_OVERRIDES_ANNOTATION: Final = "proxy.istio.io/overrides"
DEFAULT_CONTAINER_ANNOTATION: Final = "kubectl.kubernetes.io/default-container"
DEFAULT_LOGS_CONTAINER_ANNOTATION: Final = "kubectl.kubernetes.io/default-logs-container"
TLS_MODE_LABEL: Final = "security.istio.io/tlsMode"
CANONICAL_NAME_LABEL: Final = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL: Final = "service.istio.io/canonical-revision"

# --- Per-pod overrides of the mesh config ---------------------------------------------------------
PROXY_IMAGE: Final = "sidecar.istio.io/proxyImage"
PROXY_CPU: Final = "sidecar.istio.io/proxyCPU"
PROXY_MEMORY: Final = "sidecar.istio.io/proxyMemory"
PROXY_CPU_LIMIT: Final = "sidecar.istio.io/proxyCPULimit"
PROXY_MEMORY_LIMIT: Final = "sidecar.istio.io/proxyMemoryLimit"
LOG_LEVEL: Final = "sidecar.istio.io/logLevel"
MTLS_MODE: Final = "sidecar.istio.io/mtlsMode"
NATIVE_SIDECAR: Final = "sidecar.istio.io/nativeSidecar"
PROXY_CONFIG: Final = "proxy.istio.io/config"
# JSON objects: volume name to volume source, and to istio-proxy's mount of it.
USER_VOLUME: Final = "sidecar.istio.io/userVolume"
# Istio's injection templates, comma-separated: `sidecar` (the default) or `gateway` (the proxy
# is the pod's main container: no istio-init, no tlsMode label).
TEMPLATES_ANNOTATION: Final = "inject.istio.io/templates"
TEMPLATES: Final = ("sidecar", "gateway")
# Istio's gateway template lets the pod bind ports under 1024 without a capability: this sysctl,
# at this value, in the pod's securityContext.
UNPRIVILEGED_PORT_SYSCTL: Final = "net.ipv4.ip_unprivileged_port_start"
UNPRIVILEGED_PORT_START: Final = "0"
# A gateway's proxy type (pilot-agent's `proxy router`); a sidecar's is `sidecar`.
ROUTER_PROXY_TYPE: Final = "router"
USER_VOLUME_MOUNT: Final = "sidecar.istio.io/userVolumeMount"
# Image variants: `distroless` or `debug` on the tag of the mesh's images (`default`: none).
PROXY_IMAGE_TYPE: Final = "sidecar.istio.io/proxyImageType"
IMAGE_TYPE_DEFAULT: Final = "default"
KNOWN_IMAGE_TYPES: Final = ("distroless", "debug")
# Envoy's per-component levels (`upstream:debug,misc:error`), handed to Envoy by the agent; and
# pilot-agent's scoped levels (`default:info,ads:debug`), whose `default` scope (or a bare level)
# is our agent's one logger's level.
COMPONENT_LOG_LEVEL: Final = "sidecar.istio.io/componentLogLevel"
AGENT_LOG_LEVEL: Final = "sidecar.istio.io/agentLogLevel"
AGENT_LOG_LEVELS: Final = ("none", "fatal", "error", "warn", "info", "debug")
AGENT_DEFAULT_SCOPE: Final = "default"
# Capture: istio-init's flags (-q, -c, -k, -m); NONE means no istio-init at all.
INCLUDE_OUTBOUND_PORTS: Final = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_INTERFACES: Final = "traffic.sidecar.istio.io/excludeInterfaces"
KUBEVIRT_INTERFACES: Final = "traffic.sidecar.istio.io/kubevirtInterfaces"
REROUTE_VIRTUAL_INTERFACES: Final = "istio.io/reroute-virtual-interfaces"  # wins over kubevirt's
INTERCEPTION_MODE: Final = "sidecar.istio.io/interceptionMode"
INTERCEPTION_REDIRECT: Final = "REDIRECT"
INTERCEPTION_NONE: Final = "NONE"
INTERCEPTION_TPROXY: Final = "TPROXY"  # Istio's; not implemented here, so refused by name
# The proxy's status port (0: no readiness probe) and its readiness probe's settings.
STATUS_PORT_ANNOTATION: Final = "status.sidecar.istio.io/port"
READINESS_INITIAL_DELAY: Final = "readiness.status.sidecar.istio.io/initialDelaySeconds"
READINESS_PERIOD: Final = "readiness.status.sidecar.istio.io/periodSeconds"
READINESS_FAILURE_THRESHOLD: Final = "readiness.status.sidecar.istio.io/failureThreshold"
READINESS_APPLICATION_PORTS: Final = "readiness.status.sidecar.istio.io/applicationPorts"
INCLUDE_OUTBOUND_IP_RANGES: Final = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES: Final = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS: Final = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS: Final = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUTBOUND_PORTS: Final = "traffic.sidecar.istio.io/excludeOutboundPorts"
REWRITE_APP_PROBERS: Final = "sidecar.istio.io/rewriteAppHTTPProbers"

# --- Probe rewriting: kubelet probes the agent, which probes the app (Istio's paths and env) ---
APP_PROBERS_ENV: Final = "ISTIO_KUBE_APP_PROBERS"
APP_HEALTH_PREFIX: Final = "/app-health/"  # then <container>/livez, readyz or startupz
APP_LIFECYCLE_PREFIX: Final = "/app-lifecycle/"  # then <container>/prestopz or poststartz

# --- Metrics merging: Prometheus scrapes the agent, which adds the app's metrics to Envoy's -------
PROMETHEUS_MERGE_ANNOTATION: Final = "prometheus.istio.io/merge-metrics"
PROMETHEUS_SCRAPE_ANNOTATION: Final = "prometheus.io/scrape"
PROMETHEUS_PORT_ANNOTATION: Final = "prometheus.io/port"
PROMETHEUS_PATH_ANNOTATION: Final = "prometheus.io/path"
# Several metrics endpoints of the app, `port:path,...` (Istio's, newer than its API's list):
# handed to the agent with the others, which scrapes them all.
PROMETHEUS_SCRAPE_TARGETS_ANNOTATION: Final = "prometheus.istio.io/scrape-targets"
PROMETHEUS_ANNOTATIONS_ENV: Final = "ISTIO_PROMETHEUS_ANNOTATIONS"  # the app's, as JSON
PROMETHEUS_STATS_PATH: Final = "/stats/prometheus"
DEFAULT_APP_METRICS_PATH: Final = "/metrics"  # Prometheus' default, when the pod names none

# --- What injection adds --------------------------------------------------------------------------
PROXY_CONTAINER: Final = "istio-proxy"
INIT_CONTAINER: Final = "istio-init"
# Where istio-proxy mounts each volume; the agent's defaults read from these paths.
VOLUME_MOUNTS: Final[dict[str, str]] = {
    "workload-certs": "/var/run/secrets/workload-spiffe-credentials",
    "istio-envoy": "/etc/istio/proxy",
    "istio-data": "/var/lib/istio/data",
    "istio-podinfo": "/etc/istio/pod",
    "istio-token": "/var/run/secrets/tokens",
    "istiod-ca-cert": "/var/run/secrets/istio",
}
VOLUME_NAMES: Final[tuple[str, ...]] = tuple(VOLUME_MOUNTS)

# --- Certificates: the token the sidecar sends, the trust bundle every namespace gets ------------
TOKEN_AUDIENCE: Final = "istio-ca"
TOKEN_EXPIRATION_SECONDS: Final = 43200
ROOT_CERT_CONFIGMAP: Final = "istio-ca-root-cert"
ROOT_CERT_KEY: Final = "root-cert.pem"
SHARED_CA_SECRET: Final = "istio-ca-secret"
WEBHOOK_CONFIGURATION: Final = "injector"
# Revisions (Istio's istio.io/rev): a namespace or pod label choosing a revision's webhooks, and
# the annotation injection adds naming the revision that injected the pod.
REVISION_LABEL: Final = "istio.io/rev"
DEFAULT_REVISION: Final = "default"


def webhook_configuration(revision: str) -> str:
    """Our MutatingWebhookConfiguration for a revision: `injector` for the default one,
    `injector-<revision>` for another (the Helm chart's and deploy/revision's names)."""
    return WEBHOOK_CONFIGURATION if revision in ("", DEFAULT_REVISION) else (
        f"{WEBHOOK_CONFIGURATION}-{revision}")

# --- Defaults -----------------------------------------------------------------------------------
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
DEFAULT_NAMESPACE: Final = "mesh-system"  # the injector's own
DEFAULT_CA_ADDR: Final = "injector.mesh-system.svc:443"

# --- Istio's gRPC CA protocol (istiod's, on port 15012; pilot-agent's CA_ADDR) ------------------
GRPC_CA_PORT: Final = 15012
# "tls-": Istio's protocol selection reads the port as TLS, which it is ("grpc-" would say
# plaintext gRPC; istiod's own name for 15012, https-dns, is historical).
GRPC_CA_PORT_NAME: Final = "tls-grpc-ca"
GRPC_CA_SERVICE: Final = "istio.v1.auth.IstioCertificateService"
GRPC_CA_METHOD: Final = "CreateCertificate"
# The gRPC metadata key (lower case, as gRPC carries it) naming the caller's cluster, and the
# cluster ID a sidecar sends when nobody set one.
CLUSTER_ID_METADATA: Final = "clusterid"
DEFAULT_CLUSTER_ID: Final = "Kubernetes"
# The request's metadata field a node agent (ztunnel) uses to ask for another workload's
# certificate: never honoured by this CA.
IMPERSONATED_IDENTITY: Final = "ImpersonatedIdentity"
DEFAULT_IGNORED_NAMESPACES: Final = ("kube-system", "kube-public", "kube-node-lease")
DEFAULT_MESH_CIDRS: Final = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
MTLS_MODES: Final = ("PERMISSIVE", "STRICT")
LOG_LEVELS: Final = ("trace", "debug", "info", "warning", "error", "critical", "off")

# --- Ports and the proxy's user -------------------------------------------------------------------
PROXY_OUTBOUND_PORT: Final = 15001
INBOUND_CAPTURE_PORT: Final = 15006
AGENT_PORT: Final = 15020
STATUS_PORT: Final = 15021
PROMETHEUS_PORT: Final = 15090
PROXY_UID: Final = 1337
DEFAULT_EXCLUDED_INBOUND_PORTS: Final = (PROMETHEUS_PORT, STATUS_PORT, AGENT_PORT)
