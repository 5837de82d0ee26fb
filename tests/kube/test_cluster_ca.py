"""The CA in TokenReview mode against the real kube-apiserver: tokens from the TokenRequest API,
bound to a pod, judged by the API server's own TokenReview."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from cryptography import x509

from tests.support.certs import make_csr, p256, request_svid
from tests.support.cluster import Mesh
from tests.support.pods import pod

AUDIENCE = "istio-ca"


@dataclass
class Workload:
    namespace: str
    service_account: str
    pod_name: str


@pytest.fixture
def workload(kube_mesh: Mesh) -> Workload:
    """A pod stored in a namespace of its own, running as ServiceAccount `web`."""
    cluster = kube_mesh.cluster
    namespace = cluster.namespace("ca")
    cluster.service_account(namespace, "web")
    manifest = pod("web-0", serviceAccountName="web")
    cluster.create_pod(namespace, manifest)
    return Workload(namespace, "web", "web-0")


@pytest.fixture
def ca(kube_mesh: Mesh) -> Iterator[httpx.Client]:
    assert kube_mesh.injector is not None
    with kube_mesh.injector.client() as https:
        yield https


def uri_san(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    (uri,) = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def test_a_pod_bound_token_for_the_ca_gets_that_pods_identity(
        kube_mesh: Mesh, workload: Workload, ca: httpx.Client) -> None:
    token = kube_mesh.cluster.token(workload.namespace, workload.service_account,
                                    audience=AUDIENCE, bound_pod=workload.pod_name)
    answer = request_svid(ca, token, make_csr(p256()))
    assert answer.status_code == 200, answer.text
    assert uri_san(answer.json()["certificate_chain"][0]) == (
        f"spiffe://cluster.local/ns/{workload.namespace}/sa/{workload.service_account}")


def refused(kube_mesh: Mesh, ca: httpx.Client, token: str) -> str:
    """The CA's answer to `token`, which must be a 401 with a JSON error; the error, which says
    why (the API server's own reason, from its TokenReview)."""
    answer = request_svid(ca, token, make_csr(p256()))
    assert answer.status_code == 401, answer.text
    error: str = answer.json()["error"]
    assert error.startswith("the token is not valid for this CA: "), error
    return error


def test_a_token_for_another_audience_is_refused(
        kube_mesh: Mesh, workload: Workload, ca: httpx.Client) -> None:
    token = kube_mesh.cluster.token(workload.namespace, workload.service_account,
                                    bound_pod=workload.pod_name)
    assert "audience" in refused(kube_mesh, ca, token)


def test_an_expired_token_is_refused(
        kube_mesh: Mesh, workload: Workload, ca: httpx.Client) -> None:
    cluster = kube_mesh.cluster
    token = cluster.token(workload.namespace, workload.service_account, audience=AUDIENCE,
                          bound_pod=workload.pod_name)
    assert "expired" in refused(kube_mesh, ca, cluster.expired(token))


def test_a_token_whose_pod_was_deleted_is_refused(
        kube_mesh: Mesh, workload: Workload, ca: httpx.Client) -> None:
    cluster = kube_mesh.cluster
    token = cluster.token(workload.namespace, workload.service_account, audience=AUDIENCE,
                          bound_pod=workload.pod_name)
    cluster.kubectl("delete", "pod", workload.pod_name, "-n", workload.namespace,
                    "--grace-period=0", "--wait=true")
    # kube-apiserver's words for a token whose bound object is gone.
    assert "invalidated" in refused(kube_mesh, ca, token)
