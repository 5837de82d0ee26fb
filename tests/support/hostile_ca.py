"""A CA that answers badly, for the agent's tests: SVID answers broken in every way the agent
must refuse (`Signer`), and a real HTTPS server on loopback that sends them, or trickles its
answer a byte at a time, or sends too much (`HostileCA`).

The agent trusts the server's HTTPS certificate through `root_cert` (the `--ca-root-file`), and
the SVIDs it signs chain to `Signer.root` (the trust bundle in every answer), as with the real
CA. Every request is recorded (`requests`: when each arrived), so a test can see how often the
agent asks.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import json
import ssl
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.fakeapi import https_material

TRUST_DOMAIN = "cluster.local"
WEB_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"

# Answers the agent must refuse, keeping the SVID it has: each is a certificate chain and a
# trust bundle that parse as JSON, and fail one check.
BAD_ANSWERS = ("v2", "duplicate-extensions", "expired", "not-yet-valid", "other-identity",
               "other-trust-domain", "not-chained", "bad-signature", "ca-leaf")
# What else the server can do: answer well, trickle, or send what is not an answer at all.
SERVER_MODES = ("good", *BAD_ANSWERS, "trickle", "huge", "deep-json", "not-json")

_PLACEHOLDER_OID = x509.ObjectIdentifier("2.5.29.99")  # same encoded length as SAN's 2.5.29.17


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _der_to_pem(der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


def _ca(name: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(key, hashes.SHA256()))
    return key, certificate


class Signer:
    """A root of its own, and SVID answers for a workload's key: a good one, or a bad kind."""

    def __init__(self, trust_domain: str = TRUST_DOMAIN) -> None:
        now = dt.datetime.now(dt.UTC)
        self.trust_domain = trust_domain
        self.key, self.root = _ca(trust_domain, now)
        self._stranger_key, self._stranger = _ca("someone else", now)

    def answer(self, public_key: Any, spiffe_id: str = WEB_ID, kind: str = "good",
               ttl_seconds: float = 3600) -> dict[str, Any]:
        """The JSON document of a 200 answer, as the CA sends it."""
        now = dt.datetime.now(dt.UTC)
        not_before, not_after = now - dt.timedelta(seconds=60), now + dt.timedelta(
            seconds=ttl_seconds)
        if kind == "expired":
            not_before, not_after = now - dt.timedelta(hours=2), now - dt.timedelta(hours=1)
        elif kind == "not-yet-valid":
            not_before, not_after = now + dt.timedelta(hours=1), now + dt.timedelta(hours=2)
        uri = {"other-identity": f"spiffe://{self.trust_domain}/ns/shop/sa/admin",
               "other-trust-domain": "spiffe://elsewhere.example/ns/shop/sa/web"}.get(
                   kind, spiffe_id)
        issuer_key, issuer = ((self._stranger_key, self._stranger) if kind == "not-chained"
                              else (self.key, self.root))
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=kind == "ca-leaf", path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False))
        if kind == "duplicate-extensions":
            # Made under a placeholder OID, renamed to SAN's in the DER: a second SAN.
            builder = builder.add_extension(
                x509.UnrecognizedExtension(_PLACEHOLDER_OID, b"\x30\x00"), critical=False)
        der = builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        if kind == "duplicate-extensions":
            der = der.replace(bytes.fromhex("0603551d63"), bytes.fromhex("0603551d11"))
        elif kind == "v2":
            version_v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (v3)
            at = der.index(version_v3)
            der = der[:at] + bytes.fromhex("a003020101") + der[at + len(version_v3):]
        elif kind == "bad-signature":
            der = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]
        return {"spiffe_id": uri, "certificate_chain": [_der_to_pem(der)],
                "trust_bundle": [_pem(self.root)],
                "expires_at": not_after.isoformat().replace("+00:00", "Z")}


@dataclass
class HostileCA:
    """`POST /v1/certificates` over HTTPS on 127.0.0.1, answering as `mode` says (one of
    SERVER_MODES; change it at any time)."""

    directory: Path
    mode: str = "good"
    ttl_seconds: float = 3600
    trickle_seconds: float = 3.0  # between two bytes, in mode "trickle"
    requests: list[float] = field(default_factory=list)  # time.monotonic() of each
    signer: Signer = field(default_factory=Signer)
    _closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        material = https_material(self.directory / "hostile-ca-tls")
        self.root_cert = self.directory / "hostile-ca-root.pem"
        self.root_cert.write_bytes(material.ca_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(material.cert_file, material.key_file)
        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                hostile.requests.append(time.monotonic())
                length = int(self.headers.get("content-length") or 0)
                request = json.loads(self.rfile.read(length))
                # The agent may give up on us midway, as it should.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    hostile.answer(self, request)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # The handshake in each connection's thread, not in the one that accepts.
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, handler: http.server.BaseHTTPRequestHandler, request: Any) -> None:
        mode = self.mode
        if mode == "trickle":
            head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: 100000\r\n\r\n")
            for byte in head + b" " * 100_000:
                if self._closing.wait(self.trickle_seconds):
                    return
                handler.wfile.write(bytes([byte]))
            return
        if mode == "huge":
            body = b'{"certificate_chain": ["' + b"A" * (4 * 1024 * 1024) + b'"]}'
        elif mode == "deep-json":
            body = b"[" * 500_000
        elif mode == "not-json":
            body = b"<html>hello</html>"
        else:
            csr = x509.load_pem_x509_csr(request["csr"].encode())
            body = json.dumps(self.signer.answer(csr.public_key(), WEB_ID, mode,
                                                 self.ttl_seconds)).encode()
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
