"""The sidecar's agent (SPEC section 6): its settings, its run loop, and its hold hook.

`run_agent` gets the pod's SVID from the CA, installs it, starts Envoy, renews at half-life and,
once told to stop, drains Envoy. Each step lives in the module named after it (caclient, volumes,
envoy_process, renewal); this one only puts them in order. `wait_until_ready` is what
`injector agent wait` does: the webhook's postStart hook, which holds the application's start
until the proxy is ready.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from injector.mesh.names import AGENT_PORT, PROMETHEUS_ANNOTATIONS_ENV
from injector.mesh.network import IpNetwork
from injector.proxy import envoy
from injector.proxy.app_health import (
    AppHealthServer,
    AppMetrics,
    Prober,
    parse_app_metrics,
)
from injector.proxy.ca_address import CaAddress
from injector.proxy.caclient import Attempt, CaClient
from injector.proxy.envoy_process import exit_status, start_envoy
from injector.proxy.renewal import REFUSAL_MIN_DELAY, Backoff, renewal_delay
from injector.proxy.svid import Issued
from injector.proxy.volumes import install_svid, sds_directory, write_bootstrap

log = logging.getLogger("injector.agent")

# How often the running agent looks at Envoy, at the stop request and at the clock.
POLL_INTERVAL = 0.2
READINESS_REQUEST_TIMEOUT = 2.0


@dataclass(frozen=True)
class Settings:
    """Everything the agent runs with, checked before it starts."""

    ca: CaAddress
    trust_domain: str
    pod_name: str
    namespace: str
    service_account: str
    instance_ip: str
    mesh_cidrs: tuple[IpNetwork, ...]
    mtls_mode: envoy.MtlsMode
    token_file: Path
    ca_root_file: Path
    certs_dir: Path
    envoy_dir: Path
    envoy_binary: str
    ttl_seconds: int | None
    drain_seconds: float
    concurrency: int
    ports: envoy.Ports
    log_level: str
    ipv6: bool
    # Probe rewriting (SPEC 8): the app's original probes, served on `agent_port` (none: off).
    app_probers: dict[str, Prober] = field(default_factory=dict)
    agent_port: int = AGENT_PORT
    # Metrics merging: where the app's own metrics are (ISTIO_PROMETHEUS_ANNOTATIONS, read by
    # `app_metrics_from_environment`; None: Envoy's metrics alone).
    app_metrics: AppMetrics | None = None
    # Envoy's per-component levels (Istio's componentLogLevel; None: `log_level` for all).
    component_log_level: str | None = None
    # `router` for a gateway (Istio's gateway template): Envoy without the capture listeners.
    proxy_type: envoy.ProxyType = "sidecar"

    @property
    def spiffe_id(self) -> str | None:
        """The identity we expect, for the CSR; None when the pod's names are unknown."""
        from injector.mesh.spiffe import SpiffeId, SpiffeIdError

        if not (self.namespace and self.service_account):
            return None
        try:
            return str(SpiffeId.for_service_account(self.trust_domain, self.namespace,
                                                    self.service_account))
        except SpiffeIdError:
            return None

    def ca_client(self) -> CaClient:
        return CaClient(ca=self.ca, token_file=self.token_file, ca_root_file=self.ca_root_file,
                        trust_domain=self.trust_domain, spiffe_id=self.spiffe_id,
                        ttl_seconds=self.ttl_seconds)

    def proxy_config(self) -> envoy.ProxyConfig:
        return envoy.ProxyConfig(
            node_id=envoy.node_id(self.instance_ip or "0.0.0.0", self.pod_name or "unknown",
                                  self.namespace or "default", self.proxy_type),
            node_cluster=f"{self.service_account or 'default'}.{self.namespace or 'default'}",
            trust_domain=self.trust_domain,
            mesh_cidrs=self.mesh_cidrs,
            mtls_mode=self.mtls_mode,
            sds_dir=PurePosixPath(sds_directory(self.envoy_dir)),
            ports=self.ports,
            drain_seconds=self.drain_seconds,
            ipv6=self.ipv6,
            proxy_type=self.proxy_type,
        )


def ipv6_available() -> bool:
    """Whether this network namespace has IPv6 (so the proxy must listen on `::` too)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _describe(issued: Issued, renew_in: float) -> str:
    expiry = dt.datetime.fromtimestamp(issued.not_after, dt.UTC).isoformat(timespec="seconds")
    return (f"got certificate for {issued.spiffe_id} (serial {issued.serial:x}, expires "
            f"{expiry}); renewing in {renew_in:.1f}s")


def _installed(settings: Settings, attempt: Attempt) -> bool:
    """Write the new SVID; a volume that cannot take it is logged, and the caller retries."""
    assert attempt.issued is not None
    try:
        install_svid(settings.certs_dir, settings.envoy_dir, attempt.issued, attempt.key_pem)
    except OSError as error:
        log.error("cannot write the certificate files: %s (%s)", error.strerror,
                  error.filename)
        return False
    return True


def _envoy_ready(settings: Settings) -> bool:
    """Envoy's readiness, for `/healthz/ready` on the agent's port (as Istio's agent has)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", settings.ports.status,
                                            timeout=READINESS_REQUEST_TIMEOUT)
    try:
        connection.request("GET", "/healthz/ready")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def app_metrics_from_environment() -> AppMetrics | None:
    """ISTIO_PROMETHEUS_ANNOTATIONS, as the webhook set it. Raises ProberError for a value
    that cannot be read: the agent then stops at its start, naming the variable (as
    pilot-agent does), rather than serve Envoy's metrics without the app's, silently."""
    return parse_app_metrics(os.environ.get(PROMETHEUS_ANNOTATIONS_ENV, ""))


