"""The CA's HTTPS transport end to end: the real `injector serve`, as a sidecar's agent calls it.

What the service decides is tested in-process in tests/ca/test_service.py; here, what HTTP makes
of it: statuses, headers, JSON bodies, the body limit, and the server's life across restarts."""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from injector.ca import authority, certsdir
from injector.ca.refusals import RefusalKind
from injector.server.ca_routes import HTTP_STATUS
from tests.support.certs import make_csr, mutual_tls, p256, request_svid, tampered_signature
from tests.support.eventually import eventually
from tests.support.fakeapi import (
    RunningFakeKube,
    TokenInfo,
    https_material,
    write_kubeconfig,
)
from tests.support.servers import (
    API_TOKEN,
    WEB_TOKEN,
    Server,
    free_port,
    start_ca_server,
    start_server,
    write_tokens,
)

WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
API_ID = "spiffe://cluster.local/ns/shop/sa/api"


def write_issued(directory: Path, name: str, key: Any, document: dict[str, Any]) -> None:
    """The files an agent writes: key, chain (leaf first), bundle; plus the leaf alone."""
    (directory / f"{name}.key").write_bytes(authority.key_to_pem(key))
    (directory / f"{name}-chain.pem").write_text("".join(document["certificate_chain"]))
    (directory / f"{name}-leaf.pem").write_text(document["certificate_chain"][0])
    (directory / "bundle.pem").write_text("".join(document["trust_bundle"]))


def openssl_verify(root: Path, chain: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(root),
                           "-untrusted", str(chain), str(leaf)],
                          capture_output=True, text=True, check=False)


# --- issuing ------------------------------------------------------------------------------------

def test_issues_an_svid_for_the_callers_identity(ca_client: httpx.Client, ca_server: Server,
                                                 tmp_path: Path) -> None:
    key = p256()
    reply = request_svid(ca_client, WEB_TOKEN, make_csr(key), ttl_seconds=3600)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    document = reply.json()
    assert set(document) == {"spiffe_id", "certificate_chain", "trust_bundle", "expires_at"}
    assert document["spiffe_id"] == WEB_ID
    root_pem = ca_server.root_cert.read_text()
    assert document["trust_bundle"] == [root_pem]
    assert len(document["certificate_chain"]) == 1  # self-signed root: nothing in between

    leaf = x509.load_pem_x509_certificate(document["certificate_chain"][0].encode())
    assert leaf.subject == x509.Name([])
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.critical and sans.value.get_values_for_type(
        x509.UniformResourceIdentifier) == [WEB_ID]
    assert authority.public_keys_match(key, leaf)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(seconds=3600 + 60)
    assert document["expires_at"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    write_issued(tmp_path, "web", key, document)
    result = openssl_verify(ca_server.root_cert, tmp_path / "web-chain.pem",
                            tmp_path / "web-leaf.pem")
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_ttl_is_a_day(ca_client: httpx.Client) -> None:
    reply = request_svid(ca_client, WEB_TOKEN, make_csr(p256()))
    assert reply.status_code == 200, reply.text
    leaf = x509.load_pem_x509_certificate(reply.json()["certificate_chain"][0].encode())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=1,
                                                                                 seconds=60)


def test_svids_from_the_endpoint_complete_mutual_tls(ca_client: httpx.Client,
                                                     tmp_path: Path) -> None:
    web_key, api_key = p256(), rsa.generate_private_key(65537, 2048)
    for name, token, key in (("web", WEB_TOKEN, web_key), ("api", API_TOKEN, api_key)):
        reply = request_svid(ca_client, token, make_csr(key))
        assert reply.status_code == 200, reply.text
        write_issued(tmp_path, name, key, reply.json())
    assert mutual_tls(tmp_path, "api", "web") == (WEB_ID, API_ID)


def test_trust_bundle(ca_client: httpx.Client, ca_server: Server) -> None:
    reply = ca_client.get("/v1/trust-bundle")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/x-pem-file")
    assert reply.text == ca_server.root_cert.read_text()


# --- refusals -----------------------------------------------------------------------------------

def _csr_text(key: Any = None, **kwargs: Any) -> str:
    return make_csr(key or p256(), **kwargs).decode()


