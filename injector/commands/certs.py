"""`injector certs init`: create the certificates directory's missing files (SPEC section 2),
then load the whole directory as `serve` would: "ready" means `serve` will start with it."""

from __future__ import annotations

import argparse
from pathlib import Path

from injector.ca.certsdir import CertsError, check_certs_dir, ensure_certs_dir
from injector.commands.cli import CommandParser, UsageError
from injector.mesh import names


def add_arguments(parser: CommandParser) -> None:
    actions = parser.add_subparsers(dest="certs_action", metavar="ACTION",
                                    parser_class=CommandParser)
    actions.required = True
    init = actions.add_parser(
        "init", help="create the root CA and serving certificate if missing",
        description="Create whatever is missing in the certificates directory: a self-signed "
                    "ECDSA P-256 root (10 years) and an HTTPS serving certificate signed by it. "
                    "Existing files are never overwritten.")
    init.option("--config", default=None, help="YAML settings file (camelCase keys)")
    init.option("--certs-dir", default="certs", help="the certificates directory")
    init.option("--trust-domain", default=names.DEFAULT_TRUST_DOMAIN,
                help="the SPIFFE trust domain")
    init.option("--dns-name", default=[], multiple=True,
                help="an extra name (or IP address) for the serving certificate; repeatable")
    init.option("--namespace", default=names.DEFAULT_NAMESPACE,
                help="the injector's namespace, for the serving certificate's service names")
    init.set_defaults(leaf_parser=init)


def run(args: argparse.Namespace) -> int:
    namespace = args.namespace
    # The mesh config's injectorNamespace is the same fact as --namespace: the same file that
    # configures serve gives the same serving certificate names here.
    config_namespace = getattr(args, "config_data", {}).get("injectorNamespace")
    if namespace == names.DEFAULT_NAMESPACE and isinstance(config_namespace, str):
        namespace = config_namespace
    certs_dir = Path(args.certs_dir)
    try:
        ensure_certs_dir(certs_dir, trust_domain=args.trust_domain,
                         dns_names=tuple(args.dns_name), namespace=namespace)
        # Files that existed were kept as they are: an empty key or a truncated certificate
        # among them is found here, not when serve starts.
        check_certs_dir(certs_dir, args.trust_domain)
    except CertsError as error:
        raise UsageError(str(error)) from None
    print(f"certificates ready in {args.certs_dir}")
    return 0
