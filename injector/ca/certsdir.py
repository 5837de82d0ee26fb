"""The certificates directory (SPEC section 2, Istio's `cacerts` layout): the shell around `ca`.

| file | what |
| `root-cert.pem` | trust anchor(s) handed to workloads |
| `ca-cert.pem`, `ca-key.pem` | the signing CA (the root itself when self-signed) |
| `cert-chain.pem` | chain from the signing CA up to the root |
| `tls.crt`, `tls.key` | the HTTPS serving certificate (plus the chain below the root) |

`ensure_certs_dir` creates what is missing and never overwrites what exists, so a restart keeps
the same root and every SVID issued before still verifies. Files appear atomically (written to a
temporary file, then linked into place, which fails rather than replace a file that appeared in
the meantime), and keys are mode 0600 from the moment they exist. A directory made here is 0700
whatever the umask. `check_certs_dir` loads a directory as `serve` does, so that `certs init`
never calls a directory ready that `serve` would refuse.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from injector.ca import authority
from injector.errors import ConfigError
from injector.mesh import names
from injector.mesh.spiffe import SpiffeIdError, validate_trust_domain

ROOT_CERT = "root-cert.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
TLS_CERT = "tls.crt"
TLS_KEY = "tls.key"
CA_FILES = (ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN)

log = logging.getLogger("injector.certs")

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700  # the CA key lives here: no one else lists, adds or swaps files


class CertsError(ConfigError):
    """The certificates directory cannot be used or completed; the message is one line."""


# --- reading ------------------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertsError(f"{path}: missing") from None
    except OSError as error:
        raise CertsError(f"{path}: cannot read ({error.strerror})") from None


def read_certs(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM file; at least one."""
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm):
        raise CertsError(f"{path}: not a PEM certificate file") from None
    if not certs:
        raise CertsError(f"{path}: no certificate in it")
    return certs


def read_key(path: Path) -> authority.CAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertsError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                      | ed25519.Ed25519PrivateKey):
        raise CertsError(f"{path}: unsupported key type (ECDSA, RSA or Ed25519)")
    return key


# --- writing ------------------------------------------------------------------------------------