# Headers None: the web workload's valid token.
REFUSALS: dict[str, tuple[dict[str, str] | None, Any, int]] = {
    "no token": ({}, lambda: {"csr": _csr_text()}, 401),
    "not a bearer token": ({"Authorization": f"Basic {WEB_TOKEN}"},
                           lambda: {"csr": _csr_text()}, 401),
    "unknown token": ({"Authorization": "Bearer not-a-known-token"},
                      lambda: {"csr": _csr_text()}, 401),
    "garbage csr": (None, lambda: {"csr": "garbage"}, 400),
    "bad csr signature": (None, lambda: {"csr": tampered_signature(make_csr(p256())).decode()},
                          400),
    "asks for a CA": (None, lambda: {"csr": _csr_text(ask_ca=True)}, 400),
    "weak RSA key": (None, lambda: {"csr": _csr_text(rsa.generate_private_key(65537, 1024))}, 400),
    "unsupported curve": (None, lambda: {"csr": _csr_text(ec.generate_private_key(ec.SECP521R1()))},
                          400),
    "another identity": (None, lambda: {"csr": _csr_text(
        sans=[x509.UniformResourceIdentifier(API_ID)])}, 403),
    "another trust domain": (None, lambda: {"csr": _csr_text(
        sans=[x509.UniformResourceIdentifier("spiffe://evil.example/ns/shop/sa/web")])}, 403),
    "ttl over the maximum": (None, lambda: {"csr": _csr_text(), "ttl_seconds": 90 * 86400 + 1},
                             400),
    "ttl zero": (None, lambda: {"csr": _csr_text(), "ttl_seconds": 0}, 400),
    "ttl not an integer": (None, lambda: {"csr": _csr_text(), "ttl_seconds": "3600"}, 400),
    "ttl a boolean": (None, lambda: {"csr": _csr_text(), "ttl_seconds": True}, 400),
    "no csr": (None, lambda: {"ttl_seconds": 60}, 400),
    "csr not a string": (None, lambda: {"csr": ["x"]}, 400),
    "body a list": (None, lambda: [1], 400),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_refusal_has_its_status_and_a_json_error(ca_client: httpx.Client,
                                                       case: str) -> None:
    headers, body, status = REFUSALS[case]
    if headers is None:
        headers = {"Authorization": f"Bearer {WEB_TOKEN}"}
    reply = ca_client.post("/v1/certificates", json=body(), headers=headers)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error
    if status == 401:
        assert reply.headers.get("www-authenticate") == "Bearer"


def test_every_refusal_kind_has_an_http_status() -> None:
    # A kind added to the CA must not ship without its answer over HTTPS.
    assert set(HTTP_STATUS) == set(RefusalKind)
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())


@pytest.mark.parametrize("body", [b"not json", b"", b"{\"csr\": ", b"\xff\xfe",
                                  "{\"csr\": \"\u00e9\"}".encode()])
