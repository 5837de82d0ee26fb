"""The CA over Istio's gRPC protocol: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

What istiod serves on port 15012 and every Istio sidecar (pilot-agent, `CA_ADDR`) calls: a CSR in
PEM, a validity in seconds and a metadata Struct in; the chain out, leaf first and root last. The
gRPC transport of `injector.ca.service`, and nothing else: the same authenticators, rate limit,
failure budget, signing policy, refusals and metrics as `POST /v1/certificates`; a refusal's kind
becomes its gRPC status here, in `GRPC_STATUS`, with the reason in the status message.

Istio's metadata is honoured where it is safe: `ClusterID` (gRPC metadata) must be absent or
name this CA's cluster, since the token is checked against this cluster's API server alone;
`ImpersonatedIdentity` (in the request's Struct, how Istio's node agents ask for another
workload's certificate) is refused unless it names the caller itself; `CertSigner` is ignored
(this CA has one signer, and it changes nothing about whose identity is signed).

The two messages are read and written here, in protobuf's wire format, without the protobuf
runtime: it and the generated classes cost every `serve` 2.6 MiB of RSS for two messages of three
fields. The generated classes (injector/server/proto) stay as the tests' reference: a test holds
this codec to them on any message, and Istio's own Go client talks to it end to end.

The transport is injector.server.grpc_h2: unary gRPC over HTTP/2 on the worker's own event loop,
each call answered there as over HTTPS, only a TokenReview (it blocks) in a small pool of
threads; grpcio's server cost `serve` 14.3 MiB of idle RSS. Each `serve` worker binds the
shared port itself with SO_REUSEPORT, so that with `--workers N` the kernel spreads connections
over the N servers as it does for HTTPS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from injector.ca.authn import Caller
from injector.ca.refusals import Refusal, RefusalKind
from injector.ca.service import CAService, count_request, internal_failure, record_refusal
from injector.mesh import names
from injector.mesh.spiffe import SpiffeId, SpiffeIdError
from injector.server import grpc_h2
from injector.server.grpc_h2 import Call, GrpcServer, Reply, Status
from injector.server.tls import server_tls_context

METHOD_PATH: Final = f"/{names.GRPC_CA_SERVICE}/{names.GRPC_CA_METHOD}"

GRPC_STATUS: Final[Mapping[RefusalKind, Status]] = {
    RefusalKind.UNAUTHENTICATED: Status.UNAUTHENTICATED,
    RefusalKind.FORBIDDEN: Status.PERMISSION_DENIED,
    RefusalKind.INVALID: Status.INVALID_ARGUMENT,
    RefusalKind.EXHAUSTED: Status.RESOURCE_EXHAUSTED,
    RefusalKind.UNAVAILABLE: Status.UNAVAILABLE,
}

# The same bound as the HTTPS request body: a CSR is a few hundred bytes. A larger message is
# RESOURCE_EXHAUSTED before it is read.
MAX_REQUEST_BYTES: Final = 64 * 1024
# Metadata holds the bearer token (the CA refuses one over 16 KiB itself) and a few short keys;
# past this the call is refused before it reaches us.
MAX_METADATA_BYTES: Final = 24 * 1024
# Threads that run the TokenReviews (each blocks one; the service allows 8 in flight); the rest
# of a call runs on the event loop. Calls beyond them wait, up to grpc_h2.MAX_CONCURRENT_CALLS;
# past that, RESOURCE_EXHAUSTED at once.
HANDLER_THREADS: Final = 8
# How long a worker's stop waits for the calls in flight.
STOP_GRACE_SECONDS: Final = 5.0
# As the HTTPS port: a TLS handshake must end within 10 s of the connection.
HANDSHAKE_TIMEOUT_MS: Final = int(grpc_h2.HANDSHAKE_TIMEOUT_SECONDS * 1000)

log = logging.getLogger("injector.ca")


# --- Istio's two messages, in protobuf's wire format -------------------------------------------
# IstioCertificateRequest {string csr = 1; int64 validity_duration = 3;
#                          google.protobuf.Struct metadata = 4;}
# IstioCertificateResponse {repeated string cert_chain = 1;}
# Struct {map<string, Value> fields = 1;}, a map being repeated entries {key = 1; value = 2;};
# Value {oneof kind: null 1, number 2, string 3, bool 4, struct 5, list 6}.

_VARINT: Final = 0
_FIXED64: Final = 1
_LENGTH: Final = 2
_FIXED32: Final = 5
_FIXED_WIDTHS: Final = {_FIXED64: 8, _FIXED32: 4}
# Value's kinds by field number, with the wire type each is written with.
_VALUE_KINDS: Final = {1: _VARINT, 2: _FIXED64, 3: _LENGTH, 4: _VARINT, 5: _LENGTH, 6: _LENGTH}
_STRING_KIND: Final = 3


class MalformedMessage(ValueError):
    """Bytes that are not a protobuf message; the message says where it breaks."""


@dataclass(frozen=True)
class CertificateRequest:
    """An IstioCertificateRequest as read: the metadata Struct's values by key, a string, or
    None for a value of another kind (which no key this CA reads may have)."""

    csr: str = ""
    validity_duration: int = 0
    metadata: Mapping[str, str | None] = field(default_factory=dict)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` (at most 10 bytes, as 64 bits) and the offset after it."""
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(data):
            raise MalformedMessage("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, at
    raise MalformedMessage("varint longer than 10 bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Each field of a message: its number, its wire type and its value, an int for a varint,
    the bytes of a length-delimited or fixed-width one (not parsed further). Groups (wire
    types 3 and 4, deprecated, never in these messages) are refused rather than skipped."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedMessage("field number 0")
        if wire_type == _VARINT:
            value, at = _read_varint(data, at)
            yield number, wire_type, value
            continue
        if wire_type == _LENGTH:
            size, at = _read_varint(data, at)
        elif wire_type in _FIXED_WIDTHS:
            size = _FIXED_WIDTHS[wire_type]
        else:
            raise MalformedMessage(f"field {number} has wire type {wire_type}")
        if at + size > len(data):
            raise MalformedMessage(f"field {number} runs past the end")
        yield number, wire_type, data[at:at + size]
        at += size


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise MalformedMessage(f"{what} is not UTF-8") from None


def _value_string(data: bytes, merged_into: str | None) -> str | None:
    """A Value's string, None if it is of another kind or of none; a Value seen twice for one
    key is merged, as protobuf merges it: the last kind set wins."""
    kind: int | None = None
    string: str | None = None
    for number, wire_type, value in _fields(data):
        # A kind's field with another wire type is an unknown field to protobuf, and to us.
        if _VALUE_KINDS.get(number) == wire_type:
            kind = number
            string = _text(value, "a metadata value") if (
                number == _STRING_KIND and isinstance(value, bytes)) else None
    return merged_into if kind is None else string


def _struct(data: bytes, into: dict[str, str | None]) -> None:
    """A Struct's entries added to `into` (the last of a repeated key wins, as in a map)."""
    for number, wire_type, entry in _fields(data):
        if number != 1 or wire_type != _LENGTH or not isinstance(entry, bytes):
            continue
        key = ""
        value: str | None = None
        for entry_number, entry_wire_type, part in _fields(entry):
            if entry_wire_type != _LENGTH or not isinstance(part, bytes):
                continue
            if entry_number == 1:
                key = _text(part, "a metadata key")
            elif entry_number == 2:
                value = _value_string(part, value)
        into[key] = value


def decode_request(data: bytes) -> CertificateRequest:
    """An IstioCertificateRequest from its bytes; unknown fields are skipped, as protobuf does.
    Raises MalformedMessage."""
    csr = ""
    validity = 0
    metadata: dict[str, str | None] = {}
    for number, wire_type, value in _fields(data):
        if number == 1 and wire_type == _LENGTH and isinstance(value, bytes):
            csr = _text(value, "csr")
        elif number == 3 and wire_type == _VARINT and isinstance(value, int):
            validity = value - (1 << 64) if value >= 1 << 63 else value  # int64: two's complement
        elif number == 4 and wire_type == _LENGTH and isinstance(value, bytes):
            _struct(value, metadata)
    return CertificateRequest(csr, validity, metadata)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_response(cert_chain: Sequence[str]) -> bytes:
    """An IstioCertificateResponse's bytes: `cert_chain`, in order, as field 1."""
    out = bytearray()
    for pem in cert_chain:
        encoded = pem.encode()
        out += b"\x0a" + _varint_bytes(len(encoded)) + encoded
    return bytes(out)


def _metadata_string(request: CertificateRequest, key: str) -> str:
    """A string value of the request's metadata Struct; "" when absent, refused if not a string."""
    if key not in request.metadata:
        return ""
    value = request.metadata[key]
    if value is None:
        raise Refusal(RefusalKind.INVALID, "bad_request", f"metadata {key} must be a string")
    return value


class IstioCertificateService:
    """`CreateCertificate`, answered by a CAService for the cluster `cluster_id`."""

    def __init__(self, service: CAService, cluster_id: str = names.DEFAULT_CLUSTER_ID) -> None:
        self._service = service
        self._cluster_id = cluster_id
        self._threads: ThreadPoolExecutor | None = None

    def _authentication_threads(self) -> ThreadPoolExecutor:
        if self._threads is None:  # started with the first call that needs one
            self._threads = ThreadPoolExecutor(max_workers=HANDLER_THREADS,
                                               thread_name_prefix="grpc-ca")
        return self._threads

    async def create_certificate(self, call: Call) -> Reply:
        """The chain for the caller's identity, leaf first and root last (an
        IstioCertificateResponse's bytes, from the request's); or the refusal's status and
        message (with `retry-after` in the trailing metadata when known)."""
        count_request()
        try:
            try:
                request = decode_request(call.message)
            except MalformedMessage as error:
                raise Refusal(RefusalKind.INVALID, "bad_request",
                              f"not an IstioCertificateRequest: {error}") from None
            return Reply(message=await self._answer(request, call))
        except Refusal as refusal:
            record_refusal(refusal)
            return self._refuse(refusal)
        except Exception:
            return self._refuse(internal_failure())

    async def _answer(self, request: CertificateRequest, call: Call) -> bytes:
        metadata = call.metadata
        cluster = metadata.get(names.CLUSTER_ID_METADATA, "")
        if cluster and cluster != self._cluster_id:
            # The token would have to be checked by that cluster's API server; this CA knows
            # one cluster. The name is the caller's own, cut.
            raise Refusal(RefusalKind.UNAUTHENTICATED, "unknown_cluster",
                          f"ClusterID {cluster[:64]!r} is not this CA's cluster "
                          f"{self._cluster_id!r}")
        authorization = metadata.get("authorization")
        # On the event loop when no I/O is needed (a static token, one reviewed a moment ago);
        # a TokenReview blocks, so it runs in a thread, as over HTTPS.
        caller = self._service.authenticate_without_io(authorization, call.peer)
        if caller is None:
            caller = await asyncio.get_running_loop().run_in_executor(
                self._authentication_threads(), self._service.authenticate, authorization,
                call.peer)
        impersonated = _metadata_string(request, names.IMPERSONATED_IDENTITY)
        if impersonated and impersonated != self._own_identity(caller):
            raise Refusal(RefusalKind.FORBIDDEN, "impersonation",
                          f"{names.IMPERSONATED_IDENTITY} is not honoured: this CA signs only "
                          "the identity of the caller's token")
        if not request.csr.strip():
            raise Refusal(RefusalKind.INVALID, "bad_request", "csr must be a PEM string")
        # Istio's convention: a validity of 0 or less asks for the CA's default.
        ttl_seconds = request.validity_duration if request.validity_duration > 0 else None
        svid = self._service.issue(caller, request.csr, ttl_seconds)
        return encode_response([*svid.certificate_chain_pems, *svid.trust_bundle_pems])

    def _own_identity(self, caller: Caller) -> str | None:
        try:
            return str(SpiffeId.for_service_account(self._service.authority.trust_domain,
                                                    caller.namespace, caller.service_account))
        except SpiffeIdError:
            return None  # issue() refuses such a caller anyway

    @staticmethod
    def _refuse(refusal: Refusal) -> Reply:
        trailers = () if refusal.retry_after_seconds is None else (
            ("retry-after", str(refusal.retry_after_seconds)),)
        return Reply(GRPC_STATUS[refusal.kind], details=refusal.message, trailers=trailers)


class ServingContexts:
    """The TLS context for each new gRPC connection: the serving certificate, re-read when
    `version()` changes (serve's ServingCertificate replaces its context when the files
    rotate), so a changed pair is served from the next connection. Its own contexts, not the
    HTTPS port's: these offer HTTP/2 (ALPN h2), as gRPC's clients require."""

    def __init__(self, cert_path: Path, key_path: Path, version: Callable[[], object]) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._version = version
        self._served = version()
        self._context = self._load()

    def _load(self) -> ssl.SSLContext:
        context = server_tls_context(self._cert_path, self._key_path)
        context.set_alpn_protocols(["h2"])
        return context

    def current(self) -> ssl.SSLContext:
        version = self._version()
        if version is not self._served:
            try:
                self._context = self._load()
            except (OSError, ssl.SSLError) as error:
                log.warning("gRPC serving certificate not reloaded: %s", error)
            else:
                self._served = version
        return self._context


def build_server(service: CAService, *, host: str, port: int, contexts: ServingContexts,
                 cluster_id: str = names.DEFAULT_CLUSTER_ID) -> tuple[GrpcServer, int]:
    """Istio's CA protocol over TLS on host:port (SO_REUSEPORT: every worker binds it), served
    once the server's `serve()` runs on the event loop; the server and the port bound (port 0:
    one the system chose). Raises OSError when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        reason = error.strerror or str(error)
        raise OSError(f"cannot listen on {host}:{port} for gRPC: {reason}") from None
    server = GrpcServer(
        listener, {METHOD_PATH: IstioCertificateService(service, cluster_id).create_certificate},
        contexts.current, max_message_bytes=MAX_REQUEST_BYTES,
        max_metadata_bytes=MAX_METADATA_BYTES, stop_grace_seconds=STOP_GRACE_SECONDS)
    return server, listener.getsockname()[1]
