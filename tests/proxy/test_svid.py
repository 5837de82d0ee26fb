"""The SVID as the agent handles it: a fresh P-256 key and its CSR, and the CA's answer checked
before anything is installed: every way a certificate can be unusable is refused in one line."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.proxy.svid import CLOCK_SKEW_SECONDS, UnusableAnswer, new_key_and_csr, parse_issued
from tests.support.hostile_ca import BAD_ANSWERS, WEB_ID, Signer


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


def _signed(key: ec.EllipticCurvePrivateKey, uri: str, signer: Signer | None = None) -> str:
    """A leaf for `key` naming `uri`, signed by the root of `signer` (by default a new one)."""
    return str((signer or Signer()).answer(key.public_key(), uri)["certificate_chain"][0])


def test_the_cas_answer_is_checked_before_use() -> None:
    request = new_key_and_csr(None)
    signer = Signer()
    answer = signer.answer(request.key.public_key(), "spiffe://cluster.local/ns/demo/sa/default")
    issued = parse_issued(answer, request.key, "cluster.local")
    assert issued.spiffe_id == "spiffe://cluster.local/ns/demo/sa/default"
    leaf = x509.load_pem_x509_certificate(answer["certificate_chain"][0].encode())
    assert issued.serial == leaf.serial_number
    assert issued.certificate_chain_pem == answer["certificate_chain"][0]
    root = answer["trust_bundle"][0]

    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(UnusableAnswer, match="not for our key"):
        parse_issued({"certificate_chain": [_signed(other_key, "spiffe://cluster.local/x",
                                                    signer)],
                      "trust_bundle": [root]}, request.key, "cluster.local")
    with pytest.raises(UnusableAnswer, match="trust domain"):
        parse_issued({"certificate_chain": [_signed(request.key, "spiffe://evil.local/x",
                                                    signer)],
                      "trust_bundle": [root]}, request.key, "cluster.local")
    with pytest.raises(UnusableAnswer, match="trust domain"):
        parse_issued({"certificate_chain": [
            _signed(request.key, "spiffe://cluster.local.evil/x", signer)],
            "trust_bundle": [root]}, request.key, "cluster.local")
    leaf_pem = answer["certificate_chain"][0]
    for broken in ({}, [], {"certificate_chain": [], "trust_bundle": [root]},
                   {"certificate_chain": ["not a PEM"], "trust_bundle": [root]},
                   {"certificate_chain": [leaf_pem]},
                   {"certificate_chain": [leaf_pem + leaf_pem], "trust_bundle": [root]},
                   {"certificate_chain": [leaf_pem] * 9, "trust_bundle": [root]},
                   {"certificate_chain": [leaf_pem], "trust_bundle": [root[:100]]}):
        with pytest.raises(UnusableAnswer):
            parse_issued(broken, request.key, "cluster.local")


@pytest.mark.parametrize(("kind", "message"), [
    ("v2", "is not an X.509 v3 certificate (version field 1)"),
    ("duplicate-extensions", "has the extension 2.5.29.17 more than once"),
    ("expired", "expired at"), ("not-yet-valid", "not valid before"),
    ("other-identity", "for spiffe://cluster.local/ns/shop/sa/admin, not"),
    ("other-trust-domain", "not one SPIFFE ID in trust domain cluster.local"),
    ("not-chained", "does not chain to the trust bundle"),
    ("bad-signature", "does not chain to the trust bundle"),
    ("ca-leaf", "a CA certificate, not a workload's"),
])
def test_an_unusable_certificate_is_refused_with_one_line(kind: str, message: str) -> None:
    # Issue 13: a v2 leaf or duplicate extensions was a traceback (exit 1); an expired one
    # replaced the good SVID; the others were installed as they came.
    assert kind in BAD_ANSWERS
    request = new_key_and_csr(WEB_ID)
    answer = Signer().answer(request.key.public_key(), WEB_ID, kind)
    with pytest.raises(UnusableAnswer) as refused:
        parse_issued(answer, request.key, "cluster.local", spiffe_id=WEB_ID)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_validity_allows_a_little_clock_skew_and_no_more() -> None:
    request = new_key_and_csr(WEB_ID)
    answer = Signer().answer(request.key.public_key(), WEB_ID, ttl_seconds=600)
    leaf = x509.load_pem_x509_certificate(answer["certificate_chain"][0].encode())
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    parse_issued(answer, request.key, "cluster.local", now=not_before - CLOCK_SKEW_SECONDS)
    with pytest.raises(UnusableAnswer, match="not valid before"):
        parse_issued(answer, request.key, "cluster.local",
                     now=not_before - CLOCK_SKEW_SECONDS - 1)
    with pytest.raises(UnusableAnswer, match="expired at"):
        parse_issued(answer, request.key, "cluster.local", now=not_after)


def test_a_chain_with_an_intermediate_and_the_root_is_taken() -> None:
    # What a CA with a plugged-in intermediate sends (Istio's cacerts): leaf, intermediate,
    # and maybe the root again.
    signer = Signer()
    now = dt.datetime.now(dt.UTC)
    middle_key = ec.generate_private_key(ec.SECP256R1())
    middle = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "mid")]))
              .issuer_name(signer.root.subject).public_key(middle_key.public_key())
              .serial_number(7).not_valid_before(now - dt.timedelta(hours=1))
              .not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(signer.key, hashes.SHA256()))
    request = new_key_and_csr(WEB_ID)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(middle.subject)
            .public_key(request.key.public_key()).serial_number(8)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(WEB_ID)]), critical=True)
            .sign(middle_key, hashes.SHA256()))
    pems = [cert.public_bytes(serialization.Encoding.PEM).decode()
            for cert in (leaf, middle, signer.root)]
    for chain in (pems[:2], pems):
        issued = parse_issued({"certificate_chain": chain, "trust_bundle": [pems[2]]},
                              request.key, "cluster.local", spiffe_id=WEB_ID)
        assert issued.serial == 8
    with pytest.raises(UnusableAnswer, match="does not chain"):
        parse_issued({"certificate_chain": pems[:1], "trust_bundle": [pems[2]]}, request.key,
                     "cluster.local")  # the intermediate left out


def test_pems_are_joined_one_per_line() -> None:
    request = new_key_and_csr(None)
    answer = Signer().answer(request.key.public_key(), WEB_ID)
    leaf, root = answer["certificate_chain"][0], answer["trust_bundle"][0]
    issued = parse_issued({"certificate_chain": [leaf.rstrip("\n")],
                           "trust_bundle": [root.rstrip("\n")]}, request.key, "cluster.local")
    assert issued.certificate_chain_pem == leaf
    assert issued.trust_bundle_pem == root
