"""How `injector serve` becomes a running server once its settings are known.

`injector.commands.serve` reads the arguments; this module puts the parts together, and the order
is the point:

1. the shared CA adopted from the cluster, then the certificates directory completed;
2. everything a worker needs loaded (TLS context, CA, app parts) before anything listens, so a
   bad setting stops serve with one line (a `ConfigError`, exit code 2) and forked workers
   share the loaded code;
3. the socket bound once, in the parent, so that every worker accepts from it;
4. in each worker, the cluster duties started and uvicorn run: threads and pooled connections do
   not survive a fork, so each worker makes its own.

The heavy imports (uvicorn, FastAPI, the CA, the kubernetes client) stay inside the functions:
prometheus_client must not be imported before `serve` chooses its multiprocess mode, and the
kubernetes client is only loaded when there is an API to talk to (idle RSS is measured).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from injector.errors import ConfigError
from injector.mesh import names
from injector.mesh.config import MeshConfig
from injector.server.limits import Limits
from injector.server.tls import server_tls_context

# server_tls_context is the benchmark's and the tests' way to serve as `serve` does.
__all__ = ["ServeSettings", "Worker", "run_uvicorn", "serve", "server_tls_context",
           "uvicorn_config"]


@dataclass(frozen=True)
class ServeSettings:
    """What `injector serve` was asked for, checked: the flags, and the mesh config loaded."""

    host: str
    port: int
    certs_dir: Path
    dns_names: tuple[str, ...]
    token_file: str | None
    kubeconfig: str | None
    workers: int
    log_level: str
    mesh: MeshConfig
    # Istio's gRPC CA protocol (injector.server.grpc_ca) on this port, 0: not served; and the
    # cluster whose tokens it accepts (the ClusterID metadata Istio's sidecars send).
    grpc_port: int = 0
    cluster_id: str = names.DEFAULT_CLUSTER_ID


def uvicorn_config(app: Any, *, host: str, port: int, tls: ssl.SSLContext, cert_path: Path,
                   key_path: Path, limits: Limits | None = None) -> Any:
    """serve's uvicorn settings, loaded, serving with `tls`, its connections within `limits`
    (by default those of this process: injector.server.limits). The benchmark's baselines use
    it too, so that they measure the same server stack."""
    from injector.server.connections import (
        ConnectionGuard,
        GuardedConfig,
        GuardedHttpToolsProtocol,
    )

    limits = limits or Limits.for_this_process()
    config = GuardedConfig(
        app,
        guard=ConnectionGuard(limits),
        host=host,
        port=port,
        ssl_certfile=str(cert_path),
        ssl_keyfile=str(key_path),
        # The fast implementations, by name: "auto" would fall back silently to asyncio and
        # h11, several times slower, if they were missing. httptools' protocol, writing each
        # response in one piece and keeping each connection within its limits
        # (injector.server.coalesce, injector.server.connections).
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        log_config=None,
        access_log=False,
        server_header=False,
        # The callers (the API server, sidecars) connect directly; X-Forwarded-For from them
        # means nothing, and its middleware is a layer on every request.
        proxy_headers=False,
        timeout_keep_alive=int(limits.keep_alive_seconds),
        timeout_graceful_shutdown=20,
    )
    config.load()
    # Our context, not uvicorn's: the one the serving certificate started with.
    config.ssl = tls
    return config


def run_uvicorn(config: Any, listener: socket.socket,
                tls_context: Callable[[], ssl.SSLContext]) -> None:
    """Serve `config` (from uvicorn_config) on `listener` until SIGTERM or SIGINT, each new
    connection with the context `tls_context` gives then, within the config's limits."""
    from injector.server import httpio, limits, memory
    from injector.server.connections import GuardedServer

    limits.count_refusals()
    memory.limit_heap_growth()
    httpio.BODY_BUDGET.limit = config.guard.limits.body_budget_bytes
    GuardedServer(config, tls_context).run(sockets=[listener])


