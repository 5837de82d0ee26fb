"""The pod's SVID as the agent handles it: a fresh key and its CSR, and the CA's answer, checked.

Pure: nothing here talks to the CA or writes a file. Whatever the CA returns is checked here
before injector/proxy/volumes.py may install it, so a wrong or broken answer never reaches Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.errors import InvalidInput


class UnusableAnswer(InvalidInput):
    """A CA answer the agent must not install; the message is one line."""


# --- the key and the CSR -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyAndCsr:
    """A fresh private key (only ever in memory and in the 0600 files) and its CSR."""

    key: ec.EllipticCurvePrivateKey
    csr_pem: str

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def new_key_and_csr(spiffe_id: str | None) -> KeyAndCsr:
    """An ECDSA P-256 key and a CSR naming the identity we expect (the CA checks it against the
    token's and refuses a mismatch; it sets the certificate's identity itself in any case)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
    csr = builder.sign(key, hashes.SHA256())
    return KeyAndCsr(key, csr.public_bytes(serialization.Encoding.PEM).decode())


# --- the CA's answer -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Issued:
    """An SVID as the CA returned it, checked."""

    spiffe_id: str
    certificate_chain_pem: str  # leaf first, then intermediates
    trust_bundle_pem: str
    serial: int
    not_after: float  # Unix time, from the leaf itself


def _pem_list(document: dict[str, Any], key: str) -> list[str]:
    value = document.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UnusableAnswer(f"the CA's answer has no {key} list of PEM strings")
    return value


def _pem_text(pems: list[str]) -> str:
    return "".join(pem if pem.endswith("\n") else pem + "\n" for pem in pems)


def parse_issued(document: Any, key: ec.EllipticCurvePrivateKey, trust_domain: str) -> Issued:
    """Check the CA's 200 answer: the leaf is for our key and names an identity in our trust
    domain, and there is a trust bundle. Anything else is an error, never installed."""
    if not isinstance(document, dict):
        raise UnusableAnswer("the CA's answer is not a JSON object")
    chain = _pem_list(document, "certificate_chain")
    bundle = _pem_list(document, "trust_bundle")
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        for pem in bundle:
            x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise UnusableAnswer("the CA's answer holds a certificate that does not parse") from None
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise UnusableAnswer("the CA's certificate is not for our key")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1 or not uris[0].startswith(f"spiffe://{trust_domain}/"):
        raise UnusableAnswer(f"the CA's certificate names {uris or 'no URI'}, not one SPIFFE ID "
                             f"in trust domain {trust_domain}")
    return Issued(
        spiffe_id=uris[0],
        certificate_chain_pem=_pem_text(chain),
        trust_bundle_pem=_pem_text(bundle),
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc.timestamp(),
    )
