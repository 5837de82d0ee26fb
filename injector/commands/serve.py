"""`injector serve`: the webhook and the CA on one HTTPS port."""

from __future__ import annotations

import argparse
import datetime
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from injector.cli import CommandParser, UsageError
from injector.config import ConfigError, load_mesh_config

if TYPE_CHECKING:
    from injector.app import ReadinessCheck


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


def _serving_cert_check(cert_path: Path) -> ReadinessCheck:
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    not_after = certificate.not_valid_after_utc

    def check() -> str | None:
        if datetime.datetime.now(datetime.UTC) >= not_after:
            return f"the serving certificate expired at {not_after.isoformat()}"
        return None

    return check


def run(args: argparse.Namespace) -> int:
    # Imported here so that the other commands (the init container's among them) start fast.
    import uvicorn

    from injector import ca_api, cadir, kube
    from injector.app import create_app

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port")
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    certs_dir = Path(args.certs_dir)
    try:
        cadir.ensure_certs_dir(
            certs_dir,
            trust_domain=mesh.trust_domain,
            dns_names=args.dns_name,
            namespace=mesh.injector_namespace,
        )
        api = kube.api_client(args.kubeconfig)
        ca_service = ca_api.build_ca_service(
            certs_dir=certs_dir, mesh=mesh, token_file=args.token_file, api_client=api
        )
        serving_check = _serving_cert_check(certs_dir / "tls.crt")
    except (cadir.CertsError, ca_api.ConfigurationError) as error:
        raise UsageError(str(error)) from None

    app = create_app(
        mesh=mesh,
        namespace_labels=lambda namespace: None,
        readiness_checks=[ca_service.readiness, serving_check],
        routers=[ca_api.router(ca_service)],
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(certs_dir / "tls.crt"),
        ssl_keyfile=str(certs_dir / "tls.key"),
        log_level=args.log_level,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=20,
    )
    config.load()
    assert config.ssl is not None
    # TLS 1.2 or newer only, whatever the OpenSSL build's default.
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    uvicorn.Server(config).run()
    return 0
