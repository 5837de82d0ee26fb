"""The CA over HTTPS: `POST /v1/certificates` and `GET /v1/trust-bundle` (SPEC section 4).

The thin shell around `ca.sign_svid`: read at most 64 KiB, authenticate the bearer token (in a
worker thread: TokenReview is blocking I/O), parse the JSON, sign, answer. Every refusal is a
JSON `{"error": ...}` with the status the SPEC gives it, counted by reason; every issuance is one
log line with the SPIFFE ID and serial. Tokens, keys and CSR bodies are never logged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import Counter, Gauge, Histogram
from starlette.concurrency import run_in_threadpool

from injector.ca import authority as ca
from injector.ca import certsdir as cadir
from injector.ca.authn import (
    AuthenticationUnavailable,
    Authenticator,
    AuthenticatorChain,
    Caller,
    StaticTokens,
    TokenFileError,
    TokenReviewAuthenticator,
)
from injector.ca.ratelimit import RateLimiter
from injector.errors import ConfigError
from injector.mesh.config import MeshConfig
from injector.mesh.spiffe import SpiffeId, SpiffeIdError
from injector.server import asgi
from injector.server.httpio import TOO_LARGE, json_error, json_responses, receive_body

MAX_CSR_REQUEST_BYTES = 64 * 1024
RETRY_AFTER_SECONDS = 5

log = logging.getLogger("injector.ca")

CSRS_RECEIVED = Counter("injector_ca_csr_received", "Certificate requests received")
CERTIFICATES_ISSUED = Counter("injector_ca_certificates_issued", "X509-SVIDs issued")
REFUSALS = Counter("injector_ca_refusals", "Certificate requests refused, by reason",
                   ["reason"])
SIGNING_SECONDS = Histogram(
    "injector_ca_signing_duration_seconds",
    "Time to check a CSR and sign its SVID (authentication excluded)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
# Every worker of `serve --workers` sets the same value: /metrics shows one.
ROOT_EXPIRY = Gauge("injector_ca_root_expiry_timestamp_seconds",
                    "When the root certificate the signing CA chains to expires (Unix time)",
                    multiprocess_mode="max")
SIGNING_CA_EXPIRY = Gauge("injector_ca_signing_ca_expiry_timestamp_seconds",
                          "When the signing CA certificate expires (Unix time)",
                          multiprocess_mode="max")


class Refusal(Exception):
    """A request the CA answers with an error: HTTP status, metric reason, message."""

    def __init__(self, status: int, reason: str, message: str,
                 retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_seconds = retry_after_seconds


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CAService:
    """The CA's state and decisions, independent of the HTTP framework."""

    def __init__(self, authority: ca.Authority, authenticator: AuthenticatorChain, *,
                 policy: ca.SigningPolicy = ca.DEFAULT_POLICY,
                 clock: Callable[[], dt.datetime] = _utcnow,
                 rate_limiter: RateLimiter | None = None) -> None:
        self.authority = authority
        self.authenticator = authenticator
        self.policy = policy
        self._rate_limiter = rate_limiter
        self._clock = clock
        ROOT_EXPIRY.set(authority.root_not_after.timestamp())
        SIGNING_CA_EXPIRY.set(authority.signing_cert.not_valid_after_utc.timestamp())

    async def watch_token_file(self, interval_seconds: float = 2.0) -> None:
        """Reload the static token file when it changes (a background task of serve)."""
        while True:
            await asyncio.sleep(interval_seconds)
            self.authenticator.reload_if_changed()

    def readiness(self) -> str | None:
        """None when the CA can sign; otherwise why it cannot (for /readyz)."""
        if self.authority.expired(self._clock()):
            return f"the signing CA expired at {ca.rfc3339(self.authority.not_after)}"
        return None

    def trust_bundle_pem(self) -> str:
        return "".join(self.authority.trust_bundle_pems)

    def authenticate(self, authorization: str | None) -> Caller:
        """Blocking (TokenReview): call from a worker thread."""
        token = _bearer_token(authorization)
        try:
            caller = self.authenticator.authenticate(token)
        except AuthenticationUnavailable as error:
            raise Refusal(503, "auth_unavailable", f"cannot authenticate now: {error}",
                          error.retry_after_seconds) from None
        return self._admit(caller)

    def authenticate_without_io(self, authorization: str | None) -> Caller | None:
        """What `authenticate` answers, when that needs no I/O: the token is a static one (the
        static authenticators leading the chain know it), or no authenticator does I/O. Safe
        on the event loop; None means: call `authenticate` from a worker thread.

        The thread hop costs about a sixth of the CA's throughput over HTTPS (bench_ca).
        """
        token = _bearer_token(authorization)
        authenticators = self.authenticator.authenticators
        for index, authenticator in enumerate(authenticators):
            if not isinstance(authenticator, StaticTokens):
                return None  # the rest of the chain may block
            caller = authenticator.authenticate(token)
            if caller is not None or index == len(authenticators) - 1:
                return self._admit(caller)
        return self._admit(None)

    def _admit(self, caller: Caller | None) -> Caller:
        """The authenticated caller, unless unknown (401) or over its rate (429)."""
        if caller is None:
            raise Refusal(401, "bad_token", "the token is not valid for this CA")
        if self._rate_limiter is not None:
            wait = self._rate_limiter.acquire(f"{caller.namespace}/{caller.service_account}")
            if wait is not None:
                raise Refusal(429, "rate_limited",
                              f"too many certificate requests for {caller.namespace}/"
                              f"{caller.service_account}; retry in {wait}s", wait)
        return caller

    def issue(self, caller: Caller, body: bytes) -> dict[str, Any]:
        """Parse the request body and sign; the 200 response document, or Refusal."""
        csr, ttl_seconds = _parse_request(body)
        try:
            identity = SpiffeId.for_service_account(self.authority.trust_domain,
                                                    caller.namespace, caller.service_account)
        except SpiffeIdError as error:
            raise Refusal(403, "bad_identity",
                          f"the caller's identity cannot be a SPIFFE ID: {error}") from None
        started = time.perf_counter()
        try:
            svid = ca.sign_svid(csr, identity, ttl_seconds, self.authority, self._clock(),
                                policy=self.policy)
        except ca.SigningRefused as refused:
            raise Refusal(refused.status, refused.reason, refused.message,
                          RETRY_AFTER_SECONDS if refused.status == 503 else None) from None
        SIGNING_SECONDS.observe(time.perf_counter() - started)
        CERTIFICATES_ISSUED.inc()
        log.info("issued SVID spiffe_id=%s serial=%x expires_at=%s authenticator=%s",
                 svid.spiffe_id, svid.serial_number, ca.rfc3339(svid.expires_at),
                 caller.authenticator)
        return {
            "spiffe_id": str(svid.spiffe_id),
            "certificate_chain": list(svid.certificate_chain_pems),
            "trust_bundle": list(svid.trust_bundle_pems),
            "expires_at": ca.rfc3339(svid.expires_at),
        }


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refusal(401, "no_token", "missing bearer token")
    return token


