"""The SVID as the agent handles it: a fresh P-256 key and its CSR, and the CA's answer checked
before anything is installed."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.proxy.svid import UnusableAnswer, new_key_and_csr, parse_issued


def test_the_csr_is_p256_and_names_the_expected_identity() -> None:
    request = new_key_and_csr("spiffe://cluster.local/ns/demo/sa/default")
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    assert csr.is_signature_valid
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/demo/sa/default"]
    assert "PRIVATE KEY" in request.key_pem
    assert new_key_and_csr(None).key_pem != request.key_pem  # a fresh key every time


def _signed(key: ec.EllipticCurvePrivateKey, uri: str) -> str:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(1234)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_the_cas_answer_is_checked_before_use() -> None:
    request = new_key_and_csr(None)
    leaf = _signed(request.key, "spiffe://cluster.local/ns/demo/sa/default")
    issued = parse_issued({"certificate_chain": [leaf], "trust_bundle": [leaf]}, request.key,
                          "cluster.local")
    assert issued.spiffe_id == "spiffe://cluster.local/ns/demo/sa/default"
    assert issued.serial == 1234
    assert issued.certificate_chain_pem == leaf

    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(UnusableAnswer, match="not for our key"):
        parse_issued({"certificate_chain": [_signed(other_key, "spiffe://cluster.local/x")],
                      "trust_bundle": [leaf]}, request.key, "cluster.local")
    with pytest.raises(UnusableAnswer, match="trust domain"):
        parse_issued({"certificate_chain": [_signed(request.key, "spiffe://evil.local/x")],
                      "trust_bundle": [leaf]}, request.key, "cluster.local")
    with pytest.raises(UnusableAnswer, match="trust domain"):
        parse_issued({"certificate_chain": [
            _signed(request.key, "spiffe://cluster.local.evil/x")], "trust_bundle": [leaf]},
            request.key, "cluster.local")
    for broken in ({}, [], {"certificate_chain": [], "trust_bundle": [leaf]},
                   {"certificate_chain": ["not a PEM"], "trust_bundle": [leaf]},
                   {"certificate_chain": [leaf]}):
        with pytest.raises(UnusableAnswer):
            parse_issued(broken, request.key, "cluster.local")


def test_pems_are_joined_one_per_line() -> None:
    request = new_key_and_csr(None)
    leaf = _signed(request.key, "spiffe://cluster.local/ns/demo/sa/default")
    issued = parse_issued({"certificate_chain": [leaf.rstrip("\n"), leaf],
                           "trust_bundle": [leaf.rstrip("\n")]}, request.key, "cluster.local")
    assert issued.certificate_chain_pem == leaf + leaf
    assert issued.trust_bundle_pem == leaf
