"""Envoy as the agent's child, with stand-ins: a script for the binary, a small HTTP server for
its admin interface. The real Envoy under the real agent is in tests/proxy/test_agent.py."""

from __future__ import annotations

import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from injector.proxy import envoy
from injector.proxy.envoy_process import EnvoyProcess, exit_status, find_envoy, start_envoy
from tests.support.eventually import eventually
from tests.support.servers import free_port


def _config(admin_port: int, drain_seconds: float = 0.2) -> envoy.ProxyConfig:
    return envoy.ProxyConfig(
        node_id=envoy.node_id("10.0.0.1", "web-0", "demo"), node_cluster="default.demo",
        trust_domain="cluster.local", mesh_cidrs=(), mtls_mode="PERMISSIVE",
        sds_dir=PurePosixPath("/nonexistent/sds"), ports=envoy.Ports(admin=admin_port),
        drain_seconds=drain_seconds)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


@dataclass
class Admin:
    """A stand-in for Envoy's admin interface: it answers `status` and records each POST."""

    port: int
    status: int = 200
    posted: list[str] = field(default_factory=list)


@pytest.fixture
def admin() -> Iterator[Admin]:
    stand_in = Admin(port=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            stand_in.posted.append(self.path)
            self.send_response(stand_in.status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stand_in.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


# --- the binary and its status -------------------------------------------------------------------

def test_envoy_is_found_on_the_path_or_beside_the_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "my-envoy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_envoy("my-envoy") == str(binary)
    assert find_envoy(str(binary)) == str(binary)
    assert find_envoy("no-such-envoy") is None
    beside = Path(sys.executable).parent / "python3"  # a venv holds python3 at least
    if beside.is_file():
        monkeypatch.setenv("PATH", "")
        assert find_envoy("python3") == str(beside)


def test_a_signal_is_reported_as_a_shell_does() -> None:
    assert exit_status(-signal.SIGKILL) == 128 + signal.SIGKILL
    assert exit_status(0) == 0
    assert exit_status(3) == 3


def test_envoy_runs_in_its_own_session_with_its_command_line(tmp_path: Path) -> None:
    arguments = tmp_path / "arguments"
    binary = tmp_path / "envoy"
    binary.write_text(f'#!/bin/sh\necho "$@" > {arguments}\nexec sleep 60\n')
    binary.chmod(0o755)
    config = _config(free_port())
    running = start_envoy(str(binary), tmp_path / "envoy-rev.json", config, "info", 3)
    try:
        recorded = eventually(lambda: arguments.exists() and arguments.read_text(),
                              what="the stand-in's arguments")
        command = envoy.envoy_command(str(binary), str(tmp_path / "envoy-rev.json"), "info",
                                      config, 3)
        assert recorded.split() == command[1:]
        # Its own session: a signal to the agent's process group does not reach it.
        assert os.getsid(running.process.pid) == running.process.pid
        assert running.poll() is None
    finally:
        running.kill_if_running()
    assert running.poll() == -signal.SIGKILL


# --- draining and readiness through the admin interface ------------------------------------------

def test_drain_waits_the_drain_time_then_stops_envoy(
        admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="injector.agent")
    running = EnvoyProcess(_sleeper(), _config(admin.port, drain_seconds=0.2))
    running.drain_and_stop()
    assert admin.posted == ["/drain_listeners?inboundonly&graceful"]
    assert running.poll() == -signal.SIGTERM
    assert "draining inbound listeners for 0.2s" in caplog.text


def test_envoy_is_stopped_even_if_it_cannot_be_told_to_drain(
        caplog: pytest.LogCaptureFixture) -> None:
    running = EnvoyProcess(_sleeper(), _config(free_port()))
    running.drain_and_stop()
    assert running.poll() == -signal.SIGTERM
    assert "could not start draining Envoy" in caplog.text


def test_an_expired_certificate_fails_readiness_until_a_new_one(
        admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="injector.agent")
    running = EnvoyProcess(_sleeper(), _config(admin.port))
    try:
        assert running.report_expiry(expired=True, not_after=0.0) is True
        assert "the certificate expired at 1970-01-01T00:00:00+00:00" in caplog.text
        assert running.report_expiry(expired=False, not_after=0.0) is False
        assert "a valid certificate again: ready" in caplog.text
        assert admin.posted == ["/healthcheck/fail", "/healthcheck/ok"]
    finally:
        running.kill_if_running()


def test_readiness_that_cannot_be_set_is_tried_again(
        admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    admin.status = 500
    running = EnvoyProcess(_sleeper(), _config(admin.port))
    try:
        # Envoy's state is unchanged, so the agent's next poll asks again.
        assert running.report_expiry(expired=True, not_after=0.0) is False
        assert "could not set Envoy's readiness" in caplog.text
    finally:
        running.kill_if_running()
