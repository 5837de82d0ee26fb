"""A small fake Kubernetes API server of the tests' own, over real HTTPS on loopback.

The official `kubernetes` client talks to it through an ordinary kubeconfig (server URL,
certificate-authority-data, bearer token), so the code under test runs unchanged: no mocks, no
monkeypatching. It serves what the injector uses:

- `POST /apis/authentication.k8s.io/v1/tokenreviews` (from `tokens`, audience-aware as the real
  API server is)

To extend it, add state to `FakeKubeAPI` and routes in a method called from `_install_routes` (or
on `api.app` directly): every request is recorded in `api.requests`, and `api.fail_with` makes
every route answer with that HTTP status (an API server in trouble).

`ServerThread` runs any ASGI app with uvicorn over TLS in a background thread; `https_material`
makes a throwaway CA and server certificate for it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

# The token the injector itself presents to the API server (from the kubeconfig).
INJECTOR_API_TOKEN = "injector-own-credentials"


# --- TLS for test servers -----------------------------------------------------------------------

@dataclass(frozen=True)
class HttpsMaterial:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def https_material(directory: Path, host: str = "127.0.0.1") -> HttpsMaterial:
    """A throwaway CA and a server certificate for `host`, written into `directory`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake kube-apiserver CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return HttpsMaterial(ca_cert.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


class ServerThread:
    """Any ASGI app served by uvicorn over HTTPS on a free loopback port, in a thread."""

    def __init__(self, app: Any, cert_file: Path, key_file: Path) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
                                log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError("test HTTPS server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


# --- the fake API server ------------------------------------------------------------------------

@dataclass
class TokenInfo:
    """What the API server knows about a token: whose it is and for which audiences."""

    username: str
    audiences: tuple[str, ...] = ("istio-ca",)
    uid: str = "00000000-0000-0000-0000-000000000000"


@dataclass
class FakeKubeAPI:
    tokens: dict[str, TokenInfo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail_with: int | None = None
    # When set, TokenReview status.audiences is this instead of the honest intersection: an
    # API server that is not audience-aware, or one that misbehaves.
    status_audiences_override: list[str] | None = None
    app: FastAPI = field(init=False)

    def __post_init__(self) -> None:
        self.app = FastAPI()
        self._install_routes()

    def add_service_account_token(self, token: str, namespace: str, service_account: str,
                                  audiences: tuple[str, ...] = ("istio-ca",)) -> None:
        self.tokens[token] = TokenInfo(f"system:serviceaccount:{namespace}:{service_account}",
                                       audiences)

    def token_reviews(self) -> int:
        return sum(1 for _, path in self.requests if path.endswith("/tokenreviews"))

    def _install_routes(self) -> None:
        @self.app.middleware("http")
        async def record_and_authorize(request: Request, call_next: Any) -> Any:
            self.requests.append((request.method, request.url.path))
            if request.headers.get("authorization") != f"Bearer {INJECTOR_API_TOKEN}":
                return _status(401, "Unauthorized", "Unauthorized")
            if self.fail_with is not None:
                return _status(self.fail_with, "InternalError", "the fake API server is failing")
            return await call_next(request)

        self._install_token_reviews()

    def _install_token_reviews(self) -> None:
        @self.app.post("/apis/authentication.k8s.io/v1/tokenreviews")
        async def create_token_review(request: Request) -> JSONResponse:
            review = await request.json()
            spec = review.get("spec", {})
            wanted = list(spec.get("audiences") or [])
            info = self.tokens.get(spec.get("token", ""))
            status: dict[str, Any]
            if info is None:
                status = {"authenticated": False, "error": "invalid bearer token"}
            else:
                # The real API server with audiences requested: the intersection, or a failure.
                common = [aud for aud in wanted if aud in info.audiences] if wanted else []
                if wanted and not common:
                    status = {"authenticated": False,
                              "error": "token audiences are invalid for the target audiences"}
                else:
                    status = {"authenticated": True, "audiences": common,
                              "user": {"username": info.username, "uid": info.uid,
                                       "groups": ["system:serviceaccounts",
                                                  "system:authenticated"]}}
            if self.status_audiences_override is not None and status["authenticated"]:
                status["audiences"] = self.status_audiences_override
            return JSONResponse(status_code=201, content={
                "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status})


def _status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=code, content={
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})


def write_kubeconfig(path: Path, server_url: str, ca_pem: bytes,
                     token: str = INJECTOR_API_TOKEN) -> Path:
    import base64

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {
            "server": server_url,
            "certificate-authority-data": base64.b64encode(ca_pem).decode("ascii")}}],
        "users": [{"name": "injector", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "injector"}}],
        "current-context": "fake",
    }))
    return path


def unused_port() -> int:
    """A loopback port nothing listens on: an API server that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningFakeKube:
    api: FakeKubeAPI
    server: ServerThread
    kubeconfig: Path
    ca_pem: bytes


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[RunningFakeKube]:
    """A fresh fake API server for one test, and a kubeconfig pointing at it."""
    material = https_material(tmp_path / "fake-kube-tls")
    api = FakeKubeAPI()
    server = ServerThread(api.app, material.cert_file, material.key_file).start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url, material.ca_pem)
    try:
        yield RunningFakeKube(api, server, kubeconfig, material.ca_pem)
    finally:
        server.stop()
