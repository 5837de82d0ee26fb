"""`injector serve`: the webhook and the CA on one HTTPS port."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

from injector.commands.cli import CommandParser, UsageError
from injector.errors import ConfigError
from injector.mesh.config import MeshConfig, load_mesh_config

# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3's are all of that kind already).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def add_arguments(parser: CommandParser) -> None:
    parser.option("--host", default="127.0.0.1", help="address to listen on")
    parser.option("--port", default=15017, type=int, help="HTTPS port")
    parser.option("--certs-dir", default="certs",
                  help="the certificates directory (Istio cacerts layout)")
    parser.option("--dns-name", default=[], multiple=True,
                  help="an extra DNS name for the serving certificate (repeatable)")
    parser.option("--config", default=None, help="mesh config YAML file")
    parser.option("--token-file", default=None,
                  help="static CA tokens: YAML list of {token, namespace, serviceAccount}")
    parser.option("--kubeconfig", default=None,
                  help="kubeconfig for the Kubernetes API (default: in-cluster when available)")
    parser.option("--workers", default=1, type=int,
                  help="worker processes sharing the port (one core each); default 1")
    parser.option("--log-level", default="info", type=str.lower,
                  choices=["debug", "info", "warning", "error"], help="log level")


def server_tls_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer only, whatever the OpenSSL build's default, with strong suites."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(cert_path, key_path)
    return context


MAX_WORKERS = 64


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers {args.workers}: must be 1 to {MAX_WORKERS}")
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    metrics_dir = None
    if args.workers > 1:
        # Each worker counts in its own files, /metrics adds them up (prometheus_client's
        # multiprocess mode); it must be chosen before prometheus_client is imported.
        metrics_dir = tempfile.mkdtemp(prefix="injector-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _run(args, mesh)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(args: argparse.Namespace, mesh: MeshConfig) -> int:
    # Imported here so that the other commands (the init container's among them) start fast.
    from injector.ca import certsdir as cadir
    from injector.server import logs, workers

    logs.configure(args.log_level)
    certs_dir = Path(args.certs_dir)
    problems: dict[str, str] = {}
    try:
        api = _api_client(args)
        if api is not None:
            from injector.kube import cluster

            shared_ca_problem = cluster.adopt_shared_ca(
                api, namespace=mesh.injector_namespace, certs_dir=certs_dir,
                trust_domain=mesh.trust_domain)
            if shared_ca_problem:
                problems["shared-ca"] = shared_ca_problem
        cadir.ensure_certs_dir(
            certs_dir,
            trust_domain=mesh.trust_domain,
            dns_names=args.dns_name,
            namespace=mesh.injector_namespace,
        )
        # Everything a worker loads, loaded once here: a bad setting stops serve with one line
        # before anything listens, and forked workers share the loaded code.
        worker = _Worker(args, mesh, certs_dir, problems, api)
    except cadir.CertsError as error:
        raise UsageError(str(error)) from None
    listener = _listen(args.host, args.port)
    logging.getLogger("injector").info(
        "serving the webhook and the CA on https://%s:%d with %d worker%s",
        args.host, args.port, args.workers, "s" if args.workers > 1 else "")
    if args.workers == 1:
        return worker.serve(listener, index=0)
    if api is not None:
        api.close()  # its pooled connections must not be shared by the workers

    def work(index: int) -> int:
        return _Worker(args, mesh, certs_dir, problems, _api_client(args)).serve(
            listener, index=index)

    from prometheus_client import multiprocess

    return workers.Supervisor(args.workers, work,
                              on_exit=multiprocess.mark_process_dead).run()


def _api_client(args: argparse.Namespace) -> Any:
    if not (args.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        return None
    # The kubernetes client (12 MiB of RSS) only when there is an API to talk to, the two
    # cases where kube.api_client gives one.
    from injector.kube import client as kube

    try:
        return kube.api_client(args.kubeconfig)
    except kube.KubeConfigError as error:
        raise UsageError(str(error)) from None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UsageError(f"cannot listen on {host}:{port}: {reason}") from None


class _Worker:
    """One process's server: TLS context, CA, cluster duties and app, ready to serve."""

    def __init__(self, args: argparse.Namespace, mesh: MeshConfig, certs_dir: Path,
                 problems: dict[str, str], api: Any) -> None:
        from injector.server import ca_api
        from injector.server.serving_cert import ServingCertificate

        self.args = args
        self.mesh = mesh
        self.certs_dir = certs_dir
        self.problems = problems
        self.api = api
        self.cert_path, self.key_path = certs_dir / "tls.crt", certs_dir / "tls.key"
        try:
            self.tls = server_tls_context(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as error:
            raise UsageError(
                f"serving certificate {self.cert_path} with key {self.key_path}: they do not "
                f"load, or do not match ({error.__class__.__name__})") from None
        try:
            self.ca_service = ca_api.build_ca_service(
                certs_dir=certs_dir, mesh=mesh, token_file=args.token_file, api_client=api,
                workers=args.workers)
        except ConfigError as error:
            raise UsageError(str(error)) from None
        self.serving = ServingCertificate(self.tls, self.cert_path, self.key_path)

    def serve(self, listener: socket.socket, *, index: int) -> int:
        """Serve on `listener` until SIGTERM, then drain; 0. Worker 0 alone writes to the
        cluster (root ConfigMaps, the webhook's caBundle): one writer, N readers."""
        import uvicorn

        from injector.server import ca_api
        from injector.server.app import create_app

        sync = None
        if self.api is not None:
            from injector.ca import certsdir as cadir
            from injector.kube import cluster

            root_pem = (self.certs_dir / cadir.ROOT_CERT).read_text()
            sync = cluster.ClusterSync(self.api, root_pem=root_pem, mesh=self.mesh,
                                       problems=self.problems, writer=index == 0)
            sync.start()
        app = create_app(
            mesh=self.mesh,
            namespace_labels=sync.namespace_labels if sync else lambda namespace: None,
            readiness_checks=[self.ca_service.readiness, self.serving.readiness],
            degraded=sync.degraded if sync else list,
            routers=[ca_api.router(self.ca_service)],
            fast_routes=ca_api.fast_routes(self.ca_service),
            background=[self.serving.watch, self.ca_service.watch_token_file],
        )
        config = uvicorn_config(app, host=self.args.host, port=self.args.port, tls=self.tls,
                                cert_path=self.cert_path, key_path=self.key_path)
        # uvicorn drains on SIGTERM, then raises the signal again for the handler it found.
        # SIGTERM is how Kubernetes stops a pod: once drained, that is a clean exit (0), not a
        # death by signal.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        uvicorn.Server(config).run(sockets=[listener])
        return 0


def uvicorn_config(app: Any, *, host: str, port: int, tls: ssl.SSLContext, cert_path: Path,
                   key_path: Path) -> Any:
    """serve's uvicorn settings, loaded, serving with `tls`. The benchmark's baselines use it
    too, so that they measure the same server stack."""
    import uvicorn

    from injector.server.coalesce import CoalescingHttpToolsProtocol

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(cert_path),
        ssl_keyfile=str(key_path),
        # The fast implementations, by name: "auto" would fall back silently to asyncio and
        # h11, several times slower, if they were missing. httptools' protocol, writing each
        # response in one piece (injector.coalesce).
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        log_config=None,
        access_log=False,
        server_header=False,
        # The callers (the API server, sidecars) connect directly; X-Forwarded-For from them
        # means nothing, and its middleware is a layer on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=20,
    )
    config.load()
    # Our context, not uvicorn's: it is the one the serving-certificate watcher reloads.
    config.ssl = tls
    return config
