"""The agent's side of probe rewriting (SPEC 8): kubelet probes us, we probe the app.

The webhook (`injector.injection.probes`) points the app containers' probes at the agent's port
(15020) and hands us the originals in env ISTIO_KUBE_APP_PROBERS, Istio's format:

    {"/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": 8080}, "timeoutSeconds": 3},
     "/app-health/web/readyz": {"tcpSocket": {"port": 8080}},
     "/app-health/grpc/startupz": {"grpc": {"port": 9000, "service": "x"}}}

For each such path we run the original probe against the app on this pod's loopback (the agent
runs as the proxy's uid, whose traffic iptables does not redirect, so it reaches the app
directly, past the STRICT inbound listener that refuses kubelet's plaintext):

- httpGet: the request, with kubelet's headers; HTTPS as kubelet sends it (TLS 1.2+, the app's
  certificate not verified: kubelet does not verify it either); redirects are not followed (a
  redirect counts as success, as for kubelet and Istio, and never leads anywhere else); the
  app's status is answered (a redirect as 200), so kubelet judges it as it would have;
- tcpSocket: a connection opened and closed: 200;
- grpc: grpc.health.v1.Health/Check for the probe's service: 200 when SERVING.

Anything else (refused, timed out after the probe's timeoutSeconds, 1 s by default as for
kubelet; NOT_SERVING; an unknown path) is a 5xx or 404 with a one-line text reason. Also
`/healthz/ready`: Envoy's readiness, as Istio's agent serves it on this port.

And metrics merging (`/stats/prometheus`), as Istio's agent: the webhook points the pod's
`prometheus.io/*` at this port and hands us the app's own in env ISTIO_PROMETHEUS_ANNOTATIONS
(`{"scrape": "true", "path": "/metrics", "port": "9100"}`, and with Istio's
prometheus.istio.io/scrape-targets `"targets": [{"port": "9100", "path": "/metrics"}, ...]`).
One scrape answers Envoy's metrics (its admin `/stats/prometheus`) followed by the app's, from
each target in order (fetched at once). Each part is fetched within
METRICS_TIMEOUT_SECONDS and at most MAX_METRICS_BYTES; a part that fails is left out and logged,
and the rest is answered all the same: an app that breaks does not hide the proxy's metrics.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import orjson

from injector.mesh.names import DEFAULT_APP_METRICS_PATH, PROMETHEUS_STATS_PATH

log = logging.getLogger("injector.agent")

DEFAULT_TIMEOUT_SECONDS = 1.0  # kubelet's default timeoutSeconds
MAX_CONCURRENT_PROBES = 32  # the port is reachable by any pod: a bounded share of the agent
MAX_CONNECTIONS = 64  # open at once (a thread each); more are closed at once
MAX_BODY_BYTES = 10 * 1024  # of the app's answer passed back (kubelet keeps 10 KiB too)
REQUEST_READ_SECONDS = 10.0  # a caller's request line and headers, all of them
MAX_PROBERS_BYTES = 1024 * 1024
METRICS_TIMEOUT_SECONDS = 5.0  # each part of a merged scrape (Envoy's, the app's)
MAX_METRICS_BYTES = 8 * 1024 * 1024  # each part; more is dropped, not cut (a cut is invalid)
MAX_METRICS_CONFIG_BYTES = 4096
MAX_SCRAPE_TARGETS = 8  # the app's metrics endpoints, fetched at once (the webhook's bound)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format

# Not passed on to the app: they describe our connection to kubelet, not the app's.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "content-length", "host"})
_PROBE_KINDS = ("httpGet", "tcpSocket", "grpc")
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_GRPC_SERVING = 1


class ProberError(ValueError):
    """ISTIO_KUBE_APP_PROBERS that cannot be read; says which path and why."""


@dataclass(frozen=True, slots=True)
class Prober:
    """One original probe: its kind (httpGet, tcpSocket, grpc), action and timeout."""

    kind: str
    action: Mapping[str, Any]
    timeout_seconds: float

    @property
    def port(self) -> int:
        port = self.action["port"]
        assert type(port) is int
        return port


def _json_value(text: str, max_bytes: int) -> Any:
    """The JSON value of an env var the injection writes. Raises ProberError when it is over
    `max_bytes` or not JSON."""
    if len(text) > max_bytes:
        raise ProberError(f"over {max_bytes} bytes")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise ProberError(f"not JSON: {error}") from None


def parse_probers(text: str) -> dict[str, Prober]:
    """ISTIO_KUBE_APP_PROBERS' value ("" for none). Raises ProberError."""
    if not text.strip():
        return {}
    data = _json_value(text, MAX_PROBERS_BYTES)
    if not isinstance(data, dict):
        raise ProberError("expected a JSON object of paths to probes")
    probers: dict[str, Prober] = {}
    for path, probe in data.items():
        if not path.startswith("/"):
            raise ProberError(f"{path!r}: a path starts with /")
        if not isinstance(probe, dict):
            raise ProberError(f"{path}: expected an object")
        kinds = [kind for kind in _PROBE_KINDS if probe.get(kind) is not None]
        if len(kinds) != 1:
            raise ProberError(f"{path}: expected one of httpGet, tcpSocket, grpc")
        action = probe[kinds[0]]
        port = action.get("port") if isinstance(action, dict) else None
        if type(port) is not int or not 0 < port < 65536:
            raise ProberError(f"{path}: {kinds[0]}.port: expected a port number")
        timeout = probe.get("timeoutSeconds", 0)
        if type(timeout) is not int or timeout < 0:
            raise ProberError(f"{path}: timeoutSeconds: expected a whole number of seconds")
        probers[path] = Prober(kinds[0], action, float(timeout) or DEFAULT_TIMEOUT_SECONDS)
    return probers


