"""The certificates directory: created when missing, never overwritten, keys private."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.ca import authority, certsdir

ALL_FILES = ("root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "tls.crt", "tls.key")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _openssl_verify(root: Path, leaf: Path, untrusted: Path | None = None) -> None:
    command = ["openssl", "verify", "-x509_strict", "-CAfile", str(root)]
    if untrusted is not None:
        command += ["-untrusted", str(untrusted)]
    result = subprocess.run([*command, str(leaf)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_creates_the_istio_cacerts_layout(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certsdir.ensure_certs_dir(certs, dns_names=["webhook.example.org", "10.9.8.7"],
                              namespace="istio-system")
    for name in ALL_FILES:
        assert (certs / name).is_file(), name
    for key in ("ca-key.pem", "tls.key"):
        assert stat.S_IMODE(os.stat(certs / key).st_mode) == 0o600
    root = _cert(certs / "root-cert.pem")
    assert root == _cert(certs / "ca-cert.pem") == _cert(certs / "cert-chain.pem")
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    serving = _cert(certs / "tls.crt")
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "localhost", "injector.istio-system.svc", "injector.istio-system.svc.cluster.local",
        "webhook.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.9.8.7")]
    assert not serving.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _openssl_verify(certs / "root-cert.pem", certs / "tls.crt")


def test_never_overwrites_and_keeps_the_root(tmp_path: Path) -> None:
    certsdir.ensure_certs_dir(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ALL_FILES}
    certsdir.ensure_certs_dir(tmp_path, dns_names=["other.example"], trust_domain="example.org")
    assert {name: (tmp_path / name).read_bytes() for name in ALL_FILES} == before


def test_a_name_missing_from_the_kept_serving_cert_is_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    certsdir.ensure_certs_dir(tmp_path, dns_names=["one.example"])
    certsdir.ensure_certs_dir(tmp_path, dns_names=["one.example"])
    assert "does not cover" not in caplog.text
    certsdir.ensure_certs_dir(tmp_path, dns_names=["one.example", "two.example"])
    assert "does not cover two.example" in caplog.text


def test_a_missing_serving_cert_is_reissued_from_the_same_root(tmp_path: Path) -> None:
    certsdir.ensure_certs_dir(tmp_path)
    root = (tmp_path / "root-cert.pem").read_bytes()
    (tmp_path / "tls.crt").unlink()
    (tmp_path / "tls.key").unlink()
    certsdir.ensure_certs_dir(tmp_path)
    assert (tmp_path / "root-cert.pem").read_bytes() == root
    _openssl_verify(tmp_path / "root-cert.pem", tmp_path / "tls.crt")


def test_an_interrupted_bootstrap_is_finished_with_the_existing_key(tmp_path: Path) -> None:
    key = authority.generate_key()
    (tmp_path / "ca-key.pem").write_bytes(authority.key_to_pem(key))
    certsdir.ensure_certs_dir(tmp_path)
    assert authority.public_keys_match(key, _cert(tmp_path / "ca-cert.pem"))
    assert (tmp_path / "ca-key.pem").read_bytes() == authority.key_to_pem(key)


def _plug_in_intermediate(certs: Path) -> tuple[x509.Certificate, x509.Certificate]:
    now = dt.datetime.now(dt.UTC)
    root_key = authority.generate_key()
    root = authority.make_root(root_key, trust_domain="cluster.local", now=now)
    inter_key = authority.generate_key()
    inter = authority.make_intermediate(inter_key, issuer_cert=root, issuer_key=root_key,
                                        common_name="plugged-in intermediate", now=now,
                                        validity=dt.timedelta(days=365))
    certs.mkdir(exist_ok=True)
    (certs / "root-cert.pem").write_bytes(authority.cert_to_pem(root))
    (certs / "ca-cert.pem").write_bytes(authority.cert_to_pem(inter))
    (certs / "ca-key.pem").write_bytes(authority.key_to_pem(inter_key))
    (certs / "cert-chain.pem").write_bytes(authority.cert_to_pem(inter)
                                           + authority.cert_to_pem(root))
    return root, inter


def test_a_plugged_in_intermediate_is_used_as_is(tmp_path: Path) -> None:
    root, inter = _plug_in_intermediate(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in certsdir.CA_FILES}
    certsdir.ensure_certs_dir(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in certsdir.CA_FILES} == before
    served = x509.load_pem_x509_certificates((tmp_path / "tls.crt").read_bytes())
    assert served[1:] == [inter]  # the intermediate travels with the serving cert
    served[0].verify_directly_issued_by(inter)
    _openssl_verify(tmp_path / "root-cert.pem", tmp_path / "tls.crt",
                    untrusted=tmp_path / "tls.crt")
    loaded = certsdir.load_authority(tmp_path, "cluster.local")
    assert loaded.chain == (inter,)
    assert loaded.anchor == root


@pytest.mark.parametrize(
    ("leave", "message"),
    [
        (("ca-cert.pem",), "without ca-key.pem"),
        (("root-cert.pem",), "incomplete CA"),
        (("ca-cert.pem", "ca-key.pem"), "needs root-cert.pem and cert-chain.pem"),
    ],
)
def test_an_incomplete_ca_is_refused_not_replaced(tmp_path: Path, leave: tuple[str, ...],
                                                  message: str) -> None:
    _plug_in_intermediate(tmp_path)
    for name in certsdir.CA_FILES:
        if name not in leave:
            (tmp_path / name).unlink()
    with pytest.raises(certsdir.CertsError, match=message):
        certsdir.ensure_certs_dir(tmp_path)


def test_corrupt_key_and_unwritable_dir_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "ca-key.pem").write_text("not a key\n")
    with pytest.raises(certsdir.CertsError, match="not an unencrypted PEM private key") as error:
        certsdir.ensure_certs_dir(tmp_path)
    assert "\n" not in str(error.value)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(certsdir.CertsError, match="cannot create directory"):
        certsdir.ensure_certs_dir(blocker / "certs")


def test_load_authority_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    certsdir.ensure_certs_dir(tmp_path)
    (tmp_path / "ca-key.pem").write_bytes(authority.key_to_pem(authority.generate_key()))
    with pytest.raises(certsdir.CertsError, match="does not match"):
        certsdir.load_authority(tmp_path, "cluster.local")


def test_load_authority_refuses_a_chain_that_does_not_verify(tmp_path: Path) -> None:
    _plug_in_intermediate(tmp_path)
    stranger = authority.make_root(authority.generate_key(), trust_domain="cluster.local",
                                   now=dt.datetime.now(dt.UTC))
    (tmp_path / "root-cert.pem").write_bytes(authority.cert_to_pem(stranger))
    (tmp_path / "cert-chain.pem").write_bytes((tmp_path / "ca-cert.pem").read_bytes())
    with pytest.raises(certsdir.CertsError, match=r"is not (signed|issued) by"):
        certsdir.load_authority(tmp_path, "cluster.local")


def test_a_certificate_that_parses_but_cannot_be_used_is_a_certs_error(tmp_path: Path) -> None:
    certsdir.ensure_certs_dir(tmp_path)
    der = _cert(tmp_path / "ca-cert.pem").public_bytes(serialization.Encoding.DER)
    p256_oid = bytes.fromhex("06082a8648ce3d030107")
    assert p256_oid in der
    unknown_curve = der.replace(p256_oid, p256_oid[:-1] + b"\x56")
    (tmp_path / "ca-cert.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(unknown_curve)
        + b"-----END CERTIFICATE-----\n")
    with pytest.raises(certsdir.CertsError, match="unusable certificate or key"):
        certsdir.load_authority(tmp_path, "cluster.local")
    (tmp_path / "tls.crt").unlink()  # so that the CA is needed to make a new one
    with pytest.raises(certsdir.CertsError, match="unusable certificate or key"):
        certsdir.ensure_certs_dir(tmp_path)


def test_a_shared_ca_is_generated_in_memory_and_adopted_without_overwriting(
        tmp_path: Path) -> None:
    files = certsdir.generate_ca_files("cluster.local")
    assert set(files) == set(certsdir.CA_FILES)
    first, second = tmp_path / "replica-1", tmp_path / "replica-2"
    certsdir.adopt_ca_files(first, files)
    certsdir.adopt_ca_files(second, files)
    for replica in (first, second):
        assert stat.S_IMODE(os.stat(replica / "ca-key.pem").st_mode) == 0o600
        certsdir.ensure_certs_dir(replica)
        _openssl_verify(replica / "root-cert.pem", replica / "tls.crt")
    assert certsdir.load_authority(first, "cluster.local").anchor == \
        certsdir.load_authority(second, "cluster.local").anchor
    certsdir.adopt_ca_files(first, certsdir.generate_ca_files("cluster.local"))  # a late loser
    assert (first / "ca-key.pem").read_bytes() == files["ca-key.pem"]
