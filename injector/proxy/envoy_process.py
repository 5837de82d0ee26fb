"""Envoy as a child process of the agent: finding the binary, starting it, telling it through its
admin interface to fail readiness or to drain, and stopping it.

injector/proxy/envoy.py decides what Envoy runs with; this module only runs it. Envoy never
outlives the agent: it is killed if the agent dies, and stopped if the agent fails.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from injector.proxy import envoy

# The agent's one logger: its lines read as one process's, whichever module writes them.
log = logging.getLogger("injector.agent")

ADMIN_TIMEOUT = 2.0
STOP_TIMEOUT = 5.0  # after SIGTERM, before SIGKILL


def find_envoy(name: str) -> str | None:
    """The Envoy executable's path, or None when there is none to run."""
    found = shutil.which(name)
    if found is None and os.sep not in name:
        # Installed next to our interpreter (a venv, or the image's Python) but maybe not on PATH.
        beside = Path(sys.executable).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            found = str(beside)
    return found


def exit_status(returncode: int) -> int:
    """Envoy's return code as the agent's own exit status: killed by signal N is 128 + N, as a
    shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:
    """In Envoy's child process: get SIGTERM if the agent dies, so no orphan Envoy remains."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class EnvoyProcess:
    """A running Envoy and the admin port the agent reaches it on."""

    process: subprocess.Popen[bytes]
    config: envoy.ProxyConfig

    def _admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.config.ports.admin}{path}"

    def poll(self) -> int | None:
        """Envoy's return code once it has exited, else None."""
        return self.process.poll()

    def drain_and_stop(self) -> None:
        """Stop taking new inbound connections, let open ones finish for the drain time, then
        stop Envoy. Outbound keeps working meanwhile: the app may still call out while it shuts
        down."""
        import httpx  # on first use: a command that stops at a bad setting never loads it

        url = self._admin_url("/drain_listeners?inboundonly&graceful")
        try:
            response = httpx.post(url, timeout=ADMIN_TIMEOUT)
            response.raise_for_status()
            log.info("draining inbound listeners for %.1fs", self.config.drain_seconds)
        except httpx.HTTPError as error:
            log.warning("could not start draining Envoy (%s); stopping it", error)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=self.config.drain_seconds)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def report_expiry(self, *, expired: bool, not_after: float) -> bool:
        """Tell Envoy to fail readiness (its /ready answers 503 DRAINING after
        /healthcheck/fail) while the SVID has expired: the proxy can no longer open or accept
        mTLS, and the pod must leave its Services until a new SVID arrives. Returns the state
        Envoy is now in (unchanged if it could not be told: the next poll tries again)."""
        import httpx

        url = self._admin_url(f"/healthcheck/{'fail' if expired else 'ok'}")
        try:
            httpx.post(url, timeout=ADMIN_TIMEOUT).raise_for_status()
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

    def kill_if_running(self) -> None:
        """For an unexpected error in the agent: leave no Envoy behind."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_envoy(binary: str, bootstrap: Path, config: envoy.ProxyConfig, log_level: str,
                concurrency: int, component_log_level: str | None = None) -> EnvoyProcess:
    command = envoy.envoy_command(binary, str(bootstrap), log_level, config, concurrency,
                                  component_log_level)
    log.info("starting Envoy: %s", " ".join(command))
    # Its own session: a signal to the agent's process group (Ctrl-C in a terminal, `timeout`)
    # reaches the agent alone, which then drains Envoy as it should.
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                               preexec_fn=_die_with_parent)
    return EnvoyProcess(process, config)