def _parse_request(body: bytes) -> tuple[str, int | None]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refusal(400, "bad_request", "the body is not JSON") from None
    if not isinstance(document, dict):
        raise Refusal(400, "bad_request", "the body must be a JSON object")
    csr = document.get("csr")
    if not isinstance(csr, str) or not csr.strip():
        raise Refusal(400, "bad_request", "csr must be a PEM string")
    ttl = document.get("ttl_seconds")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
        raise Refusal(400, "bad_ttl", "ttl_seconds must be an integer")
    return csr, ttl


def _error(refusal: Refusal) -> asgi.Answer:
    headers: asgi.Headers = []
    if refusal.retry_after_seconds is not None:
        headers.append((b"retry-after", b"%d" % refusal.retry_after_seconds))
    if refusal.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return refusal.status, headers, json_error(refusal.message)


async def answer_certificate_request(service: CAService, scope: Any, receive: Any
                                     ) -> asgi.Answer:
    """`POST /v1/certificates`, from the ASGI scope and receive: the status, extra headers
    and JSON body (None if the client went away). Behind both the fast route and the FastAPI
    route (which only documents it, and answers for methods other than POST)."""
    CSRS_RECEIVED.inc()
    try:
        body = await receive_body(scope, receive, MAX_CSR_REQUEST_BYTES)
        if body is None:
            return None  # the client went away: nobody to answer
        if body is TOO_LARGE:
            raise Refusal(413, "too_large",
                          f"the body exceeds {MAX_CSR_REQUEST_BYTES} bytes")
        authorization = asgi.header(scope, b"authorization")
        caller = service.authenticate_without_io(authorization)
        if caller is None:
            caller = await run_in_threadpool(service.authenticate, authorization)
        document = service.issue(caller, body)  # type: ignore[arg-type]
    except Refusal as refusal:
        REFUSALS.labels(refusal.reason).inc()
        if refusal.status != 401:
            log.info("refused certificate request: %s (%s)", refusal.reason,
                     refusal.message[:200])
        return _error(refusal)
    except Exception:
        # A bug is not the caller's fault and is worth retrying; never a 500 or traceback.
        log.exception("certificate request failed unexpectedly")
        REFUSALS.labels("internal").inc()
        return _error(Refusal(503, "internal", "internal error, retry later",
                              RETRY_AFTER_SECONDS))
    return 200, [], orjson.dumps(document)


