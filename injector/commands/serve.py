"""`injector serve`: the webhook and the CA on one HTTPS port."""

from __future__ import annotations

import argparse
import os
import signal
import ssl
from pathlib import Path
from typing import Any

from injector.cli import CommandParser, UsageError
from injector.config import ConfigError, load_mesh_config

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
    parser.option("--log-level", default="info", type=str.lower,
                  choices=["debug", "info", "warning", "error"], help="log level")


def server_tls_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer only, whatever the OpenSSL build's default, with strong suites."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(cert_path, key_path)
    return context


def run(args: argparse.Namespace) -> int:
    # Imported here so that the other commands (the init container's among them) start fast.
    import uvicorn

    from injector import ca_api, cadir, logs
    from injector.app import create_app
    from injector.serving_cert import ServingCertificate

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port")
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    logs.configure(args.log_level)
    certs_dir = Path(args.certs_dir)
    cert_path, key_path = certs_dir / "tls.crt", certs_dir / "tls.key"
    problems: dict[str, str] = {}
    api = None
    try:
        if args.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST"):
            # The kubernetes client (12 MiB of RSS) only when there is an API to talk to, the
            # two cases where kube.api_client gives one.
            from injector import cluster, kube

            try:
                api = kube.api_client(args.kubeconfig)
            except kube.KubeConfigError as error:
                raise UsageError(str(error)) from None
        if api is not None:
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
        try:
            tls = server_tls_context(cert_path, key_path)
        except (OSError, ssl.SSLError) as error:
            raise UsageError(f"serving certificate {cert_path} with key {key_path}: they do not "
                             f"load, or do not match ({error.__class__.__name__})") from None
        ca_service = ca_api.build_ca_service(
            certs_dir=certs_dir, mesh=mesh, token_file=args.token_file, api_client=api
        )
    except (cadir.CertsError, ca_api.ConfigurationError) as error:
        raise UsageError(str(error)) from None
    serving = ServingCertificate(tls, cert_path, key_path)
    sync = None
    if api is not None:
        root_pem = (certs_dir / cadir.ROOT_CERT).read_text()
        sync = cluster.ClusterSync(api, root_pem=root_pem, mesh=mesh, problems=problems)
        sync.start()

    app = create_app(
        mesh=mesh,
        namespace_labels=sync.namespace_labels if sync else lambda namespace: None,
        readiness_checks=[ca_service.readiness, serving.readiness],
        degraded=sync.degraded if sync else list,
        routers=[ca_api.router(ca_service)],
        fast_routes=ca_api.fast_routes(ca_service),
        background=[serving.watch],
    )
    config = uvicorn_config(app, host=args.host, port=args.port, tls=tls,
                            cert_path=cert_path, key_path=key_path)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found. SIGTERM
    # is how Kubernetes stops a pod: once drained, that is a clean exit (0), not a death by
    # signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0


def uvicorn_config(app: Any, *, host: str, port: int, tls: ssl.SSLContext, cert_path: Path,
                   key_path: Path) -> Any:
    """serve's uvicorn settings, loaded, serving with `tls`. The benchmark's baselines use it
    too, so that they measure the same server stack."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(cert_path),
        ssl_keyfile=str(key_path),
        # The fast implementations, by name: "auto" would fall back silently to asyncio and
        # h11, several times slower, if they were missing.
        loop="uvloop",
        http="httptools",
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
