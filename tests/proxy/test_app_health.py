"""Probe rewriting (SPEC 8), agent side: the agent's port runs the app's original probes.

Real apps on loopback (HTTP, HTTPS with a self-signed certificate, a bare TCP listener, a gRPC
server with grpc.health.v1), real HTTP to the agent's server, and `injector agent` itself for
the env it reads. The whole path under STRICT mTLS, from outside the pod, is in
tests/e2e/test_mesh.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from injector.proxy import app_health
from injector.proxy.app_health import (
    AppHealthServer,
    AppMetrics,
    ProberError,
    _health_check_request,
    _serving_status,
    parse_app_metrics,
    parse_probers,
)
from tests.support.eventually import eventually
from tests.support.servers import free_port


class App(BaseHTTPRequestHandler):
    """/ok 200, /fail 500, /away a redirect to another host, /slow 3 s late, /echo the
    request's headers as JSON."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        status = {"/fail": 500, "/away": 302}.get(self.path, 200)
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(status)
        if status == 302:
            self.send_header("location", "http://elsewhere.invalid/")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def http_app() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture(scope="module")
def https_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    directory = tmp_path_factory.mktemp("app-tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=app", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


class Health(grpc.GenericRpcHandler):
    """grpc.health.v1.Health/Check: "" and "shop" SERVING, "down" NOT_SERVING, else NOT_FOUND;
    the caller's user agent remembered."""

    def __init__(self) -> None:
        self.user_agents: list[str] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/grpc.health.v1.Health/Check":
            return None
        self.user_agents.append(dict(details.invocation_metadata).get("user-agent", ""))
        return grpc.unary_unary_rpc_method_handler(self.check)

    def check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        service = request[2:].decode()  # field 1, one length byte: short names only
        if service not in ("", "shop", "down"):
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return b"\x08" + (b"\x02" if service == "down" else b"\x01")


@pytest.fixture(scope="module")
def grpc_app() -> Iterator[tuple[int, Health]]:
    health = Health()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[health])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, health
    server.stop(grace=None)


def agent(probers: dict[str, Any]) -> AppHealthServer:
    server = AppHealthServer(parse_probers(json.dumps(probers)), 0, host="127.0.0.1")
    server.start()
    return server


def get(server: AppHealthServer, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.port}{path}", headers=headers, timeout=10)


def test_http_probes_answer_the_apps_status_with_kubelets_headers(http_app: int) -> None:
    server = agent({
        "/app-health/web/livez": {"httpGet": {"path": "/ok", "port": http_app}},
        "/app-health/web/readyz": {"httpGet": {"path": "/fail", "port": http_app}},
        "/app-health/web/startupz": {"httpGet": {"path": "echo", "port": http_app}},
        "/app-lifecycle/web/prestopz": {"httpGet": {"path": "/away", "port": http_app}},
    })
    try:
        assert get(server, "/app-health/web/livez").status_code == 200
        assert get(server, "/app-health/web/readyz").status_code == 500
        # Kubelet's headers reach the app, and the Host it sent names the app's port.
        echoed = get(server, "/app-health/web/startupz", **{"user-agent": "kube-probe/1.34",
                                                             "x-custom": "from-the-probe"})
        assert echoed.status_code == 200
        seen = {name.lower(): value for name, value in echoed.json()["headers"].items()}
        assert echoed.json()["path"] == "/echo"
        assert seen["user-agent"] == "kube-probe/1.34"
        assert seen["x-custom"] == "from-the-probe"
        assert seen["host"] == f"127.0.0.1:{http_app}"
        # A redirect to another host is not followed: success, as for kubelet.
        assert get(server, "/app-lifecycle/web/prestopz").status_code == 200
        # A path with no probe is not one.
        assert get(server, "/app-health/other/livez").status_code == 404
    finally:
        server.stop()


