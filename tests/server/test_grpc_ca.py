"""Istio's gRPC CA protocol, served by `injector serve --grpc-port` (injector.server.grpc_h2):
gRPC over real TLS from Python's grpcio as the client, against the same CA as
`POST /v1/certificates` (Istio's own Go client is in tests/e2e/test_istio_caclient.py)."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.ca.refusals import RefusalKind
from injector.mesh import names
from injector.server import grpc_ca, grpc_h2
from injector.server.proto import generate, istio_ca_pb2
from injector.server.proto.istio_ca_pb2 import IstioCertificateRequest, IstioCertificateResponse
from tests.support.certs import make_csr, p256
from tests.support.eventually import eventually
from tests.support.servers import (
    API_TOKEN,
    WEB_TOKEN,
    Server,
    free_port,
    start_ca_server,
)

WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
PROTO_DIR = Path(generate.__file__).parent
ISTIO_GO_MOD = Path(__file__).parents[1] / "istio" / "go.mod"


def open_channel(server: Server) -> grpc.Channel:
    root = server.root_cert.read_bytes()
    return grpc.secure_channel(f"127.0.0.1:{server.grpc_port}",
                               grpc.ssl_channel_credentials(root_certificates=root))


def create_certificate(channel: grpc.Channel, request: IstioCertificateRequest,
                       metadata: Sequence[tuple[str, str]] = ()) -> IstioCertificateResponse:
    call = channel.unary_unary(grpc_ca.METHOD_PATH,
                               request_serializer=IstioCertificateRequest.SerializeToString,
                               response_deserializer=IstioCertificateResponse.FromString)
    answer: IstioCertificateResponse = call(request, metadata=tuple(metadata), timeout=10)
    return answer


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def refused(channel: grpc.Channel, request: IstioCertificateRequest,
            metadata: Sequence[tuple[str, str]] = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        create_certificate(channel, request, metadata)
    return caught.value


def csr_pem(sans: list[x509.GeneralName] | None = None) -> str:
    return make_csr(p256(), sans=sans).decode()


@pytest.fixture(scope="module")
def channel(grpc_ca_server: Server) -> Iterator[grpc.Channel]:
    with open_channel(grpc_ca_server) as opened:
        yield opened


# --- the protocol's definition ---------------------------------------------------------------

def test_every_refusal_kind_has_a_grpc_status() -> None:
    assert set(grpc_ca.GRPC_STATUS) == set(RefusalKind)
    # Istio's clients retry these two and give up on the rest: a refusal that retrying cannot
    # fix must not be one of them.
    retried = {grpc_h2.Status.RESOURCE_EXHAUSTED, grpc_h2.Status.UNAVAILABLE}
    assert {kind for kind, code in grpc_ca.GRPC_STATUS.items() if code in retried} == {
        RefusalKind.EXHAUSTED, RefusalKind.UNAVAILABLE}


def test_status_numbers_are_grpcs() -> None:
    for status in grpc_h2.Status:
        assert grpc.StatusCode[status.name].value[0] == status.value


def test_the_checked_in_messages_are_what_the_proto_generates(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in ("istio_ca_pb2.py", "istio_ca_pb2.pyi"):
        assert (tmp_path / name).read_text() == (PROTO_DIR / name).read_text(), (
            f"{name} is stale: run python -m injector.server.proto.generate")


def _istio_api_proto() -> str:
    """Istio's own ca.proto, from the istio.io/api module that tests/istio/go.mod pins, in the Go
    module cache (`make cluster-binaries` downloads it)."""
    version = re.search(r"^\s*istio\.io/api (v\S+)", ISTIO_GO_MOD.read_text(), re.MULTILINE)
    assert version, f"{ISTIO_GO_MOD} does not require istio.io/api"
    # Where build.sh finds Go when a non-login shell lacks it on PATH.
    go = shutil.which("go") or "/usr/local/go/bin/go"
    modcache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True,
                              check=True).stdout.strip()
    proto = Path(modcache) / f"istio.io/api@{version[1]}" / "security/v1alpha1/ca.proto"
    assert proto.exists(), f"{proto} is missing: run make cluster-binaries"
    return proto.read_text()


def test_the_field_numbers_are_istios() -> None:
    istio = _istio_api_proto()
    assert "package istio.v1.auth;" in istio
    assert "rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse)" \
        in istio
    for message in (IstioCertificateRequest, IstioCertificateResponse):
        body = re.search(rf"message {message.DESCRIPTOR.name} {{(.*?)\n}}", istio, re.DOTALL)
        assert body, message.DESCRIPTOR.name
        theirs = dict(re.findall(r"^\s*(?:repeated )?[\w.]+ (\w+) = (\d+);", body[1],
                                 re.MULTILINE))
        ours = {field.name: str(field.number) for field in message.DESCRIPTOR.fields}
        assert ours == theirs
    assert istio_ca_pb2.DESCRIPTOR.package == "istio.v1.auth"
    assert grpc_ca.METHOD_PATH == "/istio.v1.auth.IstioCertificateService/CreateCertificate"


def _protobufs_reading(request: IstioCertificateRequest) -> grpc_ca.CertificateRequest:
    """What the generated classes (protobuf's own parser) read, as our codec reports it."""
    metadata = {key: value.string_value if value.WhichOneof("kind") == "string_value" else None
                for key, value in request.metadata.fields.items()}
    return grpc_ca.CertificateRequest(request.csr, request.validity_duration, metadata)


def test_requests_read_by_hand_as_protobuf_reads_them() -> None:
    request = IstioCertificateRequest(csr="-----BEGIN CERTIFICATE REQUEST-----\n",
                                      validity_duration=-(2**63))
    request.metadata.update({names.IMPERSONATED_IDENTITY: WEB_ID, "CertSigner": "",
                             "n": 1.5, "list": [1, "a"], "nested": {"a": None}})
    data = request.SerializeToString()
    assert grpc_ca.decode_request(data) == _protobufs_reading(request)
    # Istio's client writes fields in any order and a message may repeat one: protobuf keeps
    # the last scalar, merges the Struct, the last map entry for a key wins.
    again = IstioCertificateRequest(csr="second", validity_duration=7)
    again.metadata.update({"n": "now a string", "CertSigner": {"not": "a string"}})
    both = data + again.SerializeToString() + b"\xf8\x01\x05"  # + unknown field 31 = 5
    merged = IstioCertificateRequest.FromString(both)
    assert grpc_ca.decode_request(both) == _protobufs_reading(merged)
    assert grpc_ca.decode_request(b"") == grpc_ca.CertificateRequest()


@pytest.mark.parametrize("garbage", [
    b"\x0a\x05abc",                 # csr longer than the message
    b"\x0a\x02\xff\xfe",             # csr not UTF-8
    b"\x18" + b"\xff" * 11,          # a varint of 11 bytes
    b"\x0b",                         # a group
    b"\x00\x01",                     # field number 0
])
def test_what_protobuf_cannot_parse_is_malformed(garbage: bytes) -> None:
    with pytest.raises(DecodeError):
        IstioCertificateRequest.FromString(garbage)
    with pytest.raises(grpc_ca.MalformedMessage):
        grpc_ca.decode_request(garbage)


def test_responses_written_by_hand_as_protobuf_writes_them() -> None:
    chain = ["-----BEGIN CERTIFICATE-----\n" + "A" * 300 + "\n", "é" * 70_000, ""]
    encoded = grpc_ca.encode_response(chain)
    assert encoded == IstioCertificateResponse(cert_chain=chain).SerializeToString()
    assert list(IstioCertificateResponse.FromString(encoded).cert_chain) == chain
    assert grpc_ca.encode_response([]) == b""


def test_serve_never_loads_grpcio_or_the_protobuf_runtime() -> None:
    """grpcio's server cost every serve 14 MiB of idle RSS, protobuf's runtime and the generated
    classes 1.8 more (BENCHMARKS.md's memory section): the gRPC CA is served by grpc_h2 and
    reads and writes its two messages by hand."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, injector.server.grpc_ca, injector.server.wiring; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('google', 'grpc')))"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    assert loaded.strip() == "[]"


# --- answers ---------------------------------------------------------------------------------

def test_a_good_token_gets_its_svid_leaf_first_root_last(grpc_ca_server: Server,
                                                         channel: grpc.Channel) -> None:
    answer = create_certificate(channel, IstioCertificateRequest(csr=csr_pem(),
                                                                 validity_duration=3600),
                                [bearer(WEB_TOKEN), (names.CLUSTER_ID_METADATA, "Kubernetes")])
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in answer.cert_chain]
    assert len(chain) >= 2
    leaf, root = chain[0], chain[-1]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [WEB_ID]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 3600 <= lifetime.total_seconds() <= 3600 + 120
    assert root == x509.load_pem_x509_certificate(grpc_ca_server.root_cert.read_bytes())


def test_no_validity_asks_for_the_default(channel: grpc.Channel) -> None:
    for validity in (0, -5):
        answer = create_certificate(channel, IstioCertificateRequest(
            csr=csr_pem(), validity_duration=validity), [bearer(API_TOKEN)])
        leaf = x509.load_pem_x509_certificate(answer.cert_chain[0].encode())
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert 86400 <= lifetime.total_seconds() <= 86400 + 120


def test_no_token_or_a_bad_one_is_unauthenticated(channel: grpc.Channel) -> None:
    request = IstioCertificateRequest(csr=csr_pem())
    missing = refused(channel, request)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.details() == "missing bearer token"
    wrong = refused(channel, request, [bearer("not-a-token-this-ca-knows")])
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid for this CA" in wrong.details()


def test_another_clusters_id_is_unauthenticated(channel: grpc.Channel) -> None:
    error = refused(channel, IstioCertificateRequest(csr=csr_pem()),
                    [bearer(WEB_TOKEN), (names.CLUSTER_ID_METADATA, "remote-east")])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "ClusterID 'remote-east' is not this CA's cluster 'Kubernetes'" in error.details()


def test_another_identity_is_permission_denied(channel: grpc.Channel) -> None:
    other = "spiffe://cluster.local/ns/shop/sa/api"
    in_csr = refused(channel, IstioCertificateRequest(
        csr=csr_pem([x509.UniformResourceIdentifier(other)])), [bearer(WEB_TOKEN)])
    assert in_csr.code() == grpc.StatusCode.PERMISSION_DENIED
    metadata = struct_pb2.Struct()
    metadata.update({names.IMPERSONATED_IDENTITY: other})
    impersonating = refused(channel, IstioCertificateRequest(csr=csr_pem(), metadata=metadata),
                            [bearer(WEB_TOKEN)])
    assert impersonating.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ImpersonatedIdentity is not honoured" in impersonating.details()
    # Naming itself, or the signer Istio's clients always send, changes nothing.
    metadata.update({names.IMPERSONATED_IDENTITY: WEB_ID, "CertSigner": ""})
    answer = create_certificate(channel, IstioCertificateRequest(csr=csr_pem(),
                                                                 metadata=metadata),
                                [bearer(WEB_TOKEN)])
    assert len(answer.cert_chain) >= 2


def test_what_cannot_be_signed_is_invalid_argument(channel: grpc.Channel) -> None:
    too_long = refused(channel, IstioCertificateRequest(csr=csr_pem(),
                                                        validity_duration=10**9),
                       [bearer(WEB_TOKEN)])
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl_seconds must be between 1 and" in too_long.details()
    for csr in ("", "-----BEGIN CERTIFICATE REQUEST-----\nnope\n"):
        error = refused(channel, IstioCertificateRequest(csr=csr), [bearer(WEB_TOKEN)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_malformed_message_is_invalid_argument_and_counted(grpc_ca_server: Server,
                                                            channel: grpc.Channel) -> None:
    def bad_requests() -> float:
        with grpc_ca_server.client() as https:
            text = https.get("/metrics").text
        found = re.search(r'^injector_ca_refusals_total{reason="bad_request"} (\S+)$', text,
                          re.MULTILINE)
        return float(found[1]) if found else 0.0

    before = bad_requests()
    call = channel.unary_unary(grpc_ca.METHOD_PATH)  # bytes as they are
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\x0a\x05abc", metadata=(bearer(WEB_TOKEN),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "not an IstioCertificateRequest: field 1 runs past the end")
    assert bad_requests() == before + 1


def test_a_message_over_64_kib_is_refused_before_it_is_read(channel: grpc.Channel) -> None:
    error = refused(channel, IstioCertificateRequest(csr="x" * (65 * 1024)), [bearer(WEB_TOKEN)])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_refusals_count_in_the_same_metrics_as_https(grpc_ca_server: Server,
                                                     channel: grpc.Channel) -> None:
    def refused_for(reason: str) -> float:
        with grpc_ca_server.client() as https:
            text = https.get("/metrics").text
        found = re.search(rf'^injector_ca_refusals_total{{reason="{reason}"}} (\S+)$', text,
                          re.MULTILINE)
        return float(found[1]) if found else 0.0

    before = refused_for("unknown_cluster")
    refused(channel, IstioCertificateRequest(csr=csr_pem()),
            [bearer(WEB_TOKEN), (names.CLUSTER_ID_METADATA, "elsewhere")])
    assert refused_for("unknown_cluster") == before + 1


def test_tls_below_1_2_is_refused(grpc_ca_server: Server) -> None:
    def handshake(version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", version, "-connect", f"127.0.0.1:{grpc_ca_server.grpc_port}",
             "-CAfile", str(grpc_ca_server.root_cert), "-alpn", "h2"],
            input="", capture_output=True, text=True, errors="replace", timeout=20)

    assert "Verify return code: 0 (ok)" in handshake("-tls1_2").stdout
    old = handshake("-tls1_1")
    assert old.returncode != 0
    assert "Cipher is (NONE)" in old.stdout or "no protocols available" in old.stderr


def _presented_serial(server: Server) -> int:
    context = server.ssl_context()
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_rotated_serving_certificate_is_served_over_grpc_too(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path, grpc=True)
    try:
        before = _presented_serial(server)
        (server.certs_dir / "tls.crt").unlink()
        (server.certs_dir / "tls.key").unlink()
        subprocess.run([*_serve_command(tmp_path)[:3], "certs", "init", "--certs-dir",
                        str(server.certs_dir)], check=True, timeout=60,
                       stdout=subprocess.DEVNULL)
        on_disk = x509.load_pem_x509_certificate(
            (server.certs_dir / "tls.crt").read_bytes()).serial_number
        assert on_disk != before
        eventually(lambda: _presented_serial(server) == on_disk, interval=0.2,
                   what="the new certificate served on the gRPC port")
        with open_channel(server) as opened:
            assert create_certificate(opened, IstioCertificateRequest(csr=csr_pem()),
                                      [bearer(WEB_TOKEN)]).cert_chain
    finally:
        server.stop()


# --- limits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flood", ["rapid reset", "ping"])
def test_a_flood_of_frames_is_cut_off_and_calls_go_on(grpc_ca_server: Server,
                                                      flood: str) -> None:
    """HTTP/2's rapid reset (CVE-2023-44487: streams opened and cancelled as fast as they can
    be written) and a PING flood (each answered) cost the worker's event loop, the admissions'
    too, and the caller nothing. Past MAX_RESETS_PER_CONNECTION cancelled streams, or
    MAX_CONTROL_FRAMES_PER_SECOND frames that carry no call, the connection gets GOAWAY
    ENHANCE_YOUR_CALM and is closed, the rest of what was sent left unread; the next caller
    is served."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    context = grpc_ca_server.ssl_context()
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", grpc_ca_server.grpc_port), timeout=20)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                   (":path", "/istio.v1.auth.IstioCertificateService/CreateCertificate"),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        frames = 10 * max(grpc_h2.MAX_RESETS_PER_CONNECTION,
                          grpc_h2.MAX_CONTROL_FRAMES_PER_SECOND)
        for _ in range(frames):
            if flood == "ping":
                client.ping(b"floods!!")
            else:
                stream_id = client.get_next_available_stream_id()
                client.send_headers(stream_id, headers)
                client.reset_stream(stream_id)
        with contextlib.suppress(OSError):  # the server may close before it reads it all
            tls.sendall(client.data_to_send())
        terminated = None
        while terminated is None:
            try:
                data = tls.recv(65536)
            except OSError:
                break
            if not data:
                break
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    terminated = event
    assert terminated is not None, "the flood's connection was not told GOAWAY"
    assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    if flood == "rapid reset":
        assert terminated.last_stream_id < 2 * frames - 1  # not every stream was taken in
    with open_channel(grpc_ca_server) as opened:
        assert create_certificate(opened, IstioCertificateRequest(csr=csr_pem()),
                                  [bearer(WEB_TOKEN)]).cert_chain


