"""The pod's SVID as the agent handles it: a fresh key and its CSR, and the CA's answer, checked.

Pure: nothing here talks to the CA or writes a file. Whatever the CA returns is checked here
before injector/proxy/volumes.py may install it, so a wrong or broken answer never reaches Envoy.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
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

# A certificate valid from at most this far ahead is taken (the CA's clock may run ahead of
# ours; it backdates notBefore by a minute for that reason too).
CLOCK_SKEW_SECONDS: Final = 60.0
# More than this in one answer is not an SVID answer (Istio's chains are 1 to 3 long).
MAX_CHAIN_CERTIFICATES: Final = 8
MAX_BUNDLE_CERTIFICATES: Final = 64

# What parsing a hostile certificate can raise: a broken encoding, a version other than 1 or 3,
# a key type OpenSSL does not know, duplicate or malformed extensions (met when read).
_PARSE_ERRORS = (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension,
                 UnsupportedAlgorithm)


@dataclass(frozen=True, slots=True)
class Issued:
    """An SVID as the CA returned it, checked."""

    spiffe_id: str
    certificate_chain_pem: str  # leaf first, then intermediates
    trust_bundle_pem: str
    serial: int
    not_after: float  # Unix time, from the leaf itself


def _pem_list(document: dict[str, Any], key: str, limit: int) -> list[str]:
    value = document.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UnusableAnswer(f"the CA's answer has no {key} list of PEM strings")
    if len(value) > limit:
        raise UnusableAnswer(f"the CA's answer has {len(value)} certificates in {key}; at most "
                             f"{limit} are taken")
    return value


def _pem_text(pems: list[str]) -> str:
    return "".join(pem if pem.endswith("\n") else pem + "\n" for pem in pems)


def _certificates(pems: list[str], key: str) -> list[x509.Certificate]:
    """Each PEM string as exactly one X.509 v3 certificate whose extensions all parse, once."""
    certificates = []
    for index, pem in enumerate(pems, start=1):
        where = f"{key}[{index - 1}]"
        try:
            found = x509.load_pem_x509_certificates(pem.encode("utf-8", "replace"))
            if len(found) != 1:
                raise UnusableAnswer(f"{where} holds {len(found)} certificates, not one")
            certificate = found[0]
            if certificate.version is not x509.Version.v3:
                raise UnusableAnswer(f"{where} is not an X.509 v3 certificate "
                                     f"({certificate.version.name})")
            certificate.extensions  # noqa: B018 - parsed here, where a failure is expected
        except x509.InvalidVersion as error:
            raise UnusableAnswer(f"{where} is not an X.509 v3 certificate (version field "
                                 f"{error.parsed_version})") from None
        except x509.DuplicateExtension as error:
            raise UnusableAnswer(f"{where} has the extension {error.oid.dotted_string} more "
                                 "than once") from None
        except _PARSE_ERRORS as error:
            raise UnusableAnswer(f"{where} is not a usable X.509 certificate "
                                 f"({type(error).__name__})") from None
        certificates.append(certificate)
    return certificates


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _utc(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def _check_validity(certificate: x509.Certificate, what: str, now: float) -> None:
    not_before = certificate.not_valid_before_utc.timestamp()
    not_after = certificate.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise UnusableAnswer(f"{what} expired at {_utc(not_after)}")
    if not_before > now + CLOCK_SKEW_SECONDS:
        raise UnusableAnswer(f"{what} is not valid before {_utc(not_before)}")


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _check_chain(chain: list[x509.Certificate], bundle: list[x509.Certificate],
                 now: float) -> None:
    """Leaf, then each intermediate issued by the next, up to a root of the trust bundle: what
    a peer checks of this certificate, checked before the peer ever sees it."""
    path = list(chain)
    while len(path) > 1 and path[-1] in bundle:
        path.pop()  # a chain may end with the root itself
    for child, parent in itertools.pairwise(path):
        if not _is_ca(parent):
            raise UnusableAnswer("the certificate chain holds a certificate that is not a CA")
        _check_validity(parent, "an intermediate CA of the chain", now)
        if not _issued_by(child, parent):
            raise UnusableAnswer("the certificate chain is broken: a certificate is not "
                                 "signed by the next one")
    top = path[-1]
    if not any(root.subject == top.issuer and _issued_by(top, root) for root in bundle):
        raise UnusableAnswer("the certificate does not chain to the trust bundle")


def parse_issued(document: Any, key: ec.EllipticCurvePrivateKey, trust_domain: str, *,
                 spiffe_id: str | None = None, now: float | None = None) -> Issued:
    """Check the CA's 200 answer before anything is installed: every certificate an X.509 v3
    one that parses whole; the leaf for our key, not a CA, valid now (give or take the clock
    skew), naming one SPIFFE ID in our trust domain (`spiffe_id` itself when we know who we
    are), and chaining to the answer's trust bundle. Anything else is UnusableAnswer, one
    line, and the SVID we have stays in place."""
    if not isinstance(document, dict):
        raise UnusableAnswer("the CA's answer is not a JSON object")
    chain_pems = _pem_list(document, "certificate_chain", MAX_CHAIN_CERTIFICATES)
    bundle_pems = _pem_list(document, "trust_bundle", MAX_BUNDLE_CERTIFICATES)
    chain = _certificates(chain_pems, "certificate_chain")
    bundle = _certificates(bundle_pems, "trust_bundle")
    leaf = chain[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        theirs = leaf.public_key().public_bytes(*spki)
    except _PARSE_ERRORS:
        raise UnusableAnswer("the CA's certificate has a key of an unknown type") from None
    if key.public_key().public_bytes(*spki) != theirs:
        raise UnusableAnswer("the CA's certificate is not for our key")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1 or not uris[0].startswith(f"spiffe://{trust_domain}/"):
        shown = [uri[:200] for uri in uris[:3]]
        raise UnusableAnswer(f"the CA's certificate names {shown or 'no URI'}, not one SPIFFE "
                             f"ID in trust domain {trust_domain}")
    if spiffe_id is not None and uris[0] != spiffe_id:
        raise UnusableAnswer(f"the CA's certificate is for {uris[0][:200]}, not {spiffe_id}")
    if _is_ca(leaf):
        raise UnusableAnswer("the CA's certificate is a CA certificate, not a workload's")
    now = time.time() if now is None else now
    _check_validity(leaf, "the CA's certificate", now)
    _check_chain(chain, bundle, now)
    return Issued(
        spiffe_id=uris[0],
        certificate_chain_pem=_pem_text(chain_pems),
        trust_bundle_pem=_pem_text(bundle_pems),
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc.timestamp(),
    )