def make_private_dir(path: Path) -> None:
    """Create `path` and its missing parents, each 0700 whatever the umask (a umask of 000
    would otherwise leave the CA key's directory writable by anyone). A directory that already
    exists is left as it is: a mounted volume's mode is its owner's choice."""
    path = Path(path)
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: theirs, as it is
        except OSError as error:
            raise CertsError(f"{directory}: cannot create directory ({error.strerror})") from None
        # mkdir's mode is masked by the umask; chmod is not.
        directory.chmod(DIR_MODE)
    if not path.is_dir():
        raise CertsError(f"{path}: not a directory")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `data`, atomically and with `mode` from the start; never replace."""
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise CertsError(f"{path.parent}: cannot write ({error.strerror})") from None
    temp = Path(temp_name)
    try:
        # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
        with os.fdopen(fd, "wb") as handle:
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # link(2) fails if the name exists: a concurrent writer's file is kept, not replaced.
        os.link(temp, path)
    except FileExistsError:
        pass
    except OSError as error:
        raise CertsError(f"{path}: cannot write ({error.strerror})") from None
    finally:
        temp.unlink(missing_ok=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ensure_ca(certs_dir: Path, trust_domain: str, now: dt.datetime) -> None:
    paths = {name: certs_dir / name for name in CA_FILES}
    present = {name for name, path in paths.items() if path.exists()}
    if present == set(CA_FILES):
        return  # a complete CA (self-made earlier, or a plugged-in intermediate): used as is
    if CA_KEY in present:
        key = read_key(paths[CA_KEY])
    elif CA_CERT in present:
        raise CertsError(f"{paths[CA_CERT]} exists without {CA_KEY}: cannot sign with it")
    elif present:
        raise CertsError(f"{certs_dir}: incomplete CA ({', '.join(sorted(present))} without "
                         f"{CA_CERT} and {CA_KEY})")
    else:
        key = authority.generate_key()
        _write_new(paths[CA_KEY], authority.key_to_pem(key), KEY_MODE)
        key = read_key(paths[CA_KEY])  # whoever won a race to create it, use that key
    if CA_CERT in present:
        ca_cert = read_certs(paths[CA_CERT])[0]
    else:
        if present - {CA_KEY}:
            raise CertsError(f"{certs_dir}: incomplete CA ({CA_KEY} and "
                             f"{', '.join(sorted(present - {CA_KEY}))} without {CA_CERT})")
        # Left by an interrupted bootstrap: finish the self-signed root with the existing key.
        root = authority.make_root(key, trust_domain=trust_domain, now=now)
        _write_new(paths[CA_CERT], authority.cert_to_pem(root), CERT_MODE)
        ca_cert = read_certs(paths[CA_CERT])[0]
    if not authority.public_keys_match(key, ca_cert):
        raise CertsError(f"{paths[CA_KEY]} does not match {paths[CA_CERT]}")
    if not authority.is_self_signed(ca_cert):
        missing = [name for name in (ROOT_CERT, CERT_CHAIN) if name not in present]
        raise CertsError(f"{certs_dir}: intermediate CA in {CA_CERT} needs "
                         f"{' and '.join(missing)} as well")
    pem = authority.cert_to_pem(ca_cert)
    for name in (ROOT_CERT, CERT_CHAIN):
        if name not in present:
            _write_new(paths[name], pem, CERT_MODE)


def _ensure_serving(certs_dir: Path, namespace: str, dns_names: Sequence[str],
                    now: dt.datetime) -> None:
    cert_path, key_path = certs_dir / TLS_CERT, certs_dir / TLS_KEY
    if cert_path.exists() and key_path.exists():
        _warn_about_missing_names(cert_path, namespace, dns_names)
        return
    if cert_path.exists():
        raise CertsError(f"{cert_path} exists without {TLS_KEY}: remove it to make a new one")
    if not key_path.exists():
        _write_new(key_path, authority.key_to_pem(authority.generate_key()), KEY_MODE)
    key = read_key(key_path)
    issuer_cert = read_certs(certs_dir / CA_CERT)[0]
    if issuer_cert.not_valid_after_utc <= now:
        raise CertsError(f"{certs_dir / CA_CERT}: the CA expired at "
                         f"{authority.rfc3339(issuer_cert.not_valid_after_utc)}; it cannot issue "
                         f"{TLS_CERT}")
    issuer_key = read_key(certs_dir / CA_KEY)
    if not authority.public_keys_match(issuer_key, issuer_cert):
        raise CertsError(f"{certs_dir / CA_KEY} does not match {certs_dir / CA_CERT}")
    chain = read_certs(certs_dir / CERT_CHAIN)
    roots = read_certs(certs_dir / ROOT_CERT)
    serving = authority.make_serving_cert(key, issuer_cert=issuer_cert, issuer_key=issuer_key,
                                   namespace=namespace, dns_names=dns_names, now=now)
    # Clients trust only the root: send the intermediates with the leaf so they can build a path.
    below_root = [issuer_cert, *(c for c in chain if c != issuer_cert)]
    below_root = [c for c in below_root if c not in roots]
    _write_new(cert_path, b"".join(authority.cert_to_pem(c) for c in (serving, *below_root)),
               CERT_MODE)


def _warn_about_missing_names(cert_path: Path, namespace: str, dns_names: Sequence[str]
                              ) -> None:
    """Never overwritten means a new --dns-name is not in an existing tls.crt: say so."""
    try:
        serving = read_certs(cert_path)[0]
        present = list(serving.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value)
    except (CertsError, x509.ExtensionNotFound, ValueError):
        return  # whether it is usable at all is for the TLS server to say
    missing = [str(name.value) for name in authority.serving_names(namespace, dns_names)
               if name not in present]
    if missing:
        log.warning("%s does not cover %s; it is kept (never overwritten): remove %s and %s "
                    "to issue a new one", cert_path, ", ".join(missing), TLS_CERT, TLS_KEY)


def ensure_certs_dir(certs_dir: Path, *, trust_domain: str = names.DEFAULT_TRUST_DOMAIN,
                     dns_names: Sequence[str] = (),
                     namespace: str = names.DEFAULT_NAMESPACE) -> None:
    """Create whatever is missing in `certs_dir` (SPEC section 2); never overwrite anything.

    Raises CertsError with a one-line message when the directory cannot be written or what is
    there cannot be completed (a certificate without its key, a corrupt key, ...).
    """
    certs_dir = Path(certs_dir)
    make_private_dir(certs_dir)
    try:
        validate_trust_domain(trust_domain)
    except ValueError as error:
        raise CertsError(f"trust domain: {error}") from None
    now = _now()
    try:
        _ensure_ca(certs_dir, trust_domain, now)
        _ensure_serving(certs_dir, namespace, dns_names, now)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise _unusable(certs_dir, error) from None


def generate_ca_files(trust_domain: str) -> dict[str, bytes]:
    """A new self-signed CA in the SPEC section 2 file names, without touching any directory."""
    with tempfile.TemporaryDirectory() as scratch:
        _ensure_ca(Path(scratch), trust_domain, _now())
        return {name: (Path(scratch) / name).read_bytes() for name in CA_FILES}


def adopt_ca_files(certs_dir: Path, files: dict[str, bytes]) -> None:
    """Write the CA files given (a CA shared by the replicas), keys 0600; never overwrite."""
    certs_dir = Path(certs_dir)
    make_private_dir(certs_dir)
    for name in CA_FILES:
        _write_new(certs_dir / name, files[name], KEY_MODE if name == CA_KEY else CERT_MODE)


def load_authority(certs_dir: Path, trust_domain: str) -> authority.Authority:
    """Load the signing CA, checking that its key matches and its chain verifies to a root."""
    certs_dir = Path(certs_dir)
    signing_cert = read_certs(certs_dir / CA_CERT)[0]
    signing_key = read_key(certs_dir / CA_KEY)
    chain = read_certs(certs_dir / CERT_CHAIN)
    roots = read_certs(certs_dir / ROOT_CERT)
    try:
        return authority.Authority.build(signing_cert=signing_cert, signing_key=signing_key,
                                  chain=chain, roots=roots, trust_domain=trust_domain)
    except (authority.ChainError, SpiffeIdError) as error:
        raise CertsError(f"{certs_dir}: {error}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise _unusable(certs_dir, error) from None


def check_certs_dir(certs_dir: Path, trust_domain: str) -> None:
    """Load the directory as `serve` does: the signing CA (key matches, chain verifies to a root)
    and the serving pair (both parse, the key is the certificate's). CertsError, one line, for
    the first thing that does not load; a file that exists is never taken on trust."""
    certs_dir = Path(certs_dir)
    load_authority(certs_dir, trust_domain)
    cert_path, key_path = certs_dir / TLS_CERT, certs_dir / TLS_KEY
    serving = read_certs(cert_path)[0]
    key = read_key(key_path)
    try:
        matches = authority.public_keys_match(key, serving)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise _unusable(certs_dir, error) from None
    if not matches:
        raise CertsError(f"{key_path} does not match {cert_path}")


def _unusable(certs_dir: Path, error: Exception) -> CertsError:
    """A certificate or key that parses but cannot be used (unknown curve, broken field)."""
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    return CertsError(f"{certs_dir}: unusable certificate or key ({reason})")