@dataclass(frozen=True, slots=True)
class AppMetrics:
    """Where the app's own metrics are, on this pod's loopback: a port and path, and `more`
    (prometheus.istio.io/scrape-targets past the first), scraped with it, in order."""

    port: int
    path: str
    more: tuple[tuple[int, str], ...] = ()

    @property
    def targets(self) -> tuple[tuple[int, str], ...]:
        return ((self.port, self.path), *self.more)


def _metrics_port(text: str, where: str) -> int:
    port = int(text) if text.isascii() and text.isdigit() else 0
    if not 0 < port < 65536 or len(text) > 5:
        raise ProberError(f"{where}: {text[:20]!r}: not a port")
    return port


def _metrics_path(path: str) -> str:
    path = path or DEFAULT_APP_METRICS_PATH
    return path if path.startswith("/") else f"/{path}"


def parse_app_metrics(text: str) -> AppMetrics | None:
    """ISTIO_PROMETHEUS_ANNOTATIONS' value: None when there is nothing to scrape (empty, no
    port, or scrape "false"). With `targets` (Istio's scrape-targets: a list of
    {"port", "path"}, at most MAX_SCRAPE_TARGETS) those are scraped, as Istio's agent does.
    Raises ProberError for a value that cannot be read."""
    if not text.strip():
        return None
    data = _json_value(text, MAX_METRICS_CONFIG_BYTES)
    if not isinstance(data, dict) or not all(
            isinstance(data.get(key, ""), str) for key in ("scrape", "path", "port")):
        raise ProberError('expected {"scrape": "...", "path": "...", "port": "..."}')
    targets = data.get("targets") or []
    if not (isinstance(targets, list) and len(targets) <= MAX_SCRAPE_TARGETS and all(
            isinstance(target, dict) and isinstance(target.get("port"), str)
            and isinstance(target.get("path", ""), str) for target in targets)):
        raise ProberError(f'targets: expected a list of at most {MAX_SCRAPE_TARGETS} '
                          '{"port": "...", "path": "..."}')
    if data.get("scrape", "") in ("false", "False", "FALSE", "f", "F", "0"):
        return None
    if targets:
        found = [(_metrics_port(target["port"], "targets: port"),
                  _metrics_path(target.get("path", ""))) for target in targets]
        return AppMetrics(*found[0], more=tuple(found[1:]))
    port_text = data.get("port", "")
    if not port_text:
        return None  # Istio's agent has no port to ask either
    return AppMetrics(_metrics_port(port_text, "port"), _metrics_path(data.get("path", "")))


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


def _failed(status: HTTPStatus, reason: str) -> Outcome:
    return Outcome(status, reason.encode() + b"\n")


def _tls_context() -> ssl.SSLContext:
    """As kubelet probes HTTPS: encrypted, the app's certificate not checked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def probe_http(prober: Prober, app_host: str, headers: list[tuple[str, str]],
               host_header: str | None) -> Outcome:
    action = prober.action
    path = action.get("path") or "/"
    path = path if isinstance(path, str) and path.startswith("/") else f"/{path}"
    connection: http.client.HTTPConnection
    if action.get("scheme") == "HTTPS":
        connection = http.client.HTTPSConnection(app_host, prober.port,
                                                 timeout=prober.timeout_seconds,
                                                 context=_tls_context())
    else:
        connection = http.client.HTTPConnection(app_host, prober.port,
                                                timeout=prober.timeout_seconds)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host_header or f"{app_host}:{prober.port}")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read(MAX_BODY_BYTES)
    except (OSError, http.client.HTTPException) as error:
        return _failed(HTTPStatus.SERVICE_UNAVAILABLE,
                       f"app probe GET :{prober.port}{path} failed: "
                       f"{str(error) or type(error).__name__}")
    finally:
        connection.close()
    if 300 <= response.status < 400:
        return Outcome(HTTPStatus.OK, b"")  # not followed: success for kubelet too
    return Outcome(response.status, body)


def probe_tcp(prober: Prober, app_host: str) -> Outcome:
    try:
        with socket.create_connection((app_host, prober.port), timeout=prober.timeout_seconds):
            pass
    except OSError as error:
        return _failed(HTTPStatus.SERVICE_UNAVAILABLE,
                       f"app probe TCP :{prober.port} failed: {error}")
    return Outcome(HTTPStatus.OK, b"")


def _health_check_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service}, in protobuf's wire format (field 1, a
    length-delimited string): too small a message to bring in generated code for."""
    encoded = service.encode()
    if not encoded:
        return b""
    length, varint = len(encoded), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x0a" + bytes(varint) + encoded


