"""A small fake Kubernetes API server of the tests' own, over real HTTPS on loopback.

The official `kubernetes` client talks to it through an ordinary kubeconfig (server URL,
certificate-authority-data, bearer token), so the code under test runs unchanged: no mocks, no
monkeypatching. It serves what the injector uses:

- `POST /apis/authentication.k8s.io/v1/tokenreviews` (from `tokens`, audience-aware as the real
  API server is)
- namespaces (get, list, watch), ConfigMaps and Secrets (get, list, watch, create, update,
  patch, delete), MutatingWebhookConfigurations (get, patch): a generic object store with
  resourceVersions, field selectors on `metadata.name`, and watch streams

Every call is also recorded at the level RBAC sees it (`api.calls`: verb, group, resource,
namespace, name), so a test can check the deploy manifests allow exactly what the code does.

To extend it, add state to `FakeKubeAPI` and routes in a method called from `_install_routes` (or
on `api.app` directly): every request is recorded in `api.requests`, and `api.fail_with` makes
every route answer with that HTTP status (an API server in trouble); `api.delay_seconds` delays
every answer, and `api.hold_token_reviews` holds TokenReviews unanswered until it is cleared.

`ServerThread` runs any ASGI app with uvicorn over TLS in a background thread; `https_material`
makes a throwaway CA and server certificate for it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import uvicorn
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.support.eventually import eventually

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

    def __init__(self, app: Any, cert_file: Path, key_file: Path, port: int = 0) -> None:
        self._socket = socket.socket()
        # A restarted server takes the same port again (an API server that comes back).
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()

        def serving() -> bool:
            if not self._thread.is_alive():  # it never will: no use waiting
                raise AssertionError("test HTTPS server did not start: its thread ended")
            return bool(self._server.started)

        eventually(serving, interval=0.02, what="test HTTPS server started")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


# --- objects: a tiny etcd -----------------------------------------------------------------------

# The resources the store serves: (group, version, resource) -> (kind, namespaced).
RESOURCES: dict[tuple[str, str, str], tuple[str, bool]] = {
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "configmaps"): ("ConfigMap", True),
    ("", "v1", "secrets"): ("Secret", True),
    ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations"):
        ("MutatingWebhookConfiguration", False),
}


@dataclass(frozen=True)
class ApiCall:
    """One request as RBAC sees it."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str | None


class ObjectStore:
    """Objects by (resource, namespace, name), with a resourceVersion and an event history.

    Safe to use from the test's thread while the server's thread serves watches.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []
        self.version = 0

    def _key(self, resource: str, namespace: str | None, name: str) -> tuple[str, str, str]:
        return (resource, namespace or "", name)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._objects.get(self._key(resource, namespace, name))
            return copy.deepcopy(found)

    def list(self, resource: str, namespace: str | None = None,
             name: str | None = None) -> tuple[list[dict[str, Any]], int]:
        with self._lock:
            items = [copy.deepcopy(obj) for (kind, ns, obj_name), obj in self._objects.items()
                     if kind == resource and (namespace is None or ns == namespace)
                     and (name is None or obj_name == name)]
            return items, self.version

    def events_after(self, version: int, resource: str, namespace: str | None,
                     name: str | None) -> list[tuple[int, str, dict[str, Any]]]:
        with self._lock:
            return [(rv, kind, copy.deepcopy(obj)) for rv, res, kind, obj in self._events
                    if rv > version and res == resource
                    and (namespace is None or obj["metadata"].get("namespace") == namespace)
                    and (name is None or obj["metadata"]["name"] == name)]

    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace `obj` (test set-up and the API's writes alike)."""
        metadata = obj.setdefault("metadata", {})
        key = self._key(resource, metadata.get("namespace"), metadata["name"])
        with self._lock:
            self.version += 1
            existing = self._objects.get(key)
            metadata.setdefault("uid", (existing or {}).get("metadata", {}).get("uid")
                                or str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            metadata["resourceVersion"] = str(self.version)
            self._objects[key] = copy.deepcopy(obj)
            self._events.append((self.version, resource,
                                 "MODIFIED" if existing else "ADDED", copy.deepcopy(obj)))
            return copy.deepcopy(obj)

    def delete(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self._lock:
            gone = self._objects.pop(self._key(resource, namespace, name), None)
            if gone is not None:
                self.version += 1
                gone["metadata"]["resourceVersion"] = str(self.version)
                self._events.append((self.version, resource, "DELETED", copy.deepcopy(gone)))
            return gone

    # Conveniences for the tests' set-up.
    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.put("namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": name, "labels": labels or {}}})

    def set_namespace_labels(self, name: str, labels: dict[str, str]) -> None:
        namespace = self.get("namespaces", None, name)
        assert namespace is not None, name
        namespace["metadata"]["labels"] = labels
        self.put("namespaces", namespace)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _name_from_field_selector(selector: str | None) -> str | None:
    if not selector:
        return None
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key.strip() == "metadata.name":
            return value.strip().lstrip("=")
    raise ValueError(f"unsupported field selector {selector!r}")


