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

gRPC's synchronous server runs in threads beside uvicorn's event loop: TokenReview blocks, and
grpc's asyncio server does not run on uvloop. It is started in each `serve` worker after the fork
(gRPC's threads do not survive one), on the shared port with SO_REUSEPORT, so that with
`--workers N` the kernel spreads connections over the N servers as it does for HTTPS.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import grpc

from injector.ca.authn import Caller
from injector.ca.refusals import Refusal, RefusalKind
from injector.ca.service import CAService, count_request, internal_failure, record_refusal
from injector.mesh import names
from injector.mesh.spiffe import SpiffeId, SpiffeIdError
from injector.server.proto.istio_ca_pb2 import IstioCertificateRequest, IstioCertificateResponse

METHOD_PATH: Final = f"/{names.GRPC_CA_SERVICE}/{names.GRPC_CA_METHOD}"

GRPC_STATUS: Final[Mapping[RefusalKind, grpc.StatusCode]] = {
    RefusalKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RefusalKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    RefusalKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    RefusalKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RefusalKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}

# The same bound as the HTTPS request body: a CSR is a few hundred bytes. gRPC answers a larger
# message RESOURCE_EXHAUSTED before it is parsed.
MAX_REQUEST_BYTES: Final = 64 * 1024
# Metadata holds the bearer token (the CA refuses one over 16 KiB itself) and a few short keys;
# past this gRPC refuses the call before it reaches us.
MAX_METADATA_BYTES: Final = 24 * 1024
# Threads that run requests (a TokenReview blocks one; the service allows 8 in flight), and
# requests held at once beyond them: past that gRPC answers RESOURCE_EXHAUSTED at once.
HANDLER_THREADS: Final = 8
MAX_CONCURRENT_RPCS: Final = 256
# As the HTTPS port: a TLS handshake must end within 10 s of the connection, and an idle
# connection is closed; a client has a bounded number of streams per connection.
HANDSHAKE_TIMEOUT_MS: Final = 10_000
MAX_CONNECTION_IDLE_MS: Final = 300_000
MAX_STREAMS_PER_CONNECTION: Final = 16

log = logging.getLogger("injector.ca")


def peer_address(peer: str) -> str | None:
    """The client's address of a gRPC peer string ("ipv4:10.0.0.1:5000", "ipv6:%5B::1%5D:5000"),
    for the failure budget; None for what has no address (a Unix socket)."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rpartition(":")[0]
    return host.strip("[]") or None


def _metadata_string(request: IstioCertificateRequest, key: str) -> str:
    """A string field of the request's metadata Struct; "" when absent, refused if not a string."""
    if not request.HasField("metadata") or key not in request.metadata.fields:
        return ""
    value = request.metadata.fields[key]
    if value.WhichOneof("kind") != "string_value":
        raise Refusal(RefusalKind.INVALID, "bad_request", f"metadata {key} must be a string")
    return value.string_value


class IstioCertificateService:
    """`CreateCertificate`, answered by a CAService for the cluster `cluster_id`."""

    def __init__(self, service: CAService, cluster_id: str = names.DEFAULT_CLUSTER_ID) -> None:
        self._service = service
        self._cluster_id = cluster_id

    def create_certificate(self, request: IstioCertificateRequest,
                           context: grpc.ServicerContext) -> IstioCertificateResponse:
        """The chain for the caller's identity, leaf first and root last; or the refusal's
        status and message (with `retry-after` in the trailing metadata when known)."""
        count_request()
        try:
            return self._answer(request, context)
        except Refusal as refusal:
            record_refusal(refusal)
            return self._refuse(refusal, context)
        except Exception:
            return self._refuse(internal_failure(), context)

    def _answer(self, request: IstioCertificateRequest,
                context: grpc.ServicerContext) -> IstioCertificateResponse:
        metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata():
            if isinstance(value, str):
                metadata.setdefault(key, value)
        cluster = metadata.get(names.CLUSTER_ID_METADATA, "")
        if cluster and cluster != self._cluster_id:
            # The token would have to be checked by that cluster's API server; this CA knows
            # one cluster. The name is the caller's own, cut.
            raise Refusal(RefusalKind.UNAUTHENTICATED, "unknown_cluster",
                          f"ClusterID {cluster[:64]!r} is not this CA's cluster "
                          f"{self._cluster_id!r}")
        caller = self._service.authenticate(metadata.get("authorization"),
                                            peer_address(context.peer()))
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
        return IstioCertificateResponse(
            cert_chain=[*svid.certificate_chain_pems, *svid.trust_bundle_pems])

    def _own_identity(self, caller: Caller) -> str | None:
        try:
            return str(SpiffeId.for_service_account(self._service.authority.trust_domain,
                                                    caller.namespace, caller.service_account))
        except SpiffeIdError:
            return None  # issue() refuses such a caller anyway

    @staticmethod
    def _refuse(refusal: Refusal, context: grpc.ServicerContext) -> IstioCertificateResponse:
        if refusal.retry_after_seconds is not None:
            context.set_trailing_metadata((("retry-after", str(refusal.retry_after_seconds)),))
        context.set_code(GRPC_STATUS[refusal.kind])
        context.set_details(refusal.message)
        return IstioCertificateResponse()

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's one method, for grpc.Server.add_generic_rpc_handlers."""
        method = grpc.unary_unary_rpc_method_handler(
            self.create_certificate,
            request_deserializer=IstioCertificateRequest.FromString,
            response_serializer=IstioCertificateResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(
            names.GRPC_CA_SERVICE, {names.GRPC_CA_METHOD: method})


class ServingPair:
    """The serving certificate gRPC presents, re-read when `version()` changes (serve's
    ServingCertificate replaces its context when the files rotate): gRPC asks on each new
    connection, and a changed pair is served from the next one."""

    def __init__(self, cert_path: Path, key_path: Path, version: Callable[[], object]) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._version = version
        self._served: object = None

    def _configuration(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(self._key_path.read_bytes(), self._cert_path.read_bytes())])

    def initial(self) -> Any:
        self._served = self._version()
        return self._configuration()

    def fetch(self) -> Any:
        """None (keep the current pair) unless the version changed."""
        current = self._version()
        if current is self._served:
            return None
        try:
            configuration = self._configuration()
        except OSError as error:
            log.warning("gRPC serving certificate not reloaded: %s", error)
            return None
        self._served = current
        return configuration


def start_server(service: CAService, *, host: str, port: int, pair: ServingPair,
                 cluster_id: str = names.DEFAULT_CLUSTER_ID) -> tuple[grpc.Server, int]:
    """Serve Istio's CA protocol over TLS on host:port (SO_REUSEPORT: every worker binds it);
    the started server and the port bound (port 0: one the system chose).

    TLS: gRPC's own, which offers TLS 1.2 and 1.3 only, with forward-secret AEAD suites, as the
    HTTPS port does. Raises OSError when the address cannot be bound."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="grpc-ca"),
        handlers=[IstioCertificateService(service, cluster_id).handler()],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
            ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ])
    credentials = grpc.dynamic_ssl_server_credentials(pair.initial(), pair.fetch)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address} for gRPC: {error}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address} for gRPC")
    server.start()
    return server, bound
