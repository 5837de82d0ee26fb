"""`injector serve`: the webhook and the CA on one HTTPS port, and the CA over Istio's gRPC
protocol on a second.

The flags and their checks; `injector.server.wiring` builds the server and runs it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from injector.commands.cli import CommandParser, UsageError
from injector.errors import ConfigError
from injector.mesh import names
from injector.mesh.config import load_mesh_config
from injector.server import wiring

MAX_WORKERS = 64
# A revision names a label value and a webhook configuration (injector-<revision>): a DNS label.
_REVISION = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def add_arguments(parser: CommandParser) -> None:
    parser.option("--host", default="127.0.0.1", help="address to listen on")
    parser.option("--port", default=15017, type=int, help="HTTPS port")
    parser.option("--grpc-port", default=names.GRPC_CA_PORT, type=int,
                  help=f"port of Istio's gRPC CA protocol (0: off); default {names.GRPC_CA_PORT}")
    parser.option("--cluster-id", default=names.DEFAULT_CLUSTER_ID,
                  help="the cluster ID Istio's sidecars send (ClusterID) that the gRPC CA "
                       f"accepts; default {names.DEFAULT_CLUSTER_ID}")
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
    parser.option("--revision", default=None,
                  help="the revision this server injects as (Istio's istio.io/rev): recorded on "
                       "each pod; overrides the mesh config's revision (default: default)")
    parser.option("--log-level", default="info", type=str.lower,
                  choices=["debug", "info", "warning", "error"], help="log level")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port")
    if not 0 <= args.grpc_port < 65536:
        raise UsageError(f"--grpc-port {args.grpc_port}: not a port (0: off)")
    if args.grpc_port and args.grpc_port == args.port:
        raise UsageError(f"--grpc-port {args.grpc_port}: the same as --port")
    if not args.cluster_id.strip():
        raise UsageError("--cluster-id: must not be empty")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers {args.workers}: must be 1 to {MAX_WORKERS}")
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if args.revision is not None:
        if not _REVISION.fullmatch(args.revision):
            raise UsageError(f"--revision {args.revision!r}: not a revision name (a label value: "
                             "a-z, 0-9 and -, at most 63, alphanumeric at both ends)")
        mesh = mesh.model_copy(update={"revision": args.revision})
    return wiring.serve(wiring.ServeSettings(
        host=args.host, port=args.port, certs_dir=Path(args.certs_dir),
        dns_names=tuple(args.dns_name), token_file=args.token_file,
        kubeconfig=args.kubeconfig, workers=args.workers, log_level=args.log_level, mesh=mesh,
        grpc_port=args.grpc_port, cluster_id=args.cluster_id))
