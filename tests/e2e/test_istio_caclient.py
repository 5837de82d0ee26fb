"""Istio's own CA client (security/pkg/nodeagent/caclient/providers/citadel, as pilot-agent uses
it, built from tests/istio/) against `injector serve --grpc-port`, with static tokens: what an
Istio sidecar pointed at us (CA_ADDR) gets, and how it reports each refusal. The same against
the real API server's TokenReview is in tests/kube/test_cluster_istio_ca.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.certs import make_csr, p256
from tests.support.istio_caclient import CaClientResult, istio_ca_client
from tests.support.servers import API_TOKEN, WEB_TOKEN, Server, start_ca_server


def ask(server: Server, workdir: Path, token: str | None, *, csr: bytes | None = None,
        ttl_seconds: int = 86400, cluster_id: str = "Kubernetes") -> CaClientResult:
    # By IP: Istio's client checks a "localhost" address as istiod.istio-system.svc.
    return istio_ca_client(workdir, address=f"127.0.0.1:{server.grpc_port}",
                           root_cert=server.root_cert, csr_pem=csr or make_csr(p256()),
                           token=token, ttl_seconds=ttl_seconds, cluster_id=cluster_id)


def test_istios_client_gets_an_svid_that_verifies_against_our_root(
        grpc_ca_server: Server, tmp_path: Path) -> None:
    result = ask(grpc_ca_server, tmp_path, WEB_TOKEN, ttl_seconds=3600)
    assert result.returncode == 0, result.error
    chain = x509.load_pem_x509_certificates(result.chain_pem.encode())
    leaf = chain[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/web"]
    # Leaf first, root last, as istiod answers: the last is our root itself.
    assert chain[-1] == x509.load_pem_x509_certificate(grpc_ca_server.root_cert.read_bytes())
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(grpc_ca_server.root_cert),
                               str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip().endswith(": OK")


def test_no_token_or_a_bad_one_is_reported_unauthenticated(grpc_ca_server: Server,
                                                           tmp_path: Path) -> None:
    missing = ask(grpc_ca_server, tmp_path / "none", None)
    assert missing.returncode == 1
    assert "create certificate: rpc error: code = Unauthenticated desc = missing bearer token" \
        in missing.error
    wrong = ask(grpc_ca_server, tmp_path / "wrong", "not-a-token-of-this-ca")
    assert "code = Unauthenticated desc = the token is not valid for this CA" in wrong.error


def test_another_identitys_san_is_reported_permission_denied(grpc_ca_server: Server,
                                                             tmp_path: Path) -> None:
    csr = make_csr(p256(), sans=[x509.UniformResourceIdentifier(
        "spiffe://cluster.local/ns/shop/sa/api")])
    result = ask(grpc_ca_server, tmp_path, WEB_TOKEN, csr=csr)
    assert result.returncode == 1
    assert "create certificate: rpc error: code = PermissionDenied desc = " in result.error


def test_an_over_long_ttl_is_reported_invalid_argument(grpc_ca_server: Server,
                                                       tmp_path: Path) -> None:
    result = ask(grpc_ca_server, tmp_path, WEB_TOKEN, ttl_seconds=400 * 86400)
    assert result.returncode == 1
    assert "code = InvalidArgument desc = ttl_seconds must be between 1 and" in result.error


def test_another_cluster_is_reported_unauthenticated(grpc_ca_server: Server,
                                                     tmp_path: Path) -> None:
    result = ask(grpc_ca_server, tmp_path, WEB_TOKEN, cluster_id="remote-west")
    assert "code = Unauthenticated desc = ClusterID 'remote-west' is not this CA's cluster" \
        in result.error


def test_over_the_rate_is_reported_resource_exhausted_after_istios_retries(
        tmp_path: Path) -> None:
    server = start_ca_server(tmp_path / "serve", "csrBurst: 1\ncsrRatePerSecond: 0.01\n",
                             grpc=True)
    try:
        assert ask(server, tmp_path / "first", WEB_TOKEN).returncode == 0
        # Istio's client retries RESOURCE_EXHAUSTED a few times, then reports it.
        result = ask(server, tmp_path / "second", WEB_TOKEN)
        assert result.returncode == 1
        assert "code = ResourceExhausted desc = too many certificate requests for shop/web" \
            in result.error
        assert ask(server, tmp_path / "other", API_TOKEN).returncode == 0
    finally:
        server.stop()
