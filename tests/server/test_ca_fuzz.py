"""Fuzzing `/v1/certificates` over HTTPS: clear refusals only, never a 5xx."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ObjectIdentifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.certs import make_csr, p256, request_svid
from tests.support.servers import WEB_TOKEN, Server

_VALID = make_csr(p256())
_VALID_DER = x509.load_pem_x509_csr(_VALID).public_bytes(serialization.Encoding.DER)


def pem(der: bytes) -> str:
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def odd_csr(extension_count: int, sans: int, critical: bool) -> str:
    """A real, well-signed CSR with unknown extensions and a long SAN list."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    for index in range(extension_count):
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ObjectIdentifier(f"1.3.6.1.4.1.99999.{index}"),
                                       b"\x05\x00"), critical=critical)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(f"host-{index}.example") for index in range(sans)]), critical=False)
    return builder.sign(p256(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


csr_texts = st.one_of(
    st.binary(max_size=500).map(pem),  # random DER
    st.integers(1, len(_VALID) - 1).map(lambda cut: _VALID[:cut].decode()),  # truncated PEM
    st.tuples(st.integers(0, len(_VALID_DER) - 1), st.integers(1, 255)).map(
        lambda flip: pem(_VALID_DER[:flip[0]] + bytes([_VALID_DER[flip[0]] ^ flip[1]])
                         + _VALID_DER[flip[0] + 1:])),  # one byte flipped
    st.text(max_size=200),
)
bodies: st.SearchStrategy[Any] = st.one_of(
    st.fixed_dictionaries({"csr": csr_texts}),
    st.fixed_dictionaries({"csr": st.just(_VALID.decode()), "ttl_seconds": st.one_of(
        st.integers(-(2**70), 2**70), st.text(), st.none(), st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False))}),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    st.lists(st.integers(), max_size=3),
)


def assert_clear(reply: httpx.Response) -> None:
    assert reply.status_code in (200, 400, 403, 413), reply.text
    if reply.status_code != 200:
        assert isinstance(reply.json()["error"], str) and reply.json()["error"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_any_body_is_signed_or_clearly_refused(ca_client: httpx.Client, body: Any) -> None:
    assert_clear(ca_client.post("/v1/certificates", json=body,
                                headers={"Authorization": f"Bearer {WEB_TOKEN}"}))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=2000))
def test_any_bytes_are_clearly_refused(ca_client: httpx.Client, raw: bytes) -> None:
    reply = ca_client.post("/v1/certificates", content=raw,
                           headers={"Authorization": f"Bearer {WEB_TOKEN}"})
    assert_clear(reply)
    assert reply.status_code != 200


@pytest.mark.parametrize(("extensions", "sans", "critical"),
                         [(3, 0, False), (2, 0, True), (0, 1000, False), (20, 300, False)])
def test_odd_extensions_and_huge_san_lists(ca_client: httpx.Client, extensions: int,
                                           sans: int, critical: bool) -> None:
    reply = request_svid(ca_client, WEB_TOKEN, odd_csr(extensions, sans, critical))
    assert_clear(reply)
    if reply.status_code == 200:
        # Whatever the CSR asked, the SVID names the caller alone.
        leaf = x509.load_pem_x509_certificate(reply.json()["certificate_chain"][0].encode())
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(name.value) for name in names] == ["spiffe://cluster.local/ns/shop/sa/web"]
        oids = {extension.oid.dotted_string for extension in leaf.extensions}
        assert not any(oid.startswith("1.3.6.1.4.1.99999") for oid in oids)


def test_the_ca_survived(ca_server: Server) -> None:
    assert ca_server.process.poll() is None
