"""Istio's own CA client against the gRPC CA in TokenReview mode, on the real kube-apiserver:
tokens from the TokenRequest API bound to a pod, judged by the API server, as an Istio sidecar's
projected token would be."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from injector.ca.service import AUTH_FAILURE_BURST
from injector.server import grpc_ca
from injector.server.proto.istio_ca_pb2 import IstioCertificateRequest, IstioCertificateResponse
from tests.support.certs import make_csr, p256
from tests.support.cluster import Mesh
from tests.support.istio_caclient import CaClientResult, istio_ca_client
from tests.support.pods import pod
from tests.support.servers import Server, free_port, start_server

AUDIENCE = "istio-ca"


def start_grpc_replica(kube_mesh: Mesh, name: str) -> Server:
    """A replica of the mesh's injector (its credentials, its shared CA) serving gRPC too."""
    grpc_port = free_port()
    replica = start_server(kube_mesh.workdir / name, "--kubeconfig",
                           str(kube_mesh.kubeconfig), "--config", str(kube_mesh.config),
                           "--grpc-port", str(grpc_port))
    replica.grpc_port = grpc_port
    return replica


@pytest.fixture(scope="module")
def grpc_replica(kube_mesh: Mesh) -> Iterator[Server]:
    replica = start_grpc_replica(kube_mesh, "grpc-replica")
    yield replica
    replica.stop()


def ask(replica: Server, workdir: Path, token: str) -> CaClientResult:
    return istio_ca_client(workdir, address=f"127.0.0.1:{replica.grpc_port}",
                           root_cert=replica.root_cert, csr_pem=make_csr(p256()), token=token)


def test_istios_client_with_a_pod_bound_token_gets_that_pods_svid(
        kube_mesh: Mesh, grpc_replica: Server, tmp_path: Path) -> None:
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("istio-ca")
    cluster.service_account(namespace, "web")
    cluster.create_pod(namespace, pod("web-0", serviceAccountName="web"))
    token = cluster.token(namespace, "web", audience=AUDIENCE, bound_pod="web-0")
    result = ask(grpc_replica, tmp_path, token)
    assert result.returncode == 0, result.error
    chain = x509.load_pem_x509_certificates(result.chain_pem.encode())
    sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://cluster.local/ns/{namespace}/sa/web"]
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(result.chain_pem)  # openssl verify reads the first certificate
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(grpc_replica.root_cert),
                               str(leaf)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr


def test_istios_client_with_a_token_for_another_audience_is_unauthenticated(
        kube_mesh: Mesh, grpc_replica: Server, tmp_path: Path) -> None:
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("istio-ca")
    cluster.service_account(namespace, "web")
    cluster.create_pod(namespace, pod("web-0", serviceAccountName="web"))
    token = cluster.token(namespace, "web", bound_pod="web-0")  # the API server's audience
    result = ask(grpc_replica, tmp_path, token)
    assert result.returncode == 1
    assert "create certificate: rpc error: code = Unauthenticated desc = the token is not " \
        "valid for this CA: " in result.error
    assert "audience" in result.error


def test_a_client_that_keeps_failing_is_refused_before_a_tokenreview(kube_mesh: Mesh) -> None:
    """The failure budget is kept per client address over gRPC too (the peer gRPC reports):
    once spent, unknown tokens are RESOURCE_EXHAUSTED without asking the API server."""
    replica = start_grpc_replica(kube_mesh, "grpc-budget")
    try:
        channel = grpc.secure_channel(
            f"127.0.0.1:{replica.grpc_port}",
            grpc.ssl_channel_credentials(replica.root_cert.read_bytes()))
        call = channel.unary_unary(
            grpc_ca.METHOD_PATH, request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString)
        request = IstioCertificateRequest(csr=make_csr(p256()).decode())
        codes = []
        for attempt in range(AUTH_FAILURE_BURST + 2):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, metadata=(("authorization", f"Bearer unknown-{attempt}"),),
                     timeout=30)
            codes.append(caught.value.code())
        channel.close()
        assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many failed authentications from 127.0.0.1" in caught.value.details()
    finally:
        replica.stop()
