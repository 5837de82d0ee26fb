"""The server's TLS settings, in one place: what `serve`, the serving certificate's rotation and
the benchmark's baselines all build their contexts with. Standard library only, so that any
command may import it without loading the server."""

from __future__ import annotations

import ssl
from pathlib import Path

# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3's are all of that kind already).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_tls_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer only, whatever the OpenSSL build's default, with strong suites. Loading
    the pair checks that the key is the certificate's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(cert_path, key_path)
    return context