def fast_routes(service: CAService) -> dict[tuple[str, str], asgi.FastRoute]:
    """The CA's hot route for injector.asgi.FastRoutes (create_app's `fast_routes`)."""

    async def certificates(scope: Any, receive: Any) -> asgi.Answer:
        return await answer_certificate_request(service, scope, receive)

    return {("POST", "/v1/certificates"): certificates}


CERTIFICATE_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["csr"],
    "properties": {"csr": {"type": "string", "description": "PEM PKCS#10"},
                   "ttl_seconds": {"type": "integer", "minimum": 1}},
}
CERTIFICATE_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["spiffe_id", "certificate_chain", "trust_bundle", "expires_at"],
    "properties": {
        "spiffe_id": {"type": "string"},
        "certificate_chain": {"type": "array", "items": {"type": "string"}},
        "trust_bundle": {"type": "array", "items": {"type": "string"}},
        "expires_at": {"type": "string", "format": "date-time"},
    },
}
CERTIFICATES_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": CERTIFICATE_REQUEST_SCHEMA}}},
    "security": [{"bearer": []}],
}


def router(service: CAService) -> APIRouter:
    routes = APIRouter()

    @routes.post(
        "/v1/certificates", response_class=Response, openapi_extra=CERTIFICATES_OPENAPI,
        summary="Sign a workload's CSR as an X509-SVID",
        responses=json_responses({
            400: "A CSR or ttl the CA refuses", 401: "No token, or a bad one",
            403: "The CSR names another identity", 413: "Over 64 KiB",
            429: "Too many requests for this identity", 503: "Cannot sign now; retry",
        }, ok=CERTIFICATE_RESPONSE_SCHEMA))
    async def certificates(request: Request) -> Response:
        answer = await answer_certificate_request(service, request.scope, request.receive)
        if answer is None:
            return Response(status_code=400)  # the client went away: nobody reads this
        status, headers, body = answer
        return Response(body, status_code=status, media_type="application/json",
                        headers={name.decode(): value.decode() for name, value in headers})

    @routes.get("/v1/trust-bundle", response_class=Response, responses={
        200: {"description": "The root certificate(s)",
              "content": {"application/x-pem-file": {"schema": {"type": "string"}}}}})
    async def trust_bundle() -> Response:
        return Response(service.trust_bundle_pem(), media_type="application/x-pem-file")

    return routes


def build_ca_service(*, certs_dir: Path, mesh: MeshConfig, token_file: str | None,
                     api_client: Any, workers: int = 1) -> CAService:
    """Load the CA from `certs_dir` and the authenticators from the settings; for one of
    `workers` processes (serve --workers), each of which limits a share of the CSR rate.

    Raises cadir.CertsError (a CA that does not load: key mismatch, chain that does not verify)
    or ConfigError (a bad token file, an impossible TTL policy), both one line.
    """
    authority = cadir.load_authority(Path(certs_dir), mesh.trust_domain)
    if mesh.default_ttl_seconds > mesh.max_ttl_seconds:
        raise ConfigError(
            f"defaultTtlSeconds {mesh.default_ttl_seconds} exceeds maxTtlSeconds "
            f"{mesh.max_ttl_seconds}")
    authenticators: list[Authenticator] = []
    if token_file:
        try:
            authenticators.append(StaticTokens.from_file(token_file))
        except TokenFileError as error:
            raise ConfigError(str(error)) from None
    if api_client is not None:
        authenticators.append(TokenReviewAuthenticator(api_client))
    if not authenticators:
        log.warning("the CA has no authenticator (no --token-file, no Kubernetes API): "
                    "every certificate request will be refused with 401")
    return CAService(
        authority, AuthenticatorChain(authenticators),
        policy=ca.SigningPolicy(default_ttl_seconds=mesh.default_ttl_seconds,
                                max_ttl_seconds=mesh.max_ttl_seconds),
        # Each worker limits its share, so that together they allow no more than the mesh
        # config says, wherever a caller's connections land.
        rate_limiter=RateLimiter(mesh.csr_rate_per_second / workers,
                                 math.ceil(mesh.csr_burst / workers)),
    )
