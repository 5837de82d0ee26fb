"""The HTTPS serving certificate: rotated without a restart, and part of readiness.

When `tls.crt`/`tls.key` change on disk (a Secret update), the pair is loaded into the live
SSLContext: connections accepted afterwards present the new certificate, open ones are not cut.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path

from cryptography import x509

log = logging.getLogger("injector.serving")


class ServingCertificate:
    def __init__(self, context: ssl.SSLContext, cert_path: Path, key_path: Path) -> None:
        self._context = context
        self._cert_path = cert_path
        self._key_path = key_path
        self._loaded_stamp = self._stamp()
        self._not_after = self._read_not_after()

    def _stamp(self) -> tuple[int, int, int, int]:
        cert, key = self._cert_path.stat(), self._key_path.stat()
        return (cert.st_mtime_ns, cert.st_ino, key.st_mtime_ns, key.st_ino)

    def _read_not_after(self) -> dt.datetime:
        certificate = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
        return certificate.not_valid_after_utc

    def reload_if_changed(self) -> bool:
        """Load the pair again if either file changed; a broken pair keeps the old one."""
        try:
            stamp = self._stamp()
            if stamp == self._loaded_stamp:
                return False
            self._context.load_cert_chain(self._cert_path, self._key_path)
            self._not_after = self._read_not_after()
        except (OSError, ssl.SSLError, ValueError) as error:
            # Often a Secret update caught half-written: the next poll sees it whole.
            log.warning("serving certificate not reloaded: %s", error)
            return False
        self._loaded_stamp = stamp
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