def _start_app_health(settings: Settings) -> AppHealthServer | None:
    """Serve the rewritten probes (SPEC 8) from the start: kubelet probes before Envoy runs;
    and the merged metrics, which every injected pod's prometheus.io/port may name (so the port
    is served even without probes, as Istio's agent serves it). A port that cannot be bound is
    logged: the probes then fail, which kubelet reports; the proxy itself keeps working."""
    try:
        server = AppHealthServer(settings.app_probers, settings.agent_port,
                                 host="::" if settings.ipv6 else "0.0.0.0",
                                 ready=lambda: _envoy_ready(settings),
                                 envoy_admin_port=settings.ports.admin,
                                 app_metrics=settings.app_metrics)
    except OSError as error:
        log.error("cannot serve the app's probes on port %d: %s", settings.agent_port,
                  error.strerror)
        return None
    server.start()
    log.info("serving %d app probe(s) and the merged metrics on port %d",
             len(settings.app_probers), server.port)
    return server


def run_agent(settings: Settings, stop: threading.Event) -> int:
    """Run until `stop` is set (0, once Envoy has drained) or Envoy exits (its status)."""
    app_health = _start_app_health(settings)
    try:
        return _run(settings, stop)
    finally:
        if app_health is not None:
            app_health.stop()


def _run(settings: Settings, stop: threading.Event) -> int:
    ca = settings.ca_client()
    backoff = Backoff()
    # The first certificate: Envoy starts only with it, so readiness stays false until then.
    while True:
        attempt = ca.request_certificate(backoff, stop)
        received = time.time()
        if attempt.issued is not None and _installed(settings, attempt):
            break
        delay = attempt.retry_in if attempt.issued is None else backoff.next_delay(
            start=REFUSAL_MIN_DELAY)
        if stop.wait(delay):
            log.info("stopped before the first certificate arrived")
            return 0
    assert attempt.issued is not None
    renew_at = received + renewal_delay(received, attempt.issued.not_after, random.random())
    log.info(_describe(attempt.issued, renew_at - received))
    config = settings.proxy_config()
    try:
        bootstrap = write_bootstrap(settings.envoy_dir, config)
    except OSError as error:
        log.error("cannot write the Envoy bootstrap: %s (%s)", error.strerror, error.filename)
        return 1
    proxy = start_envoy(settings.envoy_binary, bootstrap, config, settings.log_level,
                        settings.concurrency, settings.component_log_level)
    not_after = attempt.issued.not_after
    expired = False  # readiness failed in Envoy because the SVID expired unrenewed
    try:
        while True:
            returncode = proxy.poll()
            if returncode is not None:
                log.error("Envoy exited with status %d", returncode)
                return exit_status(returncode)
            if stop.is_set():
                proxy.drain_and_stop()
                log.info("stopped")
                return 0
            if time.time() >= renew_at:
                # An answer that is not a usable SVID is refused by the CA client: the SVID
                # installed stays, and the next attempt comes after a growing delay.
                attempt = ca.request_certificate(backoff, stop)
                received = time.time()
                if attempt.issued is None:
                    renew_at = received + attempt.retry_in
                elif not _installed(settings, attempt):
                    renew_at = received + backoff.next_delay(start=REFUSAL_MIN_DELAY)
                else:
                    not_after = attempt.issued.not_after
                    renew_at = received + renewal_delay(received, attempt.issued.not_after,
                                                        random.random())
                    log.info(_describe(attempt.issued, renew_at - received))
            if expired != (time.time() >= not_after):
                expired = proxy.report_expiry(expired=not expired, not_after=not_after)
            stop.wait(max(0.0, min(POLL_INTERVAL, renew_at - time.time())))
    finally:
        proxy.kill_if_running()


def wait_until_ready(url: str, timeout_seconds: float, period_seconds: float) -> str | None:
    """Poll the proxy's readiness `url` until it answers 200, for at most `timeout_seconds`.

    Returns None once ready; otherwise what the last poll saw (`HTTP 503`, or the error), for
    the message that says why the application is not started.
    """
    import httpx  # on first use: a command that stops at a bad setting never loads it

    deadline = time.monotonic() + timeout_seconds
    last = "no answer yet"
    while True:
        try:
            response = httpx.get(url, timeout=min(READINESS_REQUEST_TIMEOUT, timeout_seconds))
            if response.status_code == 200:
                return None
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() + period_seconds > deadline:
            return last
        time.sleep(period_seconds)
