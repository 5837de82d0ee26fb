"""Faults around the server: the Kubernetes API slow, failing or gone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.certs import make_csr, p256, request_svid
from tests.support.fakeapi import RunningFakeKube, start_fake_kube
from tests.support.pods import pod, review
from tests.support.servers import Server, start_server

POD_TOKEN = "projected-token-of-shop-web"
_tokens = iter(range(1_000_000))


def fresh_token(kube: RunningFakeKube) -> str:
    """A token the CA has not cached yet, so that it must ask the API."""
    token = f"{POD_TOKEN}-{next(_tokens)}"
    kube.api.add_service_account_token(token, "shop", "web")
    return token


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFakeKube]:
    running = start_fake_kube(tmp_path_factory.mktemp("kube"))
    running.api.add_service_account_token(POD_TOKEN, "shop", "web")
    running.api.store.add_namespace("shop", {"istio-injection": "enabled"})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, kube: RunningFakeKube) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("serve"), "--kubeconfig", str(kube.kubeconfig))
    yield running
    running.stop()


def check_service(server: Server, token: str) -> httpx.Response:
    """/inject answers well inside the API server's 10 s budget, whatever the API does; the
    CA's answer for a TokenReview caller is returned."""
    with server.client(timeout=httpx.Timeout(8.0)) as client:
        answer = client.post("/inject", json=review(pod(), namespace="shop"))
        assert answer.status_code == 200
        assert answer.json()["response"]["allowed"] is True
        return request_svid(client, token, make_csr(p256()))


def test_a_healthy_api_authenticates_the_sidecar(server: Server, kube: RunningFakeKube) -> None:
    assert check_service(server, fresh_token(kube)).status_code == 200


@pytest.mark.parametrize("fault", ["slow", "failing", "gone"])
def test_a_faulty_api_gives_503_with_retry_after(
    server: Server, kube: RunningFakeKube, fault: str
) -> None:
    if fault == "slow":
        kube.api.delay_seconds = 5.0
    elif fault == "failing":
        kube.api.fail_with = 500
    else:
        kube.stop()
    try:
        refused = check_service(server, fresh_token(kube))
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) > 0
        assert "error" in refused.json()
    finally:
        kube.api.delay_seconds = 0.0
        kube.api.fail_with = None
        if fault == "gone":
            kube.start()
    # And it recovers by itself once the API does.
    assert check_service(server, fresh_token(kube)).status_code == 200


def test_no_token_appears_in_the_logs(server: Server) -> None:
    with server.client() as client:
        request_svid(client, "a-secret-token-nobody-knows", make_csr(p256()))
        request_svid(client, POD_TOKEN, "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n")
        request_svid(client, POD_TOKEN, make_csr(p256()))
    log = server.log()
    assert "a-secret-token-nobody-knows" not in log
    assert POD_TOKEN not in log
    assert "garbage" not in log
    assert "PRIVATE KEY" not in log


def serve_fails(certs_dir: Path) -> str:
    """serve's stderr, after checking it refused to start in one line with exit code 2."""
    done = subprocess.run(
        [sys.executable, "-m", "injector", "serve", "--certs-dir", str(certs_dir)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    return done.stderr


def test_certs_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert str(blocker) in serve_fails(blocker / "certs")


@pytest.mark.parametrize("key", ["ca-key.pem", "tls.key"])
def test_a_corrupted_key_at_start_is_one_line_and_exit_2(tmp_path: Path, key: str) -> None:
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir",
                    str(certs)], check=True, timeout=60)
    (certs / key).write_text(
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    message = serve_fails(certs)
    assert "PRIVATE KEY" not in message and "bm90IGEga2V5" not in message