def test_a_connection_that_never_says_hello_is_closed(grpc_ca_server: Server) -> None:
    """A client that connects and sends nothing holds nothing for long: gRPC closes it once
    the TLS handshake's 10 s are up (checked at most a few seconds late)."""
    with socket.create_connection(("127.0.0.1", grpc_ca_server.grpc_port), timeout=30) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""
        assert time.monotonic() - started >= grpc_ca.HANDSHAKE_TIMEOUT_MS / 1000 - 1


def test_over_the_rate_is_resource_exhausted_with_retry_after(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path, "csrBurst: 2\ncsrRatePerSecond: 0.01\n", grpc=True)
    try:
        with open_channel(server) as opened:
            request = IstioCertificateRequest(csr=csr_pem())
            for _ in range(2):
                create_certificate(opened, request, [bearer(WEB_TOKEN)])
            error = refused(opened, request, [bearer(WEB_TOKEN)])
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many certificate requests for shop/web" in error.details()
            assert int(dict(error.trailing_metadata())["retry-after"]) > 0
            # One identity's rate is its own: another's request is signed.
            create_certificate(opened, request, [bearer(API_TOKEN)])
    finally:
        server.stop()


def test_an_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/istio.v1.auth.IstioCertificateService/Other")
    with pytest.raises(grpc.RpcError) as caught:
        call(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metadata_over_24_kib_is_resource_exhausted(channel: grpc.Channel) -> None:
    error = refused(channel, IstioCertificateRequest(csr=csr_pem()),
                    [bearer(WEB_TOKEN), ("padding", "p" * (25 * 1024))])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata of" in error.details()


def test_no_token_reaches_the_log_even_at_debug_level(tmp_path: Path) -> None:
    """HTTP/2's header compression logs every header it reads at debug level: the bearer
    token must not be among what serve writes."""
    server = start_ca_server(tmp_path, "csrBurst: 100000\n", "--log-level", "debug",
                             grpc=True)
    try:
        with open_channel(server) as opened:
            assert create_certificate(opened, IstioCertificateRequest(csr=csr_pem()),
                                      [bearer(WEB_TOKEN)]).cert_chain
    finally:
        server.stop()
    assert WEB_TOKEN not in server.log()


def test_serve_stops_cleanly_with_a_grpc_connection_open(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path, grpc=True)
    try:
        with open_channel(server) as opened:
            assert create_certificate(opened, IstioCertificateRequest(csr=csr_pem()),
                                      [bearer(WEB_TOKEN)]).cert_chain
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=40) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5).close()
    finally:
        server.stop()


