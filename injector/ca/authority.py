"""The certificate authority's pure core: keys, the root, the serving certificate and X509-SVIDs.

No file or network I/O here: `certsdir` reads and writes the certificates directory, `service`
decides who may ask, the transports (`injector.server.ca_routes`) speak to callers. Refusals
carry a kind, not a transport's status (`refusals`). Everything takes `now` as an argument so
that expiry rules are testable.

SVIDs follow the SPIFFE X509-SVID standard: an empty subject and exactly one SAN, a critical
URI SAN with the caller's SPIFFE ID; BasicConstraints CA false; KeyUsage digitalSignature only
(plus keyEncipherment for RSA keys); only the CSR's public key is ever copied into a certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from injector.ca.refusals import Refusal, RefusalKind
from injector.errors import InvalidInput
from injector.mesh.spiffe import SpiffeId

ROOT_VALIDITY: Final = dt.timedelta(days=3650)
SERVING_VALIDITY: Final = dt.timedelta(days=365)
BACKDATE: Final = dt.timedelta(seconds=60)
DEFAULT_TTL_SECONDS: Final = 24 * 3600
MAX_TTL_SECONDS: Final = 90 * 24 * 3600
MIN_RSA_BITS: Final = 2048
ALLOWED_EC_CURVES: Final = ("secp256r1", "secp384r1")

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
_HashAlgorithm = hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None


# --- keys and CA certificates -------------------------------------------------------------------

def generate_key() -> ec.EllipticCurvePrivateKey:
    """The key type for everything this CA makes itself: ECDSA P-256."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: CAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def signature_hash_for(key: CAPrivateKey) -> _HashAlgorithm:
    """The hash to sign with: matched to EC curve strength, none for Ed25519 (built in)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def random_serial() -> int:
    """A positive serial with 127 random bits (RFC 5280 allows up to 20 octets)."""
    return secrets.randbits(127) or 1


def _subject_key_id(key: CertificateIssuerPublicKeyTypes) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def make_root(key: CAPrivateKey, *, trust_domain: str, now: dt.datetime,
              validity: dt.timedelta = ROOT_VALIDITY) -> x509.Certificate:
    """A self-signed root CA for `trust_domain`, valid from a minute ago for `validity`."""
    public_key = key.public_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, "injector root CA"),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_subject_key_id(public_key), critical=False)
    )
    return builder.sign(key, signature_hash_for(key))


def make_intermediate(key: CAPrivateKey, *, issuer_cert: x509.Certificate,
                      issuer_key: CAPrivateKey, common_name: str, now: dt.datetime,
                      validity: dt.timedelta) -> x509.Certificate:
    """A CA certificate signed by another CA (used for plugged-in CAs and in tests)."""
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + validity, issuer_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_subject_key_id(public_key), critical=False)
        .add_extension(_authority_key_id(issuer_cert), critical=False)
    )
    return builder.sign(issuer_key, signature_hash_for(issuer_key))


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def _authority_key_id(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        # A plugged-in CA without an SKI: derive the identifier from its key, as it would be.
        # A CA certificate's key is a signing key (Authority.build checked it), which mypy
        # cannot see from the certificate's type.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key())  # type: ignore[arg-type]


def serving_names(namespace: str, dns_names: Sequence[str] = ()) -> list[x509.GeneralName]:
    """The HTTPS serving certificate's SANs (SPEC section 2); a `dns_name` that is an IP
    address becomes an IP SAN, since clients match IPs only against those."""
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName(f"injector.{namespace}.svc"),
        x509.DNSName(f"injector.{namespace}.svc.cluster.local"),
    ]
    for name in dns_names:
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            general = x509.DNSName(name)
        if general not in names:
            names.append(general)
    return names


def make_serving_cert(key: ec.EllipticCurvePrivateKey | CAPrivateKey, *,
                      issuer_cert: x509.Certificate, issuer_key: CAPrivateKey, namespace: str,
                      dns_names: Sequence[str] = (), now: dt.datetime,
                      validity: dt.timedelta = SERVING_VALIDITY) -> x509.Certificate:
    """The injector's own HTTPS certificate, signed by the CA, never outliving it."""
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"injector.{namespace}.svc"),
        ]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + validity, issuer_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(serving_names(namespace, dns_names)),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(rsa_key=isinstance(public_key, rsa.RSAPublicKey)),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_subject_key_id(public_key), critical=False)
        .add_extension(_authority_key_id(issuer_cert), critical=False)
    )
    return builder.sign(issuer_key, signature_hash_for(issuer_key))


