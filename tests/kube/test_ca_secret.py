"""The CA shared by the replicas through the Secret `istio-ca-secret` (injector.kube.ca_secret):
through `injector serve`, and in-process against the tests' fake API server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.ca import certsdir
from injector.kube import ca_secret, client
from tests.support.fakeapi import RunningFakeKube
from tests.support.servers import Server, start_server


def root_pem(server: Server) -> str:
    return server.root_cert.read_text()


def shared_secret(kube: RunningFakeKube) -> dict[str, Any] | None:
    return kube.api.store.get("secrets", "mesh-system", "istio-ca-secret")


@pytest.fixture
def api(fake_kube: RunningFakeKube) -> Iterator[Any]:
    """An API client of the fake API server, as serve makes one from --kubeconfig."""
    made = client.api_client(str(fake_kube.kubeconfig))
    assert made is not None
    yield made
    made.close()


def test_every_replica_signs_with_the_shared_root(tmp_path: Path,
                                                  fake_kube: RunningFakeKube) -> None:
    first = start_server(tmp_path / "a", "--kubeconfig", str(fake_kube.kubeconfig),
                         certs_dir=tmp_path / "a" / "certs")
    second = start_server(tmp_path / "b", "--kubeconfig", str(fake_kube.kubeconfig),
                          certs_dir=tmp_path / "b" / "certs")
    try:
        assert root_pem(first) == root_pem(second)
        secret = shared_secret(fake_kube)
        assert secret is not None
        assert base64.b64decode(secret["data"]["root-cert.pem"]).decode() == root_pem(first)
        assert (first.certs_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    finally:
        first.stop()
        second.stop()


def test_a_plugged_in_ca_wins_over_the_shared_secret(tmp_path: Path,
                                                     fake_kube: RunningFakeKube) -> None:
    plugged = start_server(tmp_path / "plugged", certs_dir=tmp_path / "plugged" / "certs")
    plugged.stop()
    server = start_server(tmp_path, "--kubeconfig", str(fake_kube.kubeconfig),
                          certs_dir=plugged.certs_dir)
    try:
        assert root_pem(server) == root_pem(plugged)
        assert shared_secret(fake_kube) is None
    finally:
        server.stop()


def test_a_ca_already_stored_is_adopted_as_it_is(
    tmp_path: Path, fake_kube: RunningFakeKube, api: Any
) -> None:
    stored = certsdir.generate_ca_files("cluster.local")
    fake_kube.api.store.put("secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "istio-ca-secret", "namespace": "mesh-system"},
        "data": {name: base64.b64encode(data).decode() for name, data in stored.items()},
    })
    certs = tmp_path / "certs"
    assert ca_secret.adopt_shared_ca(api, namespace="mesh-system", certs_dir=certs,
                                     trust_domain="cluster.local") is None
    for name in certsdir.CA_FILES:
        assert (certs / name).read_bytes() == stored[name]
    # Read, not written: the first replica's CA stays the one.
    assert [call.verb for call in fake_kube.api.calls] == ["get"]


def test_a_secret_without_the_ca_is_a_problem_not_a_failure_to_start(
    tmp_path: Path, fake_kube: RunningFakeKube, api: Any
) -> None:
    fake_kube.api.store.put("secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "istio-ca-secret", "namespace": "mesh-system"},
        "data": {"root-cert.pem": "not base64!"},
    })
    certs = tmp_path / "certs"
    problem = ca_secret.adopt_shared_ca(api, namespace="mesh-system", certs_dir=certs,
                                        trust_domain="cluster.local", attempts=1)
    assert problem is not None
    assert problem.startswith("shared CA Secret mesh-system/istio-ca-secret: Secret ")
    assert "lacks a valid" in problem
    assert problem.endswith("this replica signs with a root of its own until restarted")
    # Nothing half-adopted: serve then completes the directory with a CA of its own.
    assert not any((certs / name).exists() for name in certsdir.CA_FILES)
