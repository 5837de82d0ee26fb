"""The signing core: every X509-SVID field checked with `cryptography`, chains verified by the
`openssl verify` command, a real mutual-TLS handshake between two SVIDs, and every refusal."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.ca.authority import (
    Authority,
    ChainError,
    IssuedSvid,
    SigningPolicy,
    cert_to_pem,
    generate_key,
    key_to_pem,
    make_intermediate,
    make_root,
    sign_svid,
)
from injector.ca.refusals import Refusal, RefusalKind
from injector.mesh.spiffe import SpiffeId
from tests.support.certs import (
    WorkloadKey,
    make_csr,
    mutual_tls,
    p256,
    self_signed_authority,
    tampered_signature,
)

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "cluster.local"
WEB = SpiffeId.for_service_account(TD, "shop", "web")
API = SpiffeId.for_service_account(TD, "shop", "api")


def intermediate_authority(now: dt.datetime = NOW) -> tuple[Authority, x509.Certificate]:
    root_key = generate_key()
    root = make_root(root_key, trust_domain=TD, now=now)
    inter_key = ec.generate_private_key(ec.SECP384R1())
    inter = make_intermediate(inter_key, issuer_cert=root, issuer_key=root_key,
                                 common_name="cluster intermediate", now=now,
                                 validity=dt.timedelta(days=30))
    authority = Authority.build(signing_cert=inter, signing_key=inter_key,
                                   chain=[inter, root], roots=[root], trust_domain=TD)
    return authority, root


@pytest.fixture(scope="module")
def authority() -> Authority:
    return self_signed_authority(NOW)


def spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


# --- the SVID, field by field -------------------------------------------------------------------

@pytest.mark.parametrize("key_kind", ["p256", "p384", "rsa2048", "ed25519"])
def test_every_svid_field(authority: Authority, key_kind: str) -> None:
    key: WorkloadKey = {
        "p256": p256,
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[key_kind]()
    # The CSR's subject and SANs are the workload's wishes: none may reach the certificate.
    csr = make_csr(key, subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]),
                   sans=[x509.DNSName("kubernetes.default.svc"),
                         x509.UniformResourceIdentifier(str(WEB))])
    svid = sign_svid(csr, WEB, 3600, authority, NOW)
    cert = svid.certificate

    assert cert.version == x509.Version.v3
    assert cert.subject == x509.Name([])
    assert cert.issuer == authority.signing_cert.subject
    assert spki(cert.public_key()) == spki(key.public_key())
    assert cert.serial_number > 0 and cert.serial_number.bit_length() >= 64
    assert cert.not_valid_before_utc == NOW - dt.timedelta(seconds=60)
    assert cert.not_valid_after_utc == NOW + dt.timedelta(seconds=3600) == svid.expires_at
    assert svid.spiffe_id == WEB

    extensions = {ext.oid: ext for ext in cert.extensions}
    assert set(extensions) == {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
    san = extensions[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert san.critical  # the subject is empty (RFC 5280 4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WEB))]
    basic = extensions[ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical and basic.value.ca is False
    usage = extensions[ExtensionOID.KEY_USAGE]
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is (key_kind == "rsa2048")
    assert not (usage.value.key_cert_sign or usage.value.crl_sign
                or usage.value.content_commitment or usage.value.data_encipherment
                or usage.value.key_agreement)
    assert list(extensions[ExtensionOID.EXTENDED_KEY_USAGE].value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert extensions[ExtensionOID.SUBJECT_KEY_IDENTIFIER].value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[arg-type]
    issuer_ski = authority.signing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value
    assert extensions[ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value.key_identifier == \
        issuer_ski.digest
    cert.verify_directly_issued_by(authority.signing_cert)
    assert svid.certificate_chain_pems == (cert_to_pem(cert).decode(),)  # root excluded
    assert svid.trust_bundle_pems == (cert_to_pem(authority.signing_cert).decode(),)


def test_serials_are_random(authority: Authority) -> None:
    csr = make_csr(p256())
    serials = {sign_svid(csr, WEB, None, authority, NOW).serial_number for _ in range(50)}
    assert len(serials) == 50


def test_expires_at_is_the_certificates_not_after_to_the_second(authority: Authority) -> None:
    now = NOW + dt.timedelta(microseconds=987654)
    svid = sign_svid(make_csr(p256()), WEB, 3600, authority, now)
    assert svid.expires_at == svid.certificate.not_valid_after_utc
    assert svid.expires_at == (now + dt.timedelta(seconds=3600)).replace(microsecond=0)


def test_default_ttl_and_capping_at_the_ca_expiry() -> None:
    short_lived = self_signed_authority(NOW, validity=dt.timedelta(hours=2))
    csr = make_csr(p256())
    default = sign_svid(csr, WEB, None, short_lived, NOW,
                           policy=SigningPolicy(default_ttl_seconds=600))
    assert default.certificate.not_valid_after_utc == NOW + dt.timedelta(seconds=600)
    capped = sign_svid(csr, WEB, 86400, short_lived, NOW)
    assert capped.certificate.not_valid_after_utc == short_lived.signing_cert.not_valid_after_utc
    assert capped.expires_at == capped.certificate.not_valid_after_utc


def test_an_intermediate_caps_at_the_whole_path_and_returns_its_chain() -> None:
    authority, root = intermediate_authority()
    svid = sign_svid(make_csr(p256()), WEB, 60 * 86400, authority, NOW)
    assert svid.certificate.not_valid_after_utc == authority.signing_cert.not_valid_after_utc
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in svid.certificate_chain_pems]
    assert chain == [svid.certificate, authority.signing_cert]
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(root)
    assert svid.trust_bundle_pems == (cert_to_pem(root).decode(),)


# --- refusals -----------------------------------------------------------------------------------

def _csr_with_key_cert_sign() -> bytes:
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=False, encipher_only=False,
                          decipher_only=False)
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(usage, critical=True).sign(p256(), hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM))


INVALID, FORBIDDEN = RefusalKind.INVALID, RefusalKind.FORBIDDEN
REFUSALS: dict[str, tuple[object, RefusalKind, str]] = {
    "garbage": (lambda: b"hello", INVALID, "bad_csr"),
    "pem of a certificate": (
        lambda: cert_to_pem(self_signed_authority(NOW).signing_cert), INVALID, "bad_csr"),
    "broken base64": (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n"
                              b"-----END CERTIFICATE REQUEST-----\n", INVALID, "bad_csr"),
    "bad signature": (lambda: tampered_signature(make_csr(p256())), INVALID, "bad_signature"),
    "asks for a CA": (lambda: make_csr(p256(), ask_ca=True), INVALID, "ca_requested"),
    "asks to sign certificates": (lambda: _csr_with_key_cert_sign(), INVALID, "ca_requested"),
    "rsa 1024": (lambda: make_csr(rsa.generate_private_key(65537, 1024)), INVALID, "weak_key"),
    "p-521": (lambda: make_csr(ec.generate_private_key(ec.SECP521R1())), INVALID, "weak_key"),
    "secp256k1": (lambda: make_csr(ec.generate_private_key(ec.SECP256K1())), INVALID, "weak_key"),
    "another identity": (
        lambda: make_csr(p256(), sans=[x509.UniformResourceIdentifier(str(API))]),
        FORBIDDEN, "identity_mismatch"),
    "another trust domain": (
        lambda: make_csr(p256(), sans=[x509.UniformResourceIdentifier(
            "spiffe://evil.example/ns/shop/sa/web")]), FORBIDDEN, "identity_mismatch"),
    "its own and another": (
        lambda: make_csr(p256(), sans=[x509.UniformResourceIdentifier(str(WEB)),
                                       x509.UniformResourceIdentifier(str(API))]),
        FORBIDDEN, "identity_mismatch"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(authority: Authority, case: str) -> None:
    build, kind, reason = REFUSALS[case]
    with pytest.raises(Refusal) as refused:
        sign_svid(build(), WEB, None, authority, NOW)  # type: ignore[operator]
    assert (refused.value.kind, refused.value.reason) == (kind, reason)
    assert refused.value.message and "\n" not in refused.value.message


@pytest.mark.parametrize("ttl", [0, -1, 90 * 86400 + 1])
def test_ttl_out_of_range_is_refused(authority: Authority, ttl: int) -> None:
    with pytest.raises(Refusal) as refused:
        sign_svid(make_csr(p256()), WEB, ttl, authority, NOW)
    assert (refused.value.kind, refused.value.reason) == (RefusalKind.INVALID, "bad_ttl")
    sign_svid(make_csr(p256()), WEB, 90 * 86400, authority, NOW)  # the maximum itself is fine


def test_an_expired_ca_signs_nothing() -> None:
    authority = self_signed_authority(NOW, validity=dt.timedelta(days=1))
    later = NOW + dt.timedelta(days=2)
    assert authority.expired(later) and not authority.expired(NOW)
    with pytest.raises(Refusal) as refused:
        sign_svid(make_csr(p256()), WEB, 60, authority, later)
    assert (refused.value.kind, refused.value.reason) == (RefusalKind.UNAVAILABLE, "ca_expired")


def test_authority_refuses_pieces_that_do_not_fit() -> None:
    good = self_signed_authority(NOW)
    with pytest.raises(ChainError, match="does not match"):
        Authority.build(signing_cert=good.signing_cert, signing_key=generate_key(),
                           chain=[], roots=[good.signing_cert], trust_domain=TD)
    other = self_signed_authority(NOW)
    with pytest.raises(ChainError, match=r"not (signed|issued) by"):
        Authority.build(signing_cert=good.signing_cert, signing_key=good.signing_key,
                           chain=[], roots=[other.signing_cert], trust_domain=TD)
    with pytest.raises(ValueError, match="trust domain"):
        Authority.build(signing_cert=good.signing_cert, signing_key=good.signing_key,
                           chain=[], roots=[good.signing_cert], trust_domain="Not Valid")


# --- with real TLS tools ------------------------------------------------------------------------

def _write_svid(directory: Path, name: str, key: WorkloadKey, svid: IssuedSvid) -> None:
    (directory / f"{name}.key").write_bytes(key_to_pem(key))
    (directory / f"{name}-chain.pem").write_text("".join(svid.certificate_chain_pems))
    (directory / f"{name}-leaf.pem").write_text(svid.certificate_chain_pems[0])
    (directory / "bundle.pem").write_text("".join(svid.trust_bundle_pems))


def _openssl_verify(directory: Path, name: str, purpose: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", purpose,
         "-CAfile", str(directory / "bundle.pem"),
         "-untrusted", str(directory / f"{name}-chain.pem"), str(directory / f"{name}-leaf.pem")],
        capture_output=True, text=True, check=False)


@pytest.mark.parametrize("plugged_in", [False, True], ids=["self-signed", "intermediate"])
def test_openssl_verifies_the_chain(tmp_path: Path, plugged_in: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    authority = intermediate_authority(now)[0] if plugged_in else self_signed_authority(now)
    key = p256()
    _write_svid(tmp_path, "web", key, sign_svid(make_csr(key), WEB, 3600, authority, now))
    for purpose in ("sslclient", "sslserver"):
        result = _openssl_verify(tmp_path, "web", purpose)
        assert result.returncode == 0, result.stdout + result.stderr
    # The same command fails against a root that did not sign it: the check can fail.
    (tmp_path / "bundle.pem").write_bytes(cert_to_pem(self_signed_authority(NOW).signing_cert))
    assert _openssl_verify(tmp_path, "web", "sslclient").returncode != 0


@pytest.mark.parametrize("plugged_in", [False, True], ids=["self-signed", "intermediate"])
def test_two_svids_complete_a_mutual_tls_handshake(tmp_path: Path, plugged_in: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    authority = intermediate_authority(now)[0] if plugged_in else self_signed_authority(now)
    web_key, api_key = p256(), rsa.generate_private_key(65537, 2048)
    _write_svid(tmp_path, "web", web_key,
                sign_svid(make_csr(web_key), WEB, 3600, authority, now))
    _write_svid(tmp_path, "api", api_key,
                sign_svid(make_csr(api_key), API, 3600, authority, now))
    assert mutual_tls(tmp_path, "api", "web") == (str(WEB), str(API))


def test_a_peer_from_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ours, theirs = self_signed_authority(NOW), self_signed_authority(NOW)
    web_key, api_key = p256(), p256()
    _write_svid(tmp_path, "api", api_key, sign_svid(make_csr(api_key), API, 3600, ours, now))
    _write_svid(tmp_path, "web", web_key,
                sign_svid(make_csr(web_key), WEB, 3600, theirs, now))
    (tmp_path / "bundle.pem").write_bytes(cert_to_pem(ours.signing_cert))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        mutual_tls(tmp_path, "api", "web")


# --- properties ---------------------------------------------------------------------------------

_WORKLOAD_KEY = p256()
_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                     max_size=40)


@settings(max_examples=60, deadline=None)
@given(common_name=_printable, dns_names=st.lists(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    max_size=4))
def test_nothing_but_the_public_key_comes_from_the_csr(authority: Authority,
                                                       common_name: str,
                                                       dns_names: list[str]) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    svid = sign_svid(make_csr(_WORKLOAD_KEY, subject=subject, sans=sans or None), WEB, None,
                        authority, NOW)
    assert svid.certificate.subject == x509.Name([])
    assert list(svid.certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value) == [x509.UniformResourceIdentifier(str(WEB))]


_VALID_CSR_DER = x509.load_pem_x509_csr(
    make_csr(_WORKLOAD_KEY, sans=[x509.UniformResourceIdentifier(str(WEB))])).public_bytes(
    serialization.Encoding.DER)


def _flip(position: int, mask: int) -> bytes:
    data = bytearray(_VALID_CSR_DER)
    data[position % len(data)] ^= mask
    return (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(data))
            + b"-----END CERTIFICATE REQUEST-----\n")


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.builds(_flip, st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.binary(max_size=600),
    st.text(max_size=300),
    st.binary(max_size=400).map(lambda data: b"-----BEGIN CERTIFICATE REQUEST-----\n"
                                + base64.encodebytes(data)
                                + b"-----END CERTIFICATE REQUEST-----\n"),
))
def test_any_input_is_signed_or_refused_never_crashes(authority: Authority,
                                                      csr: bytes | str) -> None:
    try:
        sign_svid(csr, WEB, None, authority, NOW)
    except Refusal as refused:
        assert refused.kind is RefusalKind.INVALID
