"""The HTTPS serving certificate: rotated without a restart, never into a broken pair, and part
of readiness.

When `tls.crt`/`tls.key` change on disk (a Secret update), a new SSLContext is built from them
and checked whole before it replaces the live one: the key is the certificate's, the
certificate is valid now, and its chain verifies to the root(s) in `root-cert.pem` (when the
pair served at start did: a serving certificate from another CA is only checked for the first
two). Connections accepted afterwards get the new context (`injector.server.connections`),
open ones are not cut. A pair that fails a check is never served: the old one stays, with one
log line, until the files change again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from injector.server.tls import server_tls_context

log = logging.getLogger("injector.serving")

# A certificate issued a moment ago by a host whose clock is a little ahead is not refused.
CLOCK_SKEW = dt.timedelta(minutes=5)
# Enough for any real chain; a file of thousands of certificates is not one.
MAX_CHAIN_LENGTH = 10


class BadServingPair(ValueError):
    """A serving certificate and key that must not be served; the message says why."""


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chains_to(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> bool:
    """Whether `chain` (the leaf first, then certificates below a root, as in tls.crt) leads
    from its leaf to one of `roots`, each signature checked."""
    current = chain[0]
    candidates = list(chain[1:])
    for _ in range(len(candidates) + 1):
        if any(_issued_by(current, root) for root in roots):
            return True
        parent = next((cert for cert in candidates if _issued_by(current, cert)), None)
        if parent is None:
            return False
        candidates.remove(parent)
        current = parent
    return False


def load_checked(cert_path: Path, key_path: Path, roots: Sequence[x509.Certificate] | None,
                 now: dt.datetime) -> tuple[ssl.SSLContext, dt.datetime]:
    """A context serving the pair, and its leaf's expiry, once the pair is checked whole
    (`roots` None: no chain check). Raises BadServingPair saying what is wrong."""
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError) as error:
        raise BadServingPair(f"{cert_path.name} does not load ({_reason(error)})") from None
    if len(chain) > MAX_CHAIN_LENGTH:
        raise BadServingPair(f"{cert_path.name} holds {len(chain)} certificates")
    leaf = chain[0]
    if leaf.not_valid_after_utc <= now:
        raise BadServingPair(f"{cert_path.name} expired at {leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc > now + CLOCK_SKEW:
        raise BadServingPair(
            f"{cert_path.name} is not valid before {leaf.not_valid_before_utc.isoformat()}")
    if roots is not None and not chains_to(chain, roots):
        raise BadServingPair(f"{cert_path.name} does not chain to root-cert.pem")
    try:
        # Besides loading, OpenSSL checks that the key is the certificate's.
        context = server_tls_context(cert_path, key_path)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise BadServingPair(
            f"{key_path.name} does not load or does not match {cert_path.name} "
            f"({_reason(error)})") from None
    return context, leaf.not_valid_after_utc


def _reason(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or error.__class__.__name__


def _read_roots(roots_path: Path) -> list[x509.Certificate] | None:
    try:
        return x509.load_pem_x509_certificates(roots_path.read_bytes())
    except (OSError, ValueError):
        return None


class ServingCertificate:
    """The live serving context (`context`), replaced only by a pair checked whole."""

    def __init__(self, cert_path: Path, key_path: Path, roots_path: Path | None = None) -> None:
        """Loads the pair (ssl.SSLError or OSError if it does not load)."""
        self._cert_path = cert_path
        self._key_path = key_path
        self._roots_path = roots_path
        self._loaded_stamp = self._stamp()
        self._refused_stamp: tuple[int, int, int, int] | None = None
        self._missing = False
        self.context = server_tls_context(cert_path, key_path)
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        self._not_after = chain[0].not_valid_after_utc
        # A pair from our own CA must stay one; one from another CA (whose root we do not
        # hold) is checked for its key and dates only.
        roots = _read_roots(roots_path) if roots_path is not None else None
        self._check_chain = bool(roots) and chains_to(chain, roots or [])

    def current(self) -> ssl.SSLContext:
        """The context for a connection accepted now."""
        return self.context

    def _stamp(self) -> tuple[int, int, int, int]:
        cert, key = self._cert_path.stat(), self._key_path.stat()
        return (cert.st_mtime_ns, cert.st_ino, key.st_mtime_ns, key.st_ino)

    def reload_if_changed(self) -> bool:
        """Serve the pair on disk if either file changed and the pair is whole; a pair that is
        not keeps the old one, said once in the log."""
        try:
            stamp = self._stamp()
        except OSError as error:
            if not self._missing:
                self._missing = True
                log.warning("serving certificate not reloaded, the previous one is kept: %s",
                            _reason(error))
            return False
        self._missing = False
        if stamp in (self._loaded_stamp, self._refused_stamp):
            return False
        roots = None
        if self._check_chain and self._roots_path is not None:
            roots = _read_roots(self._roots_path) or []
        try:
            context, not_after = load_checked(self._cert_path, self._key_path, roots,
                                              dt.datetime.now(dt.UTC))
        except BadServingPair as error:
            # Often a Secret update caught half-written: the next change makes it whole.
            self._refused_stamp = stamp
            log.warning("serving certificate not reloaded, the previous one is kept: %s", error)
            return False
        self.context = context
        self._not_after = not_after
        self._loaded_stamp = stamp
        self._refused_stamp = None
        log.info("serving certificate reloaded, valid until %s", self._not_after.isoformat())
        return True

    def readiness(self) -> str | None:
        if dt.datetime.now(dt.UTC) >= self._not_after:
            return f"the serving certificate expired at {self._not_after.isoformat()}"
        return None

    async def watch(self, interval_seconds: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            self.reload_if_changed()