def _serving_status(response: bytes) -> int:
    """HealthCheckResponse.status (field 1, a varint); 0 (UNKNOWN) when absent."""
    position = 0
    while position < len(response):
        tag = response[position]
        position += 1
        value = shift = 0
        if tag & 0x07 == 0:  # varint
            while position < len(response):
                byte = response[position]
                position += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            if tag >> 3 == 1:
                return value
        else:
            return 0  # a field the message does not have: not a health answer we read
    return 0


def probe_grpc(prober: Prober, app_host: str, user_agent: str | None) -> Outcome:
    import grpc  # on first use: most pods have no gRPC probe

    service = prober.action.get("service") or ""
    if not isinstance(service, str):
        service = ""
    options = [("grpc.primary_user_agent", user_agent)] if user_agent else []
    with grpc.insecure_channel(f"{app_host}:{prober.port}", options=options) as channel:
        check = channel.unary_unary(GRPC_HEALTH_CHECK)
        try:
            answer = check(_health_check_request(service), timeout=prober.timeout_seconds)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            return _failed(HTTPStatus.SERVICE_UNAVAILABLE,
                           f"app probe gRPC :{prober.port} failed: {code}")
    status = _serving_status(answer)
    if status != _GRPC_SERVING:
        return _failed(HTTPStatus.SERVICE_UNAVAILABLE,
                       f"app probe gRPC :{prober.port}: service {service!r} not serving "
                       f"(status {status})")
    return Outcome(HTTPStatus.OK, b"")


def fetch_metrics(host: str, port: int, path: str, what: str) -> bytes | None:
    """One part of a merged scrape: the body of a 200 from http://host:port/path, or None
    (logged) when it cannot be had whole within the bounds."""
    connection = http.client.HTTPConnection(host, port, timeout=METRICS_TIMEOUT_SECONDS)
    try:
        connection.request("GET", path, headers={"accept": "text/plain"})
        response = connection.getresponse()
        body = response.read(MAX_METRICS_BYTES + 1)
    except (OSError, http.client.HTTPException) as error:
        log.warning("metrics: %s at :%d%s: %s", what, port, path[:200],
                    str(error) or type(error).__name__)
        return None
    finally:
        connection.close()
    if response.status != HTTPStatus.OK:
        log.warning("metrics: %s at :%d%s answered %d", what, port, path[:200], response.status)
        return None
    if len(body) > MAX_METRICS_BYTES:
        log.warning("metrics: %s at :%d%s: over %d bytes, left out", what, port, path[:200],
                    MAX_METRICS_BYTES)
        return None
    return body


