"""The real thing for the tests: `injector serve` as a subprocess over HTTPS on loopback, and
the processes it starts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.eventually import eventually

# Ports handed out below the kernel's ephemeral range (32768-60999 by default), where no
# outgoing connection takes one meanwhile, one slice per pytest-xdist worker, so that a port
# checked free here is still free when the process it is given to binds it: the kernel's port 0
# had handed the same ephemeral ports to parallel tests and to their clients' connections
# ("Address already in use" now and then).
_PORT_SLICE = 2500
_FIRST_PORT = 20000


def _port_candidates() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    low = _FIRST_PORT + (index % 5) * _PORT_SLICE
    start = os.getpid() % _PORT_SLICE
    while True:
        for offset in range(_PORT_SLICE):
            yield low + (start + offset) % _PORT_SLICE


_candidates = _port_candidates()


def free_port() -> int:
    """A loopback port nothing listens on, not handed out again by this process for a while."""
    for _ in range(_PORT_SLICE):
        port = next(_candidates)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # the whole slice taken: let the kernel choose
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A running `injector serve` and what a client needs to trust it."""

    url: str
    port: int
    certs_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int = 0  # Istio's gRPC CA protocol (--grpc-port), 0: not served

    @property
    def root_cert(self) -> Path:
        return self.certs_dir / "root-cert.pem"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root_cert))

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 10)
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def workers(self, count: int, timeout: float = 15) -> list[int]:
        """The pids of `serve --workers`'s worker processes, once there are `count`."""

        def counted() -> list[int]:
            children = child_pids(self.process.pid)
            return children if len(children) == count else []

        return eventually(counted, timeout, what=f"{count} worker processes")


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def child_pids(parent: int) -> list[int]:
    """The living (not zombie) children of `parent`."""
    pids = [int(path.name) for path in Path("/proc").glob("[0-9]*")]
    return sorted(pid for pid in pids
                  if (state := process_state(pid)) is not None and state[1] == parent
                  and state[0] != "Z")


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """These processes frozen (SIGSTOP): with `serve --workers`, the others take every new
    connection."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def start_server(
    workdir: Path,
    *args: str,
    certs_dir: Path | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    port: int | None = None,
) -> Server:
    """Start `injector serve` on a free loopback port (or `port`) and wait until it answers
    over HTTPS. A free port can be taken by another process before serve binds it (tests run
    in parallel): then serve says so, and another port is tried."""
    for attempt in range(3):
        server = _start_server(workdir, args, certs_dir, env, port or free_port())
        if not wait_ready:
            return server
        try:
            wait_until_serving(server)
            return server
        except AssertionError:
            if port or attempt == 2 or "cannot listen on" not in server.log():
                raise
    raise AssertionError("unreachable")


def _start_server(workdir: Path, args: tuple[str, ...], certs_dir: Path | None,
                  env: dict[str, str] | None, port: int) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    certs_dir = certs_dir or workdir / "certs"
    log_path = workdir / f"serve-{port}.log"
    command = [sys.executable, "-m", "injector", "serve", "--port", str(port),
               "--certs-dir", str(certs_dir), *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, cwd=workdir,
        )
    return Server(f"https://127.0.0.1:{port}", port, certs_dir, process, log_path)


def wait_until_serving(server: Server, timeout: float = 30) -> None:
    """Until serve answers /healthz over HTTPS. Fails at once if serve exits, and stops it if it
    does not answer in time, serve's log in the message either way: a loop of its own rather
    than `eventually`, for those two endings."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"injector serve exited with {server.process.returncode}:\n{server.log()}")
        if server.root_cert.exists():
            try:
                with server.client() as client:
                    if client.get("/healthz").status_code == 200:
                        return
            except (httpx.TransportError, ssl.SSLError):
                pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"injector serve did not answer within {timeout}s:\n{server.log()}")


# Static CA tokens for the tests' servers (`--token-file`).
WEB_TOKEN = "static-token-shop-web-0123456789"
API_TOKEN = "static-token-shop-api-9876543210"


def write_tokens(path: Path) -> Path:
    path.write_text(f"- {{token: {WEB_TOKEN}, namespace: shop, serviceAccount: web}}\n"
                    f"- {{token: {API_TOKEN}, namespace: shop, serviceAccount: api}}\n")
    return path


def start_ca_server(workdir: Path, mesh_config: str = "csrBurst: 100000\n", *args: str,
                    grpc: bool = False) -> Server:
    """A server whose CA knows the static tokens above; by default with no practical rate
    limit, for tests that make many requests as one identity. `grpc`: serving Istio's gRPC CA
    protocol too, on a free port (`Server.grpc_port`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mesh.yaml"
    config.write_text(mesh_config)
    grpc_port = free_port() if grpc else 0
    server = start_server(workdir, "--config", str(config),
                          "--token-file", str(write_tokens(workdir / "tokens.yaml")),
                          "--grpc-port", str(grpc_port), *args)
    server.grpc_port = grpc_port
    return server
