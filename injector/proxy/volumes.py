"""What the agent writes, and where: the SVID into the certificates volume and Envoy's SDS files,
and the Envoy bootstrap.

These two volumes are the only places the agent writes (the pod's root filesystem is read-only).
Every file is replaced whole by a rename, so Envoy and the application read either the old file
or the new one; a private key is never readable by anyone else, not even for a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from injector.proxy import envoy
from injector.proxy.svid import Issued

# The certificates volume, as Istio lays it out for the application.
ROOT_CERT_FILE = "root-cert.pem"
CERTIFICATE_CHAIN_FILE = "cert-chain.pem"
PRIVATE_KEY_FILE = "key.pem"
# The Envoy volume: the bootstrap, and the directory Envoy watches for its SDS files.
BOOTSTRAP_FILE = "envoy-rev.json"
SDS_DIR = "sds"

PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600  # the key, and the SDS file that holds it too


def sds_directory(envoy_dir: Path) -> Path:
    return envoy_dir / SDS_DIR


def write_atomically(path: Path, data: str, mode: int) -> None:
    """Write beside `path` and rename over it: a reader (Envoy, the app) sees the old file or
    the new one, never half of one; the mode is set before any byte of a key is written."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def install_svid(certs_dir: Path, envoy_dir: Path, issued: Issued, key_pem: str) -> None:
    """The SVID into the certificates volume and into Envoy's SDS directory.

    The trust bundle goes first: after a root rotation the new certificate must never be
    served while peers' certificates are still checked against the old roots only.
    """
    sds = sds_directory(envoy_dir)
    sds.mkdir(mode=0o755, exist_ok=True)
    write_atomically(certs_dir / ROOT_CERT_FILE, issued.trust_bundle_pem, PUBLIC_MODE)
    write_atomically(certs_dir / CERTIFICATE_CHAIN_FILE, issued.certificate_chain_pem,
                     PUBLIC_MODE)
    write_atomically(certs_dir / PRIVATE_KEY_FILE, key_pem, PRIVATE_MODE)
    write_atomically(sds / envoy.TRUST_SECRET_FILE,
                     json.dumps(envoy.trust_secret(issued.trust_bundle_pem)), PUBLIC_MODE)
    write_atomically(sds / envoy.CERTIFICATE_SECRET_FILE,
                     json.dumps(envoy.certificate_secret(issued.certificate_chain_pem, key_pem)),
                     PRIVATE_MODE)


def write_bootstrap(envoy_dir: Path, config: envoy.ProxyConfig) -> Path:
    path = envoy_dir / BOOTSTRAP_FILE
    write_atomically(path, json.dumps(envoy.build_bootstrap(config), indent=1), PUBLIC_MODE)
    return path