def test_an_https_probe_is_sent_with_tls_without_verifying_the_app(https_app: int) -> None:
    server = agent({
        "/app-health/web/livez": {"httpGet": {"path": "/ok", "port": https_app,
                                              "scheme": "HTTPS"}},
        "/app-health/web/readyz": {"httpGet": {"path": "/ok", "port": https_app}},
    })
    try:
        assert get(server, "/app-health/web/livez").status_code == 200
        # Plain HTTP to a TLS port is not a pass.
        assert get(server, "/app-health/web/readyz").status_code == 503
    finally:
        server.stop()


def test_an_app_that_answers_late_fails_after_the_probes_timeout(http_app: int) -> None:
    server = agent({"/app-health/web/livez": {"httpGet": {"path": "/slow", "port": http_app},
                                              "timeoutSeconds": 1}})
    try:
        answer = get(server, "/app-health/web/livez")
        assert answer.status_code == 503
        assert "timed out" in answer.text
    finally:
        server.stop()


def test_tcp_probes_pass_when_the_app_listens() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    closed = free_port()
    server = agent({
        "/app-health/db/livez": {"tcpSocket": {"port": listening.getsockname()[1]}},
        "/app-health/db/readyz": {"tcpSocket": {"port": closed}},
    })
    try:
        assert get(server, "/app-health/db/livez").status_code == 200
        assert get(server, "/app-health/db/readyz").status_code == 503
    finally:
        server.stop()
        listening.close()


def test_grpc_probes_ask_the_apps_health_service(grpc_app: tuple[int, Health]) -> None:
    port, health = grpc_app
    server = agent({
        "/app-health/g/livez": {"grpc": {"port": port}},
        "/app-health/g/readyz": {"grpc": {"port": port, "service": "shop"}},
        "/app-health/g/startupz": {"grpc": {"port": port, "service": "down"}},
        "/app-health/h/livez": {"grpc": {"port": port, "service": "missing"}},
        "/app-health/h/readyz": {"grpc": {"port": free_port()}, "timeoutSeconds": 1},
    })
    try:
        assert get(server, "/app-health/g/livez", **{"user-agent": "kube-probe/1.34"}
                   ).status_code == 200
        assert any(agent.startswith("kube-probe/1.34") for agent in health.user_agents)
        assert get(server, "/app-health/g/readyz").status_code == 200
        assert get(server, "/app-health/g/startupz").status_code == 503
        assert get(server, "/app-health/h/livez").status_code == 503
        assert get(server, "/app-health/h/readyz").status_code == 503
    finally:
        server.stop()


@pytest.mark.parametrize("ready, status", [(True, 200), (False, 503)])
def test_healthz_ready_on_the_agents_port_is_the_proxys_readiness(ready: bool,
                                                                  status: int) -> None:
    server = AppHealthServer({}, 0, host="127.0.0.1", ready=lambda: ready)
    server.start()
    try:
        assert get(server, "/healthz/ready").status_code == status
    finally:
        server.stop()


def test_connections_past_the_bound_are_closed_and_the_rest_still_answered(
    http_app: int,
) -> None:
    server = agent({"/app-health/web/livez": {"httpGet": {"path": "/ok", "port": http_app}}})
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]

    def closed_at_once() -> bool:
        """One more connection: closed at once once every slot is taken. (Until the server
        has accepted all the idle ones, it may get a slot itself: it is then kept idle.)"""
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        extra.settimeout(0.5)
        try:
            closed = extra.recv(1) == b""
        except TimeoutError:
            idle.append(extra)
            return False
        extra.close()
        return closed

    try:
        # Each idle connection holds a thread until its request arrives (or 10 s pass).
        assert eventually(closed_at_once, what="a connection past the bound closed at once")
        idle.pop(0).close()

        def answered() -> bool:
            try:
                return get(server, "/app-health/web/livez").status_code == 200
            except httpx.TransportError:  # closed at once while the slot is being freed
                return False

        assert eventually(answered, what="a probe once a connection was freed")
    finally:
        for connection in idle:
            connection.close()
        server.stop()