def _listeners(port: int) -> set[int]:
    """The pids of the processes listening on `port` (ss, from iproute2)."""
    listing = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                             text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", listing)}


def test_every_worker_serves_grpc(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path, "csrBurst: 100000\n", "--workers", "2", grpc=True)
    try:
        # Each worker listens on the port itself (SO_REUSEPORT), and the kernel spreads new
        # connections over them: every one of them is answered.
        pids = set(server.workers(2))
        eventually(lambda: _listeners(server.grpc_port) == pids,
                   what=f"workers {sorted(pids)} listening on {server.grpc_port}")
        for _ in range(16):
            with open_channel(server) as opened:
                answer = create_certificate(opened, IstioCertificateRequest(csr=csr_pem()),
                                            [bearer(WEB_TOKEN)])
                assert len(answer.cert_chain) >= 2
    finally:
        server.stop()


def test_a_grpc_port_in_use_stops_serve_with_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*_serve_command(tmp_path), "--port", str(free_port()), "--grpc-port", str(port)],
            capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def _serve_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "injector", "serve", "--certs-dir", str(workdir / "certs")]


# --- any request -----------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, width=32) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


@st.composite
def _requests(draw: st.DrawFn) -> IstioCertificateRequest:
    good = draw(st.booleans())
    if good:
        subject = draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]),
                               min_size=1, max_size=16))  # at most 64 bytes of UTF-8
        csr = make_csr(p256(), subject=x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, subject)])).decode()
    else:
        csr = draw(st.text(max_size=200) | st.sampled_from([
            "-----BEGIN CERTIFICATE REQUEST-----\n\n-----END CERTIFICATE REQUEST-----\n",
            "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 300 + "\n"]))
    metadata = struct_pb2.Struct()
    metadata.update(draw(st.dictionaries(
        st.sampled_from([names.IMPERSONATED_IDENTITY, "CertSigner", "ClusterID", "x"])
        | st.text(max_size=20), _json_values, max_size=5)))
    if draw(st.booleans()):
        metadata.update({"padding": draw(st.integers(0, 80 * 1024).map(lambda n: "p" * n))})
    validity = draw(st.integers(-(2**63), 2**63 - 1) | st.sampled_from(
        [0, 1, 59, 60, 86400, 7776000, 7776001]))
    return IstioCertificateRequest(csr=csr, validity_duration=validity, metadata=metadata)


_PROPER = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=_requests(), token=st.sampled_from([WEB_TOKEN, "", "bogus"]),
       cluster=st.sampled_from(["", "Kubernetes", "other"]))
def test_any_request_is_signed_or_refused_properly(channel: grpc.Channel,
                                                   request: IstioCertificateRequest,
                                                   token: str, cluster: str) -> None:
    assert grpc_ca.decode_request(request.SerializeToString()) == _protobufs_reading(request)
    metadata = [bearer(token)] if token else []
    if cluster:
        metadata.append((names.CLUSTER_ID_METADATA, cluster))
    try:
        answer = create_certificate(channel, request, metadata)
    except grpc.RpcError as error:
        assert error.code() in _PROPER, (error.code(), error.details())
        assert error.details(), error.code()
        assert "Traceback" not in error.details()
    else:
        leaf = x509.load_pem_x509_certificate(answer.cert_chain[0].encode())
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [WEB_ID]