class AppHealthServer:
    """HTTP on `port`: the app probes at their paths, `/healthz/ready` (`ready()`), and the
    merged metrics at `/stats/prometheus`."""

    def __init__(self, probers: Mapping[str, Prober], port: int, *, host: str = "0.0.0.0",
                 app_host: str = "127.0.0.1", ready: Callable[[], bool] | None = None,
                 request_read_seconds: float = REQUEST_READ_SECONDS,
                 envoy_admin_port: int | None = None,
                 app_metrics: AppMetrics | None = None) -> None:
        self.probers = dict(probers)
        # Metrics merging: Envoy's admin (None: no Envoy part) and the app's metrics.
        self.envoy_admin_port = envoy_admin_port
        self.app_metrics = app_metrics
        self._request_read_seconds = request_read_seconds
        self.app_host = app_host
        self.port = port
        self._ready = ready
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_PROBES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            # The stdlib's 5 would drop the SYNs of a burst of probes (several containers at
            # once), and a dropped SYN is retried after a second: a 1 s probe's whole timeout.
            request_queue_size = 128

            def process_request(self, request: Any, client_address: Any) -> None:
                if not connections.acquire(blocking=False):
                    self.shutdown_request(request)  # kubelet retries at its next period
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    connections.release()

            def server_bind(self) -> None:
                if family == socket.AF_INET6:  # "::" takes IPv4 too: kubelet probes the pod IP
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                super().server_bind()

        self._server = Server((host, port), self._handler())
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = server._request_read_seconds
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # `timeout` bounds each read only: a caller that trickles its request a byte at
                # a time would hold one of the MAX_CONNECTIONS slots as long as it liked, and
                # enough of them would fail the pod's probes. The whole request gets the time.
                self._read_deadline = threading.Timer(server._request_read_seconds, self._cut)
                self._read_deadline.daemon = True
                self._read_deadline.start()

            def _cut(self) -> None:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                self._read_deadline.cancel()
                super().finish()

            def do_GET(self) -> None:  # the stdlib's name for it
                self._read_deadline.cancel()  # read in time: the probe has its own timeout
                self._answer(server.answer(self.path, list(self.headers.items()),
                                           self.headers.get("Host")))

            def _answer(self, outcome: Outcome) -> None:
                # One probe per connection, as kubelet sends them: no idle connection holds
                # one of the MAX_CONNECTIONS slots.
                self.close_connection = True
                self.send_response(outcome.status)
                self.send_header("connection", "close")
                self.send_header("content-type", outcome.content_type)
                self.send_header("content-length", str(len(outcome.body)))
                self.end_headers()
                self.wfile.write(outcome.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # kubelet probes every few seconds: failures are logged by `answer`

        return Handler

    def answer(self, target: str, headers: list[tuple[str, str]],
               host_header: str | None) -> Outcome:
        path = urlsplit(target).path
        if path == "/healthz/ready":
            ready = self._ready is not None and self._ready()
            return (Outcome(HTTPStatus.OK, b"") if ready
                    else _failed(HTTPStatus.SERVICE_UNAVAILABLE, "proxy not ready"))
        if path == PROMETHEUS_STATS_PATH:
            return self._merged_metrics()
        prober = self.probers.get(path)
        if prober is None:
            return _failed(HTTPStatus.NOT_FOUND, f"no app probe at {path[:200]}")
        if not self._slots.acquire(blocking=False):
            return _failed(HTTPStatus.SERVICE_UNAVAILABLE, "too many probes at once")
        try:
            outcome = self._run(prober, headers, host_header)
        finally:
            self._slots.release()
        if outcome.status >= 400:
            log.warning("app probe %s: %s", path, outcome.body.decode(errors="replace").strip()
                        or f"HTTP {outcome.status}")
        return outcome

    def _merged_metrics(self) -> Outcome:
        """Envoy's metrics, then the app's: each part that fails is left out (and logged)."""
        if not self._slots.acquire(blocking=False):
            return _failed(HTTPStatus.SERVICE_UNAVAILABLE, "too many requests at once")
        try:
            parts = []
            if self.envoy_admin_port is not None:
                parts.append(fetch_metrics("127.0.0.1", self.envoy_admin_port,
                                           PROMETHEUS_STATS_PATH, "Envoy's metrics"))
            if self.app_metrics is not None:
                parts.extend(self._app_parts(self.app_metrics.targets))
        finally:
            self._slots.release()
        # Each part ends its last line, or the next part's first line would join it.
        body = b"".join(part if part.endswith(b"\n") else part + b"\n"
                        for part in parts if part)
        return Outcome(HTTPStatus.OK, body, PROMETHEUS_TEXT)

    def _app_parts(self, targets: tuple[tuple[int, str], ...]) -> list[bytes | None]:
        """The app's metrics from each target, in order; several are fetched at once, so that
        the scrape takes as long as the slowest, not their sum."""
        def fetch(target: tuple[int, str]) -> bytes | None:
            port, path = target
            return fetch_metrics(self.app_host, port, path, "the app's metrics")

        if len(targets) == 1:
            return [fetch(targets[0])]
        with ThreadPoolExecutor(max_workers=len(targets),
                                thread_name_prefix="app-metrics") as pool:
            return list(pool.map(fetch, targets))

    def _run(self, prober: Prober, headers: list[tuple[str, str]],
             host_header: str | None) -> Outcome:
        if prober.kind == "tcpSocket":
            return probe_tcp(prober, self.app_host)
        if prober.kind == "grpc":
            agent = next((value for name, value in headers if name.lower() == "user-agent"),
                         None)
            return probe_grpc(prober, self.app_host, agent)
        # The Host kubelet sent names our port; the app is asked as if kubelet had called it.
        if host_header is not None:
            name, _, port = host_header.rpartition(":")
            if name and port == str(self.port):
                host_header = f"{name}:{prober.port}"
        forwarded = [(name, value) for name, value in headers
                     if name.lower() not in _HOP_BY_HOP]
        return probe_http(prober, self.app_host, forwarded, host_header)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="app-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
