"""Istio's injection webhook served over HTTPS by tests/istio/webhook, the peer that the
benchmarks set beside `injector serve` (bench/bench_istio_http.py, bench/bench_cluster.py): run
once here, as the benchmarks run it, so that a broken peer fails the suite instead of a
benchmark run."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.eventually import eventually
from tests.support.istio_parity import manifests_dir
from tests.support.peers import ISTIO_SCRIPT, built
from tests.support.pods import replicaset_pod, review
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dev certificates made by `injector certs init`, as the benchmarks make them."""
    path = tmp_path_factory.mktemp("istio-webhook") / "certs"
    subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir", str(path)],
                   check=True, cwd=ROOT, capture_output=True, timeout=60)
    return path


def _trust(certs: Path) -> ssl.SSLContext:
    """Only the dev root of `certs`."""
    return ssl.create_default_context(cafile=str(certs / "root-cert.pem"))


@pytest.fixture(scope="module")
def webhook(certs: Path) -> Iterator[str]:
    """The peer on a free port, started with neither GOMAXPROCS nor ENABLE_NATIVE_SIDECARS set
    (it sets both itself); its base URL once /healthz answers."""
    port = free_port()
    log_path = certs.parent / "webhook.log"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("GOMAXPROCS", "ENABLE_NATIVE_SIDECARS")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(built(ISTIO_SCRIPT, "webhook")), "--port", str(port),
             "--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key"),
             "--manifests", str(manifests_dir())],
            stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"https://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the webhook exited with {process.returncode}: "
                                 f"{log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/healthz", verify=_trust(certs),
                             timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(healthy, timeout=60, what="Istio's webhook answering /healthz")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def _containers_added(patch: list[dict[str, Any]], field: str) -> dict[str, dict[str, Any]]:
    """The containers (or init containers) the JSON patch adds, by name."""
    added: dict[str, dict[str, Any]] = {}
    for operation in patch:
        if operation["op"] == "add" and operation["path"].startswith(f"/spec/{field}"):
            value = operation["value"]
            for container in value if isinstance(value, list) else [value]:
                added[container["name"]] = container
    return added


def test_istio_webhook_injects_the_benchmarks_pod_over_https(webhook: str, certs: Path) -> None:
    request = review(replicaset_pod())
    reply = httpx.post(f"{webhook}/inject", content=json.dumps(request),
                       headers={"content-type": "application/json"},
                       verify=_trust(certs), timeout=30)

    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    response = answer["response"]
    assert response["uid"] == request["request"]["uid"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    proxy = _containers_added(patch, "containers")["istio-proxy"]
    # Istio's own sidecar, not ours: pilot-agent's arguments, and no native sidecar (the
    # program's ENABLE_NATIVE_SIDECARS=false, our injector's default too).
    assert proxy["args"][:2] == ["proxy", "sidecar"]
    assert "istio-init" in _containers_added(patch, "initContainers")
    assert "istio-proxy" not in _containers_added(patch, "initContainers")


def test_istio_webhook_refuses_to_start_without_its_certificate() -> None:
    done = subprocess.run([str(built(ISTIO_SCRIPT, "webhook")), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 2
    assert done.stderr.strip().startswith("webhook: usage: webhook --port PORT --cert FILE")
