"""The CA over HTTPS: `POST /v1/certificates` and `GET /v1/trust-bundle` (SPEC section 4).

The HTTP transport of `injector.ca.service`, and nothing else: read at most 64 KiB, parse the
JSON request, let the service authenticate (on the event loop when no I/O is needed, else in a
worker thread: TokenReview blocks) and sign, answer the JSON document. A refusal's kind becomes
its HTTP status here, in `HTTP_STATUS`; every refusal is a JSON `{"error": ...}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from injector.ca.authority import IssuedSvid, rfc3339
from injector.ca.refusals import Refusal, RefusalKind
from injector.ca.service import CAService, count_request, internal_failure, record_refusal
from injector.server import asgi
from injector.server.httpio import (
    BUSY_HEADERS,
    BUSY_MESSAGE,
    BUSY_STATUS,
    Busy,
    TooLarge,
    json_error,
    json_responses,
    receive_body,
)

MAX_CSR_REQUEST_BYTES: Final = 64 * 1024

HTTP_STATUS: Final[Mapping[RefusalKind, int]] = {
    RefusalKind.UNAUTHENTICATED: 401,
    RefusalKind.FORBIDDEN: 403,
    RefusalKind.INVALID: 400,
    RefusalKind.EXHAUSTED: 429,
    RefusalKind.UNAVAILABLE: 503,
}


def _parse_request(body: bytes) -> tuple[str, int | None]:
    """The CSR (PEM) and the requested TTL (None: the default) of a JSON request body."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refusal(RefusalKind.INVALID, "bad_request", "the body is not JSON") from None
    if not isinstance(document, dict):
        raise Refusal(RefusalKind.INVALID, "bad_request", "the body must be a JSON object")
    csr = document.get("csr")
    if not isinstance(csr, str) or not csr.strip():
        raise Refusal(RefusalKind.INVALID, "bad_request", "csr must be a PEM string")
    ttl = document.get("ttl_seconds")
    # JSON true would pass for 1 in Python: a TTL is an integer, not a boolean.
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
        raise Refusal(RefusalKind.INVALID, "bad_ttl", "ttl_seconds must be an integer")
    return csr, ttl


def _svid_document(svid: IssuedSvid) -> dict[str, Any]:
    return {
        "spiffe_id": str(svid.spiffe_id),
        "certificate_chain": list(svid.certificate_chain_pems),
        "trust_bundle": list(svid.trust_bundle_pems),
        "expires_at": rfc3339(svid.expires_at),
    }


def _error(refusal: Refusal) -> asgi.Answer:
    status = HTTP_STATUS[refusal.kind]
    headers: asgi.Headers = []
    if refusal.retry_after_seconds is not None:
        headers.append((b"retry-after", b"%d" % refusal.retry_after_seconds))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return status, headers, json_error(refusal.message)


async def answer_certificate_request(service: CAService, scope: Any, receive: Any
                                     ) -> asgi.Answer:
    """`POST /v1/certificates`, from the ASGI scope and receive: the status, extra headers
    and JSON body (None if the client went away). Behind both the fast route and the FastAPI
    route (which only documents it, and answers for methods other than POST)."""
    count_request()
    try:
        body = await receive_body(scope, receive, MAX_CSR_REQUEST_BYTES)
        if body is None:
            return None  # the client went away: nobody to answer
        if isinstance(body, TooLarge):
            # The size is HTTP's to bound, before anything is read or checked: 413, no kind.
            too_large = Refusal(RefusalKind.INVALID, "too_large",
                                f"the body exceeds {MAX_CSR_REQUEST_BYTES} bytes")
            record_refusal(too_large)
            return 413, [], json_error(too_large.message)
        if isinstance(body, Busy):
            # The worker's memory for bodies is taken (injector.server.limits): HTTP's too.
            return BUSY_STATUS, list(BUSY_HEADERS), json_error(BUSY_MESSAGE)
        authorization = asgi.header(scope, b"authorization")
        # The client's address: the service limits failed authentications per address.
        client = scope.get("client")
        peer = str(client[0]) if client else None
        caller = service.authenticate_without_io(authorization, peer)
        if caller is None:
            caller = await run_in_threadpool(service.authenticate, authorization, peer)
        csr, ttl_seconds = _parse_request(body)
        svid = service.issue(caller, csr, ttl_seconds)
    except Refusal as refusal:
        record_refusal(refusal)
        return _error(refusal)
    except Exception:
        return _error(internal_failure())
    return 200, [], orjson.dumps(_svid_document(svid))


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
