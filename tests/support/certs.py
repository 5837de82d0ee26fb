"""Certificates for the tests: workload keys and CSRs, a throwaway CA, a CSR request over HTTPS,
and a real mutual-TLS handshake between two SVIDs."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from injector.ca.authority import ROOT_VALIDITY, Authority, generate_key, make_root

WorkloadKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

def make_csr(key: WorkloadKey, *, subject: x509.Name | None = None,
             sans: list[x509.GeneralName] | None = None, ask_ca: bool = False) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ask_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())

def self_signed_authority(now: dt.datetime | None = None, *,
                          validity: dt.timedelta = ROOT_VALIDITY,
                          trust_domain: str = "cluster.local") -> Authority:
    """A CA that signs with its own root, as `injector serve` makes one; valid from `now`
    (default: the present) for `validity`."""
    now = now or dt.datetime.now(dt.UTC)
    key = generate_key()
    root = make_root(key, trust_domain=trust_domain, now=now, validity=validity)
    return Authority.build(signing_cert=root, signing_key=key, chain=[root], roots=[root],
                           trust_domain=trust_domain)


def tampered_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature value, so the CSR still parses
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)

def _context(side: ssl._SSLMethod, directory: Path, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(side)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # SPIFFE peers are checked by URI SAN, not host name
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cafile=str(directory / "bundle.pem"))
    context.load_cert_chain(str(directory / f"{name}-chain.pem"), str(directory / f"{name}.key"))
    return context


def peer_spiffe_id(connection: ssl.SSLSocket) -> str:
    der = connection.getpeercert(binary_form=True)
    assert der is not None
    sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    (uri,) = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def mutual_tls(directory: Path, server_name: str, client_name: str) -> tuple[str, str]:
    """A real TLS handshake; returns (the ID the server saw, the ID the client saw)."""
    server_context = _context(ssl.PROTOCOL_TLS_SERVER, directory, server_name)
    client_context = _context(ssl.PROTOCOL_TLS_CLIENT, directory, client_name)
    seen: dict[str, str | BaseException] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                raw, _ = listener.accept()
                with server_context.wrap_socket(raw, server_side=True) as tls:
                    seen["server"] = peer_spiffe_id(tls)
                    tls.sendall(tls.recv(5))
            except BaseException as error:  # reported to the test thread
                seen["server"] = error

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_context.wrap_socket(raw) as tls:
                client_saw = peer_spiffe_id(tls)
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
        finally:
            thread.join(timeout=10)
    server_saw = seen["server"]
    if isinstance(server_saw, BaseException):
        raise server_saw
    return server_saw, client_saw

def request_svid(client: httpx.Client, token: str | None, csr: bytes | str,
                 **fields: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = {"csr": csr.decode() if isinstance(csr, bytes) else csr, **fields}
    return client.post("/v1/certificates", json=body, headers=headers)
