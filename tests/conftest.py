"""Fixtures shared by every test module; what they are built from lives in `tests.support`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fakeapi import RunningFakeKube, start_fake_kube
from tests.support.servers import Server, start_server


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


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[RunningFakeKube]:
    """A fresh fake API server for one test, and a kubeconfig pointing at it."""
    running = start_fake_kube(tmp_path)
    try:
        yield running
    finally:
        running.stop()