def _leaf_key_usage(*, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def public_keys_match(key: CAPrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# --- the authority ------------------------------------------------------------------------------

class ChainError(InvalidInput):
    """The signing CA, its chain and the roots do not fit together; the message says why."""


def _verify_path(signing_cert: x509.Certificate, chain: Sequence[x509.Certificate],
                 roots: Sequence[x509.Certificate]) -> tuple[list[x509.Certificate],
                                                             x509.Certificate]:
    """Check signing CA -> intermediates -> a root; return (certs below the root, the root).

    `chain` may or may not start with the signing certificate and may or may not end with the
    root (Istio's `cert-chain.pem` includes both); both forms are accepted.
    """
    path = [signing_cert]
    for cert in chain:
        if cert != signing_cert and cert not in roots:
            path.append(cert)
    for cert in path:
        if not is_ca(cert):
            raise ChainError(f"{_describe(cert)} is not a CA certificate (BasicConstraints)")
    for child, parent in itertools.pairwise(path):
        _check_issued_by(child, parent)
    top = path[-1]
    if top in roots:
        return [], top
    for root in roots:
        if top.issuer == root.subject:
            _check_issued_by(top, root)
            return path, root
    raise ChainError(f"{_describe(top)} is not issued by any certificate in root-cert.pem")


def _check_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise ChainError(f"{_describe(child)} is not signed by {_describe(parent)}") from None


def _describe(cert: x509.Certificate) -> str:
    return f"certificate {cert.subject.rfc4514_string() or '(empty subject)'}"


@dataclass(frozen=True, eq=False)
class Authority:
    """A CA able to sign: its certificate and key, the path up to the root, the trust bundle.

    Per-authority work the signing loop would otherwise repeat (issuer name, AKI, PEM of the
    chain and bundle, effective expiry) is done once here.
    """

    signing_cert: x509.Certificate
    signing_key: CAPrivateKey
    chain: tuple[x509.Certificate, ...]  # signing CA up to, not including, the root
    roots: tuple[x509.Certificate, ...]  # the trust bundle handed to workloads
    anchor: x509.Certificate  # the root that `chain` leads to
    trust_domain: str
    chain_pems: tuple[str, ...] = field(init=False)
    trust_bundle_pems: tuple[str, ...] = field(init=False)
    not_after: dt.datetime = field(init=False)
    _issuer_name: x509.Name = field(init=False, repr=False)
    _authority_key_id: x509.AuthorityKeyIdentifier = field(init=False, repr=False)
    _hash: _HashAlgorithm = field(init=False, repr=False)

    @classmethod
    def build(cls, *, signing_cert: x509.Certificate, signing_key: CAPrivateKey,
              chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
              trust_domain: str) -> Authority:
        """Check that the pieces fit (key matches, path verifies) and assemble the authority."""
        SpiffeId(trust_domain, "")  # validates the trust domain
        if not roots:
            raise ChainError("no root certificate")
        if not public_keys_match(signing_key, signing_cert):
            raise ChainError("the CA key does not match the CA certificate")
        below_root, anchor = _verify_path(signing_cert, chain, roots)
        return cls(signing_cert=signing_cert, signing_key=signing_key, chain=tuple(below_root),
                   roots=tuple(roots), anchor=anchor, trust_domain=trust_domain)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: derived fields are filled in once, here
        set_(self, "chain_pems", tuple(cert_to_pem(c).decode("ascii") for c in self.chain))
        set_(self, "trust_bundle_pems",
             tuple(cert_to_pem(c).decode("ascii") for c in self.roots))
        path = (self.signing_cert, *self.chain, self.anchor)
        set_(self, "not_after", min(c.not_valid_after_utc for c in path))
        set_(self, "_issuer_name", self.signing_cert.subject)
        set_(self, "_authority_key_id", _authority_key_id(self.signing_cert))
        set_(self, "_hash", signature_hash_for(self.signing_key))

    @property
    def root_not_after(self) -> dt.datetime:
        return self.anchor.not_valid_after_utc

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after


# --- signing SVIDs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SigningPolicy:
    default_ttl_seconds: int = DEFAULT_TTL_SECONDS
    max_ttl_seconds: int = MAX_TTL_SECONDS


DEFAULT_POLICY: Final = SigningPolicy()


@dataclass(frozen=True)
class IssuedSvid:
    spiffe_id: SpiffeId
    certificate: x509.Certificate
    certificate_chain_pems: tuple[str, ...]  # leaf first, up to, not including, the root
    trust_bundle_pems: tuple[str, ...]
    expires_at: dt.datetime
    serial_number: int


_BASIC_CONSTRAINTS_LEAF: Final = x509.BasicConstraints(ca=False, path_length=None)
_EKU_MTLS: Final = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_KEY_USAGE_SIGN: Final = _leaf_key_usage(rsa_key=False)
_KEY_USAGE_SIGN_ENCIPHER: Final = _leaf_key_usage(rsa_key=True)
_EMPTY_NAME: Final = x509.Name([])


def check_csr_public_key(public_key: object) -> None:
    """Refuse weak or unsupported keys: RSA under 2048 bits, EC other than P-256/P-384."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_EC_CURVES:
            raise Refusal(RefusalKind.INVALID, "weak_key",
                          f"EC curve {public_key.curve.name} is not allowed (P-256 or P-384)")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise Refusal(RefusalKind.INVALID, "weak_key",
                          f"RSA key of {public_key.key_size} bits is too weak "
                          f"(at least {MIN_RSA_BITS})")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise Refusal(RefusalKind.INVALID, "weak_key",
                      f"unsupported key type {type(public_key).__name__.lstrip('_')}"
                      " (ECDSA P-256/P-384, RSA >= 2048 or Ed25519)")


def _parse_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    try:
        return x509.load_pem_x509_csr(data)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm):
        raise Refusal(RefusalKind.INVALID, "bad_csr",
                      "csr is not a PEM PKCS#10 request") from None


def _check_requested_extensions(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    try:
        extensions = csr.extensions
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType):
        raise Refusal(RefusalKind.INVALID, "bad_csr", "csr has malformed extensions") from None
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise Refusal(RefusalKind.INVALID, "ca_requested", "csr asks for a CA certificate")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise Refusal(RefusalKind.INVALID, "ca_requested",
                          "csr asks to sign certificates or CRLs")
        if isinstance(value, x509.SubjectAlternativeName):
            wanted = str(identity)
            for uri in value.get_values_for_type(x509.UniformResourceIdentifier):
                if uri != wanted:
                    raise Refusal(
                        RefusalKind.FORBIDDEN, "identity_mismatch",
                        f"csr names {uri[:200]!r} but the caller is {wanted}")


def sign_svid(csr_pem: bytes | str, identity: SpiffeId, ttl_seconds: int | None,
              authority: Authority, now: dt.datetime, *,
              policy: SigningPolicy = DEFAULT_POLICY) -> IssuedSvid:
    """Sign an X509-SVID for `identity` with the CSR's public key, or raise Refusal."""
    if authority.expired(now):
        raise Refusal(RefusalKind.UNAVAILABLE, "ca_expired",
                      f"the signing CA expired at {rfc3339(authority.not_after)}")
    ttl = policy.default_ttl_seconds if ttl_seconds is None else ttl_seconds
    if ttl <= 0 or ttl > policy.max_ttl_seconds:
        raise Refusal(RefusalKind.INVALID, "bad_ttl",
                      f"ttl_seconds must be between 1 and {policy.max_ttl_seconds}")
    if identity.trust_domain != authority.trust_domain:
        raise Refusal(RefusalKind.FORBIDDEN, "identity_mismatch",
                      f"identity {identity} is outside trust domain {authority.trust_domain}")
    csr = _parse_csr(csr_pem)
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Refusal(RefusalKind.INVALID, "weak_key",
                      "csr key type is not supported") from None
    check_csr_public_key(public_key)
    try:
        signature_valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        signature_valid = False  # e.g. a signature algorithm OpenSSL does not know
    if not signature_valid:
        raise Refusal(RefusalKind.INVALID, "bad_signature", "csr signature does not verify")
    _check_requested_extensions(csr, identity)

    not_after = min(now + dt.timedelta(seconds=ttl), authority.not_after)
    serial = random_serial()
    builder = x509.CertificateBuilder(
        issuer_name=authority._issuer_name,
        subject_name=_EMPTY_NAME,
        public_key=public_key,
        serial_number=serial,
        not_valid_before=now - BACKDATE,
        not_valid_after=not_after,
        extensions=[
            # RFC 5280: with an empty subject the SAN must be critical.
            x509.Extension(x509.SubjectAlternativeName.oid, True, x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(identity))])),
            x509.Extension(x509.BasicConstraints.oid, True, _BASIC_CONSTRAINTS_LEAF),
            x509.Extension(x509.KeyUsage.oid, True,
                           _KEY_USAGE_SIGN_ENCIPHER if isinstance(public_key, rsa.RSAPublicKey)
                           else _KEY_USAGE_SIGN),
            x509.Extension(x509.ExtendedKeyUsage.oid, False, _EKU_MTLS),
            # check_csr_public_key let through only signing keys (RSA, P-256/P-384, Ed25519),
            # which mypy cannot see: X25519 and the like never get here.
            x509.Extension(x509.SubjectKeyIdentifier.oid, False,
                           _subject_key_id(public_key)),  # type: ignore[arg-type]
            x509.Extension(x509.AuthorityKeyIdentifier.oid, False, authority._authority_key_id),
        ],
    )
    try:
        certificate = builder.sign(authority.signing_key, authority._hash)
    except (ValueError, TypeError):
        raise Refusal(RefusalKind.INVALID, "bad_csr", "csr cannot be signed") from None
    return IssuedSvid(
        spiffe_id=identity,
        certificate=certificate,
        certificate_chain_pems=(cert_to_pem(certificate).decode("ascii"),
                                *authority.chain_pems),
        trust_bundle_pems=authority.trust_bundle_pems,
        expires_at=certificate.not_valid_after_utc,  # what the certificate says, to the second
        serial_number=serial,
    )


def rfc3339(moment: dt.datetime) -> str:
    """UTC, second precision, `Z` suffix: what Kubernetes and Go's time.RFC3339 print."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