def _parse_api_path(path: str) -> tuple[str, str, str, str | None, str | None] | None:
    """(group, version, resource, namespace, name) of a resource path, or None."""
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    return group, version, rest[0], namespace, rest[1] if len(rest) > 1 else None


def api_call(method: str, path: str, query: dict[str, str]) -> ApiCall | None:
    parsed = _parse_api_path(path)
    if parsed is None:
        return None
    group, _, resource, namespace, name = parsed
    if method == "GET":
        if name is None:
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
            name = _name_from_field_selector(query.get("fieldSelector"))
        else:
            verb = "get"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}.get(method, method.lower())
    return ApiCall(verb, group, resource, namespace, name)


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
    calls: list[ApiCall] = field(default_factory=list)
    store: ObjectStore = field(default_factory=ObjectStore)
    fail_with: int | None = None
    # Every answer waits this long first: an API server under load.
    delay_seconds: float = 0.0
    # Set before stopping the server, so that open watch streams end and it can shut down.
    closing: bool = False
    # When set, TokenReview status.audiences is this instead of the honest intersection: an
    # API server that is not audience-aware, or one that misbehaves.
    status_audiences_override: list[str] | None = None
    # While true, TokenReviews are held unanswered (an API server that has stopped answering
    # them) until it is false again or the server closes; the counts say how many wait at once.
    hold_token_reviews: bool = False
    token_reviews_in_flight: int = 0
    token_reviews_peak: int = 0
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
            call = api_call(request.method, request.url.path, dict(request.query_params))
            if call is not None:
                self.calls.append(call)
            if request.headers.get("authorization") != f"Bearer {INJECTOR_API_TOKEN}":
                return _status(401, "Unauthorized", "Unauthorized")
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            if self.fail_with is not None:
                return _status(self.fail_with, "InternalError", "the fake API server is failing")
            return await call_next(request)

        self._install_token_reviews()
        self._install_objects()

    def _install_token_reviews(self) -> None:
        @self.app.post("/apis/authentication.k8s.io/v1/tokenreviews")
        async def create_token_review(request: Request) -> JSONResponse:
            self.token_reviews_in_flight += 1  # one event loop: no lock needed
            self.token_reviews_peak = max(self.token_reviews_peak, self.token_reviews_in_flight)
            try:
                await request.body()  # read first: a disconnect is then all there is to receive
                while self.hold_token_reviews and not self.closing:
                    if await request.is_disconnected():  # the client gave up waiting
                        return _status(504, "Timeout", "the client went away")
                    await asyncio.sleep(0.02)  # the API server's own wait, not the tests'
                return await review_token(request)
            finally:
                self.token_reviews_in_flight -= 1

        async def review_token(request: Request) -> JSONResponse:
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

    def _install_objects(self) -> None:
        store = self.store

        def resource_of(group: str, version: str, resource: str) -> tuple[str, bool]:
            known = RESOURCES.get((group, version, resource))
            if known is None:
                raise LookupError(resource)
            return known

        async def list_or_watch(request: Request, group: str, version: str, resource: str,
                                namespace: str | None) -> Response:
            kind, _ = resource_of(group, version, resource)
            try:
                name = _name_from_field_selector(request.query_params.get("fieldSelector"))
            except ValueError as error:
                return _status(400, "BadRequest", str(error))
            if request.query_params.get("watch") in ("true", "1"):
                since = int(request.query_params.get("resourceVersion") or 0)
                timeout = float(request.query_params.get("timeoutSeconds") or 300)
                return StreamingResponse(self._watch(resource, namespace, name, since, timeout),
                                         media_type="application/json")
            items, version_now = store.list(resource, namespace, name)
            return JSONResponse({"kind": f"{kind}List", "apiVersion": _api_version(group, version),
                                 "metadata": {"resourceVersion": str(version_now)},
                                 "items": items})

        async def create(request: Request, group: str, version: str, resource: str,
                         namespace: str | None) -> Response:
            resource_of(group, version, resource)
            body = await request.json()
            body.setdefault("metadata", {})
            if namespace is not None:
                body["metadata"]["namespace"] = namespace
            name = body["metadata"].get("name")
            if store.get(resource, namespace, name) is not None:
                return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
            return JSONResponse(store.put(resource, body), status_code=201)

        async def one(request: Request, group: str, version: str, resource: str,
                      namespace: str | None, name: str) -> Response:
            resource_of(group, version, resource)
            current = store.get(resource, namespace, name)
            if current is None:
                return _status(404, "NotFound", f'{resource} "{name}" not found')
            if request.method == "GET":
                return JSONResponse(current)
            if request.method == "DELETE":
                store.delete(resource, namespace, name)
                return JSONResponse({"kind": "Status", "status": "Success"})
            body = await request.json()
            if request.method == "PUT":
                sent = body.get("metadata", {}).get("resourceVersion")
                if sent and sent != current["metadata"]["resourceVersion"]:
                    return _status(409, "Conflict", "the object has been modified")
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                return JSONResponse(store.put(resource, body))
            content_type = request.headers.get("content-type", "")
            try:
                if "json-patch" in content_type:
                    patched = jsonpatch.apply_patch(current, body)
                else:
                    patched = _merge_patch(current, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                return _status(422, "Invalid", f"the patch does not apply: {error}")
            return JSONResponse(store.put(resource, patched))

        def guarded(handler: Any) -> Any:
            async def route(request: Request) -> Response:
                params = dict(request.path_params)
                params.setdefault("group", "")
                params.setdefault("version", "v1")
                params.setdefault("namespace", None)
                try:
                    return await handler(request, **params)
                except LookupError as error:
                    return _status(404, "NotFound", f"the server could not find {error}")
            return route

        core_collection = "/api/v1/{resource}"
        core_namespaced = "/api/v1/namespaces/{namespace}/{resource}"
        group_collection = "/apis/{group}/{version}/{resource}"
        for path in (core_collection, core_namespaced, group_collection):
            self.app.add_api_route(path, guarded(list_or_watch), methods=["GET"])
            self.app.add_api_route(path, guarded(create), methods=["POST"])
        for path in ("/api/v1/{resource}/{name}", core_namespaced + "/{name}",
                     group_collection + "/{name}"):
            self.app.add_api_route(path, guarded(one),
                                   methods=["GET", "PUT", "PATCH", "DELETE"])

    async def _watch(self, resource: str, namespace: str | None, name: str | None,
                     since: int, timeout: float) -> AsyncIterator[bytes]:
        # Not a wait of the tests (no `eventually`): the API server's own watch timeout,
        # streaming events on the server's event loop until then.
        deadline = time.monotonic() + timeout
        sent = since
        while time.monotonic() < deadline and not self.closing and self.fail_with is None:
            for version, kind, obj in self.store.events_after(sent, resource, namespace, name):
                sent = version
                yield orjson.dumps({"type": kind, "object": obj}) + b"\n"
            await asyncio.sleep(0.05)


def _api_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


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


@dataclass
class RunningFakeKube:
    api: FakeKubeAPI
    server: ServerThread
    kubeconfig: Path
    ca_pem: bytes
    material: HttpsMaterial | None = None

    def stop(self) -> None:
        """The API server goes down: connections are refused until `start()`."""
        self.api.closing = True
        self.server.stop()

    def start(self) -> None:
        """The API server comes back on the same address, with the same objects."""
        assert self.material is not None
        self.api.closing = False
        self.server = ServerThread(self.api.app, self.material.cert_file,
                                   self.material.key_file, port=self.server.port).start()


def start_fake_kube(directory: Path, port: int = 0) -> RunningFakeKube:
    """A fake API server on `port` (0: any free one) and a kubeconfig for it."""
    material = https_material(directory / "fake-kube-tls")
    api = FakeKubeAPI()
    server = ServerThread(api.app, material.cert_file, material.key_file, port=port).start()
    kubeconfig = write_kubeconfig(directory / "kubeconfig", server.url, material.ca_pem)
    return RunningFakeKube(api, server, kubeconfig, material.ca_pem, material)