def test_the_health_messages_wire_format() -> None:
    assert _health_check_request("") == b""
    assert _health_check_request("shop") == b"\x0a\x04shop"
    long_name = "s" * 200
    assert _health_check_request(long_name) == b"\x0a\xc8\x01" + long_name.encode()
    assert _serving_status(b"\x08\x01") == 1
    assert _serving_status(b"") == 0


@pytest.mark.parametrize("text, problem", [
    ("[]", "JSON object"),
    ("{nope", "not JSON"),
    ('{"/x": {"httpGet": {"port": "http"}}}', "port"),
    ('{"/x": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}', "one of"),
    ('{"x": {"tcpSocket": {"port": 1}}}', "starts with /"),
    ('{"/x": {"tcpSocket": {"port": 1}, "timeoutSeconds": -1}}', "timeoutSeconds"),
])
def test_probers_that_cannot_be_read_are_refused_saying_why(text: str, problem: str) -> None:
    with pytest.raises(ProberError, match=problem):
        parse_probers(text)


def test_the_agent_refuses_a_bad_env_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "ISTIO_KUBE_APP_PROBERS": '{"/app-health/web/livez": 1}'}
    done = subprocess.run([str(Path(sys.executable).parent / "injector"), "agent",
                           "--certs-dir", str(tmp_path), "--envoy-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "ISTIO_KUBE_APP_PROBERS" in lines[0]
    assert "/app-health/web/livez" in lines[0]


def test_a_request_trickled_in_is_cut_at_the_read_deadline(http_app: int) -> None:
    """A caller sending a byte at a time, each within the per-read timeout, does not keep its
    connection (one of the few slots the pod's probes need) past the whole request's time."""
    server = AppHealthServer(parse_probers(json.dumps(
        {"/app-health/web/livez": {"httpGet": {"path": "/ok", "port": http_app}}})), 0,
        host="127.0.0.1", request_read_seconds=1.0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
            started = time.monotonic()
            request = b"GET /app-health/web/livez HTTP/1.1\r\nHost: x\r\n"
            cut = False
            for byte in request * 20:
                if time.monotonic() - started > 4:
                    break  # still not cut: the failure below
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    cut = True
                    break
                time.sleep(0.1)
            if not cut:
                slow.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    cut = slow.recv(1) == b""
            assert cut, "a request trickled in for 4 s was not cut at its 1 s deadline"
        assert get(server, "/app-health/web/livez").status_code == 200
    finally:
        server.stop()


ENVOY_STATS = b"# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n"
APP_STATS = b"# TYPE shop_orders_total counter\nshop_orders_total 7"  # no last newline
QUEUE_STATS = b"# TYPE shop_queue_depth gauge\nshop_queue_depth 3\n"  # a second endpoint


class Metrics(BaseHTTPRequestHandler):
    """Envoy's admin at /stats/prometheus and the app's metrics at /app/metrics; /fail 500,
    /slow 3 s late, /big 4 KiB."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        body = {"/stats/prometheus": ENVOY_STATS, "/app/metrics": APP_STATS,
                "/queue/metrics": QUEUE_STATS, "/slow": APP_STATS,
                "/big": b"x" * 4096}.get(self.path, b"no")
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def metrics_app() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    server.daemon_threads = True
    yield from _serve(server)


def merging_agent(envoy_admin_port: int | None, app_metrics: AppMetrics | None) -> AppHealthServer:
    server = AppHealthServer({}, 0, host="127.0.0.1", envoy_admin_port=envoy_admin_port,
                             app_metrics=app_metrics)
    server.start()
    return server


def test_stats_prometheus_answers_envoys_metrics_then_the_apps(metrics_app: int) -> None:
    server = merging_agent(metrics_app, AppMetrics(metrics_app, "/app/metrics"))
    try:
        answer = get(server, "/stats/prometheus")
    finally:
        server.stop()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert answer.content == ENVOY_STATS + APP_STATS + b"\n"


@pytest.mark.parametrize("path", ["/fail", "/slow", "/big"])
def test_an_app_that_fails_still_gives_envoys_metrics(metrics_app: int, path: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """As Istio's agent: the app's part is left out (a 500, too slow, too big), Envoy's kept."""
    monkeypatch.setattr(app_health, "METRICS_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(app_health, "MAX_METRICS_BYTES", 1024)
    server = merging_agent(metrics_app, AppMetrics(metrics_app, path))
    try:
        answer = get(server, "/stats/prometheus")
    finally:
        server.stop()
    assert answer.status_code == 200
    assert answer.content == ENVOY_STATS


def test_every_scrape_target_of_the_app_is_merged_in_order(metrics_app: int) -> None:
    """Istio's prometheus.istio.io/scrape-targets: each endpoint's metrics after Envoy's, in
    the order given; one that fails (here a 500) is left out, the others kept."""
    server = merging_agent(metrics_app, AppMetrics(
        metrics_app, "/app/metrics", more=((metrics_app, "/fail"),
                                           (metrics_app, "/queue/metrics"))))
    try:
        answer = get(server, "/stats/prometheus")
    finally:
        server.stop()
    assert answer.status_code == 200
    assert answer.content == ENVOY_STATS + APP_STATS + b"\n" + QUEUE_STATS


def test_an_app_that_is_not_listening_still_gives_envoys_metrics(metrics_app: int) -> None:
    server = merging_agent(metrics_app, AppMetrics(free_port(), "/metrics"))
    try:
        assert get(server, "/stats/prometheus").content == ENVOY_STATS
    finally:
        server.stop()


def test_without_the_apps_metrics_only_envoys_are_served(metrics_app: int) -> None:
    server = merging_agent(metrics_app, None)
    try:
        assert get(server, "/stats/prometheus").content == ENVOY_STATS
    finally:
        server.stop()


@pytest.mark.parametrize(("text", "expected"), [
    ("", None),
    ('{"scrape":"true","path":"/app/metrics","port":"9100"}', AppMetrics(9100, "/app/metrics")),
    ('{"scrape":"","path":"","port":"9100"}', AppMetrics(9100, "/metrics")),
    ('{"scrape":"true","path":"/m","port":""}', None),
    ('{"scrape":"false","path":"/m","port":"9100"}', None),
    # Istio's scrape-targets: the targets are scraped (the first is also port and path).
    ('{"scrape":"","path":"/m","port":"9100","targets":[{"port":"9100","path":"/m"},'
     '{"port":"9200","path":""}]}', AppMetrics(9100, "/m", more=((9200, "/metrics"),))),
    ('{"scrape":"true","path":"","port":"","targets":[{"port":"9300","path":"x"}]}',
     AppMetrics(9300, "/x")),
    ('{"scrape":"true","path":"/m","port":"9100","targets":[]}', AppMetrics(9100, "/m")),
])
def test_istios_prometheus_annotations_are_read(text: str, expected: AppMetrics | None) -> None:
    assert parse_app_metrics(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("{", "not JSON"),
    ("[]", "expected"),
    ('{"port": 9100}', "expected"),
    ('{"port": "http"}', "not a port"),
    ('{"port": "70000"}', "not a port"),
    ('{"port": "9100", "targets": {"port": "9200"}}', "targets: expected a list"),
    ('{"targets": [{"port": 9200}]}', "targets: expected a list"),
    ('{"targets": [{"port": "9200"}' + ', {"port": "9201"}' * 8 + ']}', "at most 8"),
    ('{"targets": [{"port": ""}]}', "targets: port: '': not a port"),
])
def test_prometheus_annotations_that_cannot_be_read_say_why(text: str, problem: str) -> None:
    with pytest.raises(ProberError, match=problem):
        parse_app_metrics(text)