def serve(settings: ServeSettings) -> int:
    """Serve the webhook and the CA until SIGTERM (or SIGINT); the exit code. A setting that
    cannot work raises ConfigError before anything listens."""
    metrics_dir = None
    if settings.workers > 1:
        # Each worker counts in its own files, /metrics adds them up (prometheus_client's
        # multiprocess mode); it must be chosen before prometheus_client is imported.
        metrics_dir = tempfile.mkdtemp(prefix="injector-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _serve(settings)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(settings: ServeSettings) -> int:
    from injector.ca import certsdir
    from injector.server import logs, workers

    logs.configure(settings.log_level)
    problems: dict[str, str] = {}
    api = _api_client(settings.kubeconfig)
    if api is not None:
        from injector.kube import ca_secret

        shared_ca_problem = ca_secret.adopt_shared_ca(
            api, namespace=settings.mesh.injector_namespace, certs_dir=settings.certs_dir,
            trust_domain=settings.mesh.trust_domain)
        if shared_ca_problem:
            problems["shared-ca"] = shared_ca_problem
    certsdir.ensure_certs_dir(
        settings.certs_dir,
        trust_domain=settings.mesh.trust_domain,
        dns_names=settings.dns_names,
        namespace=settings.mesh.injector_namespace,
    )
    # Everything a worker loads, loaded once here: a bad setting stops serve with one line
    # before anything listens, and forked workers share the loaded code.
    worker = Worker(settings, problems, api)
    listener = _listen(settings.host, settings.port)
    if settings.grpc_port:
        # Each worker binds the gRPC port itself (after the fork, SO_REUSEPORT); a port already
        # taken is found here, before anything serves.
        _listen(settings.host, settings.grpc_port).close()
    logging.getLogger("injector").info(
        "serving the webhook and the CA on https://%s:%d with %d worker%s",
        settings.host, settings.port, settings.workers, "s" if settings.workers > 1 else "")
    if settings.workers == 1:
        return worker.serve(listener, index=0)
    if api is not None:
        api.close()  # its pooled connections must not be shared by the workers

    def work(index: int) -> int:
        return Worker(settings, problems, _api_client(settings.kubeconfig)).serve(
            listener, index=index)

    from prometheus_client import multiprocess

    return workers.Supervisor(settings.workers, work,
                              on_exit=multiprocess.mark_process_dead).run()


def _api_client(kubeconfig: str | None) -> Any:
    """The Kubernetes API client, or None without an API (local use)."""
    if not (kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        return None
    # The kubernetes client (15 MiB of RSS once imported) only when there is an API to talk
    # to: the two cases where client.api_client gives one.
    from injector.kube import client

    return client.api_client(kubeconfig)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None


class Worker:
    """One process's server: TLS context, CA, cluster duties and app, ready to serve."""

    def __init__(self, settings: ServeSettings, problems: dict[str, str], api: Any) -> None:
        from injector.ca.service import build_ca_service
        from injector.kube.tokenreview import KubeTokenReviewer
        from injector.server.serving_cert import ServingCertificate

        self.settings = settings
        self.problems = problems
        self.api = api
        self.cert_path = settings.certs_dir / "tls.crt"
        self.key_path = settings.certs_dir / "tls.key"
        try:
            self.serving = ServingCertificate(self.cert_path, self.key_path,
                                              settings.certs_dir / "root-cert.pem")
        except (OSError, ssl.SSLError, ValueError) as error:
            raise ConfigError(
                f"serving certificate {self.cert_path} with key {self.key_path}: they do not "
                f"load, or do not match ({error.__class__.__name__})") from None
        self.tls = self.serving.context
        self.ca_service = build_ca_service(
            certs_dir=settings.certs_dir, mesh=settings.mesh, token_file=settings.token_file,
            token_reviewer=None if api is None else KubeTokenReviewer(api),
            workers=settings.workers)

    def serve(self, listener: socket.socket, *, index: int) -> int:
        """Serve on `listener` until SIGTERM, then drain; 0. Worker 0 alone writes to the
        cluster (root ConfigMaps, the webhook's caBundle): one writer, N readers."""
        from injector.server import ca_routes
        from injector.server.app import create_app

        sync = None
        events = None
        if self.api is not None:
            from injector.ca import certsdir
            from injector.kube.sync import ClusterSync

            root_pem = (self.settings.certs_dir / certsdir.ROOT_CERT).read_text()
            sync = ClusterSync(self.api, root_pem=root_pem, mesh=self.settings.mesh,
                               problems=self.problems, writer=index == 0)
            sync.start()
            from injector.kube.client import Rest
            from injector.kube.events import EventRecorder

            events = EventRecorder(Rest(self.api))
            events.start()
        background = [self.serving.watch, self.ca_service.watch_token_file]
        grpc_server = self._grpc_server()
        if grpc_server is not None:
            # Served on the event loop while the app runs; stopped (its calls in flight
            # answered within grpc_ca.STOP_GRACE_SECONDS) once HTTPS has drained.
            background.append(grpc_server.serve)
        app = create_app(
            mesh=self.settings.mesh,
            namespace_labels=sync.namespace_labels if sync else lambda namespace: None,
            readiness_checks=[self.ca_service.readiness, self.serving.readiness],
            degraded=sync.degraded if sync else list,
            routers=[ca_routes.router(self.ca_service)],
            fast_routes=ca_routes.fast_routes(self.ca_service),
            background=background,
            observe_admission=events.observe if events else None,
        )
        config = uvicorn_config(app, host=self.settings.host, port=self.settings.port,
                                tls=self.tls, cert_path=self.cert_path, key_path=self.key_path)
        # uvicorn drains on SIGTERM, then raises the signal again for the handler it found.
        # SIGTERM is how Kubernetes stops a pod: once drained, that is a clean exit (0), not a
        # death by signal.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        run_uvicorn(config, listener, self.serving.current)
        return 0

    def _grpc_server(self) -> Any:
        """Istio's gRPC CA on --grpc-port beside HTTPS, with the same CA service and serving
        certificate, its port bound by this worker (SO_REUSEPORT); None when it is off."""
        if not self.settings.grpc_port:
            return None
        from injector.server import grpc_ca

        contexts = grpc_ca.ServingContexts(self.cert_path, self.key_path, self.serving.current)
        try:
            server, _ = grpc_ca.build_server(
                self.ca_service, host=self.settings.host, port=self.settings.grpc_port,
                contexts=contexts, cluster_id=self.settings.cluster_id)
        except OSError as error:
            raise ConfigError(str(error)) from None
        logging.getLogger("injector").info(
            "serving Istio's gRPC CA protocol on %s:%d", self.settings.host,
            self.settings.grpc_port)
        return server
