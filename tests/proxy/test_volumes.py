"""What the agent writes into its two volumes: whole files only, and its key readable by no one
else."""

from __future__ import annotations

import json
import stat
from pathlib import Path, PurePosixPath

import pytest

from injector.proxy import envoy
from injector.proxy.svid import Issued
from injector.proxy.volumes import (
    install_svid,
    sds_directory,
    write_atomically,
    write_bootstrap,
)

ISSUED = Issued(spiffe_id="spiffe://cluster.local/ns/demo/sa/default",
                certificate_chain_pem="LEAF\nINTERMEDIATE\n", trust_bundle_pem="ROOT\n",
                serial=1, not_after=0.0)
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_file_is_replaced_whole_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_text("old")
    target.chmod(0o644)
    write_atomically(target, "new", 0o600)
    assert target.read_text() == "new"
    assert _mode(target) == 0o600
    assert [path.name for path in tmp_path.iterdir()] == ["key.pem"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "cert-chain.pem"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(target, "\ud800", 0o644)  # a lone surrogate: not UTF-8
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["cert-chain.pem"]


def test_the_svid_goes_into_both_volumes_and_the_key_stays_private(tmp_path: Path) -> None:
    certs, envoy_dir = tmp_path / "certs", tmp_path / "envoy"
    certs.mkdir()
    envoy_dir.mkdir()
    install_svid(certs, envoy_dir, ISSUED, KEY_PEM)
    assert {path.name: (path.read_text(), _mode(path)) for path in certs.iterdir()} == {
        "root-cert.pem": ("ROOT\n", 0o644),
        "cert-chain.pem": ("LEAF\nINTERMEDIATE\n", 0o644),
        "key.pem": (KEY_PEM, 0o600),
    }
    sds = sds_directory(envoy_dir)
    assert sorted(path.name for path in sds.iterdir()) == [
        envoy.CERTIFICATE_SECRET_FILE, envoy.TRUST_SECRET_FILE]
    certificate_file = sds / envoy.CERTIFICATE_SECRET_FILE
    assert json.loads(certificate_file.read_text()) == envoy.certificate_secret(
        "LEAF\nINTERMEDIATE\n", KEY_PEM)
    assert _mode(certificate_file) == 0o600  # it holds the key too
    trust_file = sds / envoy.TRUST_SECRET_FILE
    assert json.loads(trust_file.read_text()) == envoy.trust_secret("ROOT\n")
    assert _mode(trust_file) == 0o644


def test_a_renewal_replaces_the_files(tmp_path: Path) -> None:
    install_svid(tmp_path, tmp_path, ISSUED, KEY_PEM)
    renewed = Issued(spiffe_id=ISSUED.spiffe_id, certificate_chain_pem="NEW LEAF\n",
                     trust_bundle_pem="ROOT\n", serial=2, not_after=0.0)
    install_svid(tmp_path, tmp_path, renewed, KEY_PEM)
    assert (tmp_path / "cert-chain.pem").read_text() == "NEW LEAF\n"


def test_the_bootstrap_is_the_builders_as_json(tmp_path: Path) -> None:
    config = envoy.ProxyConfig(
        node_id=envoy.node_id("10.0.0.1", "web-0", "demo"), node_cluster="default.demo",
        trust_domain="cluster.local", mesh_cidrs=(), mtls_mode="PERMISSIVE",
        sds_dir=PurePosixPath(sds_directory(tmp_path)))
    path = write_bootstrap(tmp_path, config)
    assert path == tmp_path / "envoy-rev.json"
    assert json.loads(path.read_text()) == envoy.build_bootstrap(config)
    assert _mode(path) == 0o644