def test_a_body_that_is_not_a_request_is_400(ca_client: httpx.Client, body: bytes) -> None:
    reply = ca_client.post("/v1/certificates", content=body,
                           headers={"Authorization": f"Bearer {WEB_TOKEN}",
                                    "Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "error" in reply.json()


def test_a_body_over_64_kib_is_413_declared_or_streamed(ca_client: httpx.Client) -> None:
    big = b"{\"csr\": \"" + b"A" * (64 * 1024) + b"\"}"
    headers = {"Authorization": f"Bearer {WEB_TOKEN}", "Content-Type": "application/json"}
    declared = ca_client.post("/v1/certificates", content=big, headers=headers)
    assert declared.status_code == 413 and "error" in declared.json()

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while streaming
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    streamed = ca_client.post("/v1/certificates", content=chunks(), headers=headers)
    assert streamed.status_code == 413 and "error" in streamed.json()
    # Without a token, too: the size is checked before anything else.
    assert ca_client.post("/v1/certificates", content=big).status_code == 413


# --- observability ------------------------------------------------------------------------------

def test_metrics_and_the_issuance_log(ca_client: httpx.Client, ca_server: Server) -> None:
    assert request_svid(ca_client, WEB_TOKEN, make_csr(p256())).status_code == 200
    assert request_svid(ca_client, "wrong-token", make_csr(p256())).status_code == 401
    assert request_svid(ca_client, WEB_TOKEN, "garbage").status_code == 400
    metrics = ca_client.get("/metrics").text
    for line in ("injector_ca_csr_received_total", "injector_ca_certificates_issued_total",
                 'injector_ca_refusals_total{reason="bad_token"}',
                 'injector_ca_refusals_total{reason="bad_csr"}',
                 "injector_ca_signing_duration_seconds_bucket",
                 "injector_ca_root_expiry_timestamp_seconds",
                 "injector_ca_signing_ca_expiry_timestamp_seconds"):
        assert line in metrics, line
    root = x509.load_pem_x509_certificate(ca_server.root_cert.read_bytes())
    expiry = next(line for line in metrics.splitlines()
                  if line.startswith("injector_ca_root_expiry_timestamp_seconds "))
    assert float(expiry.split()[1]) == root.not_valid_after_utc.timestamp()

    log = ca_server.log()
    assert f"issued SVID spiffe_id={WEB_ID} serial=" in log
    for secret in (WEB_TOKEN, API_TOKEN, "wrong-token", "BEGIN CERTIFICATE REQUEST",
                   "PRIVATE KEY"):
        assert secret not in log


# --- the certificates directory across restarts, plugged-in and expired CAs --------------------

def test_a_restart_keeps_the_root_and_earlier_svids_verify(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml")
    first = start_server(tmp_path, "--token-file", str(tokens))
    try:
        key = p256()
        with first.client() as client:
            document = request_svid(client, WEB_TOKEN, make_csr(key)).json()
        root_before = first.root_cert.read_bytes()
    finally:
        first.stop()
    write_issued(tmp_path, "web", key, document)

    second = start_server(tmp_path, "--token-file", str(tokens))
    try:
        assert second.root_cert.read_bytes() == root_before
        with second.client() as client:
            assert client.get("/v1/trust-bundle").text.encode() == root_before
    finally:
        second.stop()
    result = openssl_verify(second.root_cert, tmp_path / "web-chain.pem",
                            tmp_path / "web-leaf.pem")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_plugged_in_intermediate_signs_and_its_chain_reaches_the_root(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root_key = authority.generate_key()
    root = authority.make_root(root_key, trust_domain="cluster.local", now=now)
    inter_key = ec.generate_private_key(ec.SECP384R1())
    inter = authority.make_intermediate(inter_key, issuer_cert=root, issuer_key=root_key,
                                        common_name="cluster-1 intermediate", now=now,
                                        validity=dt.timedelta(days=30))
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "root-cert.pem").write_bytes(authority.cert_to_pem(root))
    (certs / "ca-cert.pem").write_bytes(authority.cert_to_pem(inter))
    (certs / "ca-key.pem").write_bytes(authority.key_to_pem(inter_key))
    (certs / "cert-chain.pem").write_bytes(authority.cert_to_pem(inter)
                                           + authority.cert_to_pem(root))

    server = start_server(tmp_path, "--token-file", str(write_tokens(tmp_path / "t.yaml")),
                          certs_dir=certs)
    try:
        key = p256()
        with server.client() as client:
            reply = request_svid(client, WEB_TOKEN, make_csr(key), ttl_seconds=90 * 86400)
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    document = reply.json()
    chain = [x509.load_pem_x509_certificate(pem.encode())
             for pem in document["certificate_chain"]]
    assert chain[1:] == [inter]
    assert document["trust_bundle"] == [authority.cert_to_pem(root).decode()]
    assert chain[0].not_valid_after_utc <= inter.not_valid_after_utc  # capped at the CA
    write_issued(tmp_path, "web", key, document)
    result = openssl_verify(certs / "root-cert.pem", tmp_path / "web-chain.pem",
                            tmp_path / "web-leaf.pem")
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the intermediate from the returned chain, the leaf does not reach the root.
    assert openssl_verify(certs / "root-cert.pem", tmp_path / "web-leaf.pem",
                          tmp_path / "web-leaf.pem").returncode != 0


def test_an_expired_ca_signs_nothing_and_is_not_ready(tmp_path: Path) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    root_key = authority.generate_key()
    root = authority.make_root(root_key, trust_domain="cluster.local", now=long_ago,
                               validity=dt.timedelta(days=10))
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("root-cert.pem", "ca-cert.pem", "cert-chain.pem"):
        (certs / name).write_bytes(authority.cert_to_pem(root))
    (certs / "ca-key.pem").write_bytes(authority.key_to_pem(root_key))
    # The HTTPS side still needs a valid certificate: one from another, valid CA.
    tls = https_material(tmp_path / "tls", host="127.0.0.1")
    (certs / "tls.crt").write_bytes(tls.cert_file.read_bytes())
    (certs / "tls.key").write_bytes(tls.key_file.read_bytes())
    (tmp_path / "tls-ca.pem").write_bytes(tls.ca_pem)

    server = start_server(tmp_path, "--token-file", str(write_tokens(tmp_path / "t.yaml")),
                          certs_dir=certs, wait_ready=False)
    try:
        _wait_for_https(server, tmp_path / "tls-ca.pem")
        with httpx.Client(base_url=server.url, timeout=10, verify=ssl.create_default_context(
                cafile=str(tmp_path / "tls-ca.pem"))) as client:
            reply = request_svid(client, WEB_TOKEN, make_csr(p256()))
            assert reply.status_code == 503, reply.text
            assert reply.headers.get("retry-after")
            assert "expired" in reply.json()["error"]
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert "expired" in ready.text
    finally:
        server.stop()


def _wait_for_https(server: Server, ca_file: Path) -> None:
    """Wait for /healthz over HTTPS trusting `ca_file` (`wait_until_serving` trusts the
    certificates directory's root, which here did not sign the serving certificate)."""

    def healthy_or_exited() -> bool:
        if server.process.poll() is not None:
            return True
        try:
            context = ssl.create_default_context(cafile=str(ca_file))
            with httpx.Client(verify=context, timeout=2) as client:
                return client.get(f"{server.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(healthy_or_exited, timeout=30, interval=0.1, what="/healthz over HTTPS")
    except AssertionError as error:
        raise AssertionError(f"{error}; the server's log:\n{server.log()}") from None
    assert server.process.poll() is None, server.log()


@pytest.mark.parametrize("setup", ["bad token file", "mismatched CA key"])
def test_refuses_to_start_with_a_one_line_reason(tmp_path: Path, setup: str) -> None:
    args: list[str] = []
    certs = tmp_path / "certs"
    if setup == "bad token file":
        (tmp_path / "tokens.yaml").write_text("- {token: x}\n")
        args = ["--token-file", str(tmp_path / "tokens.yaml")]
    else:
        certsdir.ensure_certs_dir(certs)
        (certs / "ca-key.pem").write_bytes(authority.key_to_pem(authority.generate_key()))
    server = start_server(tmp_path, *args, certs_dir=certs, wait_ready=False)
    try:
        assert server.process.wait(timeout=30) == 2
    finally:
        server.stop()
    output = server.log().strip()
    assert "Traceback" not in output and output.count("\n") == 0, output


# --- TokenReview, through the fake API server ---------------------------------------------------

@pytest.fixture
def kube_ca_server(tmp_path: Path, fake_kube: RunningFakeKube) -> Iterator[Server]:
    running = start_server(tmp_path, "--kubeconfig", str(fake_kube.kubeconfig))
    yield running
    running.stop()


def test_tokenreview_end_to_end(kube_ca_server: Server, fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("projected-token", "shop", "web")
    fake_kube.api.add_service_account_token("api-audience-token", "shop", "web",
                                            audiences=("https://kubernetes.default.svc",))
    fake_kube.api.tokens["user-token"] = TokenInfo("jane@example.com")
    with kube_ca_server.client() as client:
        ok = request_svid(client, "projected-token", make_csr(p256()))
        assert ok.status_code == 200, ok.text
        assert ok.json()["spiffe_id"] == WEB_ID
        for token in ("unknown-token", "api-audience-token", "user-token"):
            reply = request_svid(client, token, make_csr(p256()))
            assert reply.status_code == 401, (token, reply.text)

        fake_kube.api.fail_with = 500
        failing = request_svid(client, "another-token", make_csr(p256()))
        assert failing.status_code == 503, failing.text
        assert failing.headers.get("retry-after")
        # A token reviewed a moment ago is still accepted from the brief cache.
        assert request_svid(client, "projected-token", make_csr(p256())).status_code == 200

        fake_kube.server.stop()  # the API server goes away entirely
        down = request_svid(client, "yet-another-token", make_csr(p256()))
        assert down.status_code == 503, down.text
        assert down.headers.get("retry-after")
        assert "error" in down.json()


def test_tokenreview_api_unreachable_from_the_start(tmp_path: Path) -> None:
    material = https_material(tmp_path / "tls")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{free_port()}",
                                  material.ca_pem)
    server = start_server(tmp_path, "--kubeconfig", str(kubeconfig))
    try:
        with server.client() as client:
            reply = request_svid(client, "some-token", make_csr(p256()))
    finally:
        server.stop()
    assert reply.status_code == 503, reply.text
    assert reply.headers.get("retry-after")


def test_tokens_added_to_the_token_file_work_without_a_restart(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path)
    try:
        csr = make_csr(p256())
        tokens = tmp_path / "tokens.yaml"
        with server.client() as client:
            assert request_svid(client, "token-of-a-new-team", csr).status_code == 401
            tokens.write_text(tokens.read_text() + "- {token: token-of-a-new-team, "
                              "namespace: new-team, serviceAccount: app}\n")

            def accepted() -> httpx.Response | None:
                reply = request_svid(client, "token-of-a-new-team", csr)
                return reply if reply.status_code == 200 else None

            answer = eventually(accepted, timeout=10, interval=0.2,
                                what="the new token accepted")
            assert answer is not None and answer.json()["spiffe_id"] == "spiffe://cluster.local/ns/new-team/sa/app"
        assert "static tokens reloaded" in server.log()
        assert "token-of-a-new-team" not in server.log()
    finally:
        server.stop()
