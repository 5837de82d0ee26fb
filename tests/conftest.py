"""Fixtures shared by every test module; what they are built from lives in `tests.support`."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import Cluster, Mesh, cluster_for_session, install_mesh
from tests.support.fakeapi import RunningFakeKube, start_fake_kube
from tests.support.servers import Server, start_ca_server, start_server

# Every `injector serve` the tests start serves no gRPC CA unless it asks (`--grpc-port`): the
# default port, 15012, is one for the whole machine, and tests run in parallel.
os.environ.setdefault("INJECTOR_GRPC_PORT", "0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a test module: certificates made at start, default mesh config."""
    running = start_server(tmp_path_factory.mktemp("serve"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as https:
        yield https


@pytest.fixture(scope="module")
def ca_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a test module whose CA knows the static tokens of `tests.support.servers`
    (WEB_TOKEN, API_TOKEN), with no practical rate limit."""
    running = start_ca_server(tmp_path_factory.mktemp("ca-serve"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ca_client(ca_server: Server) -> Iterator[httpx.Client]:
    with ca_server.client() as https:
        yield https


@pytest.fixture(scope="module")
def grpc_ca_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`ca_server`, serving Istio's gRPC CA protocol too, on `grpc_ca_server.grpc_port`."""
    running = start_ca_server(tmp_path_factory.mktemp("grpc-ca-serve"), grpc=True)
    yield running
    running.stop()


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[RunningFakeKube]:
    """A fresh fake API server for one test, and a kubeconfig pointing at it."""
    running = start_fake_kube(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The real kube-apiserver and etcd (tests/support/cluster.py), one per test session (per
    xdist worker): it takes seconds to start, so each test takes a namespace of its own
    (`kube_cluster.namespace(...)`) instead of a cluster. Stopped, ports closed, at the end."""
    yield from cluster_for_session(tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="session")
def kube_mesh(kube_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Mesh]:
    """deploy/ applied to `kube_cluster` (its webhooks pointed at loopback) and the injector
    serving behind them with its own ServiceAccount's token. A test that stops the injector
    starts it again before it ends."""
    mesh = install_mesh(kube_cluster, tmp_path_factory.mktemp("mesh"))
    yield mesh
    mesh.stop_injector()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, None]:
    """On CI nothing skips: a test whose tool or binary is missing fails there, with the skip's
    reason (which says how to install or build what is missing). Locally a skip stays a skip."""
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, where nothing may skip: {reason}"
