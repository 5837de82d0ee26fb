"""The sidecar end to end: pods injected by our webhook, run as written, talking mTLS.

The harness (tests/e2e/mesh.py) builds a control plane running `injector serve` and pods in
network namespaces; each pod's `istio-init` and `istio-proxy` containers are the ones
`injector kube-inject` wrote for a manifest from examples/, run with exactly their command, args,
env, volumes and security context:

- payments (examples/annotated-pod.yaml, hold mode: its postStart hook `injector agent wait`) and
  httpbin (examples/pod.yaml, with a short certificate lifetime to watch renewals), both sent
  through the running webhook (`POST /inject`) and patched with its answer;
- reviews (examples/deployment.yaml's template, through `injector kube-inject`) as a native
  sidecar in STRICT mode, whose agent starts before its CA;
- probed (STRICT), whose rewritten probes (SPEC 8) are sent from the node's side as kubelet
  sends them, and pass through the agent where the originals cannot.

Needs root, iproute2, iptables, util-linux and Envoy; skipped with the reason otherwise (CI runs
as root). Every wait is bounded.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e import mesh as harness
from tests.e2e.mesh import APP_PORT, CA_IP, EXAMPLES, OUTSIDE_IP, Mesh, Pod, metric

_MISSING = harness.missing_prerequisite()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

SHORT_TTL_SECONDS = 8  # httpbin's certificates: renewed about every 4 s
LATE_CA_PORT = 15018
ECHO_PORT = 9000  # httpbin's TCP service that is not HTTP


@dataclass
class Cluster:
    mesh: Mesh
    payments: Pod
    httpbin: Pod
    outside_log: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("mesh")
    with harness.Mesh(workdir) as mesh:
        # The pods' tokens exist before the CA starts, which reads its token file then.
        manifests = {"payments": EXAMPLES / "annotated-pod.yaml", "httpbin": EXAMPLES / "pod.yaml"}
        for manifest in manifests.values():
            mesh.token_for(yaml.safe_load(manifest.read_text()))
        mesh.start_ca()
        # Through the running webhook, as the API server would send them.
        payments = mesh.add_pod("payments", mesh.admit(manifests["payments"])[1])
        httpbin = mesh.add_pod("httpbin", mesh.admit(manifests["httpbin"])[1])
        for pod in (payments, httpbin):
            mesh.run_init(pod)
        mesh.start_proxy(httpbin, extra_env={"INJECTOR_TTL_SECONDS": str(SHORT_TTL_SECONDS)})
        mesh.start_proxy(payments)
        # Hold mode: the kubelet runs the postStart hook before starting the app.
        hook = mesh.post_start(payments)
        assert hook.returncode == 0, f"postStart hook failed: {hook.stderr}\n" \
                                     f"{payments.proxy.log()[-3000:] if payments.proxy else ''}"
        mesh.wait_ready(httpbin)
        mesh.start_app(httpbin)
        mesh.start_echo(httpbin, ECHO_PORT)
        mesh.start_app(payments)
        outside_log = mesh.start_outside_app()
        mesh.wait_listening(httpbin.netns, httpbin.ip, APP_PORT)
        mesh.wait_listening(httpbin.netns, httpbin.ip, ECHO_PORT)
        mesh.wait_listening(mesh.cp, OUTSIDE_IP, APP_PORT)
        yield Cluster(mesh, payments, httpbin, outside_log)


def _call(cluster: Cluster, source: Pod, host: str, **request: object) -> dict[str, object]:
    """The app in `source` calls host:8080 over plain HTTP; its sidecar does the rest."""
    return cluster.mesh.client(source.netns, host=host, port=APP_PORT, **request)


def _seen(answer: dict[str, object]) -> dict[str, object]:
    import json

    assert answer.get("status") == 200, answer
    return json.loads(str(answer["body"]))


# --- SVIDs for clients that are not behind our sidecar -------------------------------------------

def _svid(tmp_path: Path, uri: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
          | None = None) -> tuple[Path, Path]:
    """A client certificate naming `uri`, signed by `issuer` (default: a root of its own)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    if issuer is None:
        root_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "another mesh")])
        root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(root_key, hashes.SHA256()))
        issuer = (root, root_key)
    issuer_cert, issuer_key = issuer
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(issuer_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    stem = re.sub(r"[^a-z0-9]+", "-", uri)
    cert_path, key_path = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _our_ca(cluster: Cluster) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    certs = cluster.mesh.certs_dir
    cert = x509.load_pem_x509_certificate((certs / "ca-cert.pem").read_bytes())
    key = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _mesh_peer(cluster: Cluster, tmp_path: Path, cert: Path, key: Path, target: Pod,
               **request: object) -> dict[str, object]:
    """A client in the control plane speaking the mesh's TLS itself to `target`'s app port."""
    return cluster.mesh.client(
        cluster.mesh.cp, host=target.ip, port=APP_PORT, tls=True, cert=str(cert), key=str(key),
        ca=str(cluster.mesh.certs_dir / "root-cert.pem"),
        alpn=["istio-http/1.1", "istio"], **request)


# --- the tests -----------------------------------------------------------------------------------

def test_a_call_goes_through_both_sidecars_over_mtls_and_b_sees_a_s_identity(
        cluster: Cluster) -> None:
    payments, httpbin = cluster.payments, cluster.httpbin
    before_out = metric(cluster.mesh.prometheus(payments), "envoy_cluster_upstream_cx_total",
                        envoy_cluster_name="outbound_mtls_http")
    seen = _seen(_call(cluster, payments, httpbin.ip, path="/hello"))
    assert seen["app"] == "httpbin" and seen["path"] == "/hello"
    # The identity only B's sidecar can have put there: from A's verified client certificate.
    assert f"URI={payments.spiffe_id}" in str(seen["xfcc"]), seen
    assert f"By={httpbin.spiffe_id}" in str(seen["xfcc"]), seen
    # B's app was reached by its own sidecar (inbound passthrough source), not by A directly.
    assert seen["peer"] == "127.0.0.6"
    after_out = metric(cluster.mesh.prometheus(payments), "envoy_cluster_upstream_cx_total",
                       envoy_cluster_name="outbound_mtls_http")
    assert after_out == before_out + 1
    inbound = cluster.mesh.prometheus(httpbin)
    assert metric(inbound, "envoy_listener_ssl_handshake",
                  envoy_listener_address="0.0.0.0_15006") >= 1


def test_tcp_that_is_not_http_goes_over_mtls_as_tcp(cluster: Cluster) -> None:
    payments, httpbin = cluster.payments, cluster.httpbin

    def mtls_tcp_connections() -> float:
        return metric(cluster.mesh.prometheus(httpbin), "envoy_tcp_downstream_cx_total",
                      envoy_tcp_prefix="inbound_mtls_tcp")

    before = mtls_tcp_connections()
    # A server-first protocol: the outbound side's protocol sniffing gives up waiting for the
    # client's first bytes and proxies it as TCP.
    answer = cluster.mesh.client(payments.netns, host=httpbin.ip, port=ECHO_PORT, line="ping")
    assert answer.get("received") == ["banner httpbin", "echo ping"], answer
    assert mtls_tcp_connections() == before + 1
    # Plain TCP from outside the mesh passes in PERMISSIVE mode.
    plain = cluster.mesh.client(cluster.mesh.cp, host=httpbin.ip, port=ECHO_PORT, line="plain")
    assert plain.get("received") == ["banner httpbin", "echo plain"], plain
    assert mtls_tcp_connections() == before + 1


def test_ipv6_calls_go_over_mtls_too(cluster: Cluster) -> None:
    payments, httpbin = cluster.payments, cluster.httpbin
    seen = _seen(_call(cluster, payments, httpbin.ip6, path="/over-ipv6"))
    assert f"URI={payments.spiffe_id}" in str(seen["xfcc"]), seen
    assert seen["peer"] == "::6"  # the sidecar's IPv6 inbound passthrough address


def test_the_certificates_land_in_the_volumes_owned_by_the_proxy(cluster: Cluster) -> None:
    certs = cluster.payments.volumes["workload-certs"]
    key = certs / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.stat().st_uid == 1337
    leaf = x509.load_pem_x509_certificate((certs / "cert-chain.pem").read_bytes())
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [cluster.payments.spiffe_id]
    assert (certs / "root-cert.pem").read_text() == cluster.mesh.ca_root_pem
    bootstrap = cluster.payments.volumes["istio-envoy"] / "envoy-rev.json"
    assert bootstrap.exists()


def test_a_client_with_an_svid_of_our_trust_domain_is_accepted(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    # The control for the two refusals below: same client, an SVID that is in the trust domain.
    cert, key = _svid(tmp_path, "spiffe://cluster.local/ns/demo/sa/tester", _our_ca(cluster))
    answer = _mesh_peer(cluster, tmp_path, cert, key, cluster.httpbin, path="/from-tester")
    seen = _seen(answer)
    assert "URI=spiffe://cluster.local/ns/demo/sa/tester" in str(seen["xfcc"])


@pytest.mark.parametrize("issuer", ["another-root", "our-root"])
def test_a_client_from_another_trust_domain_is_refused(cluster: Cluster, tmp_path: Path,
                                                       issuer: str) -> None:
    # Another mesh's root, or our own root but a SPIFFE ID outside our trust domain.
    signer = None if issuer == "another-root" else _our_ca(cluster)
    cert, key = _svid(tmp_path, "spiffe://other.local/ns/demo/sa/intruder", signer)
    path = f"/intruder-{issuer}"
    answer = _mesh_peer(cluster, tmp_path, cert, key, cluster.httpbin, path=path)
    assert answer.get("status") != 200, answer
    assert "error" in answer or answer.get("status") is None, answer
    assert not [seen for seen in cluster.httpbin.app_requests() if seen["path"] == path]


def test_a_destination_outside_the_mesh_cidrs_is_reached_in_plaintext(cluster: Cluster) -> None:
    seen = _seen(_call(cluster, cluster.payments, OUTSIDE_IP, path="/outside"))
    # The outside server speaks plain HTTP only: an answer at all means no TLS was sent to it.
    assert seen["app"] == "outside" and seen["xfcc"] is None
    assert seen["peer"] == cluster.payments.ip  # from the pod itself, passed through


def test_plaintext_in_permissive_mode_passes_without_a_forged_identity(cluster: Cluster) -> None:
    forged = "By=spiffe://cluster.local/ns/demo/sa/default;URI=spiffe://cluster.local/ns/x/sa/admin"
    answer = cluster.mesh.client(cluster.mesh.cp, host=cluster.httpbin.ip, port=APP_PORT,
                                 path="/plain", headers={"x-forwarded-client-cert": forged})
    seen = _seen(answer)
    assert seen["path"] == "/plain" and seen["xfcc"] is None


def test_a_renewed_certificate_is_served_without_restarting_envoy(cluster: Cluster,
                                                                  tmp_path: Path) -> None:
    httpbin = cluster.httpbin
    envoy_pid = httpbin.envoy_pid()
    assert envoy_pid is not None
    cert, key = _svid(tmp_path, "spiffe://cluster.local/ns/demo/sa/tester", _our_ca(cluster))

    def served_serial() -> int:
        answer = _mesh_peer(cluster, tmp_path, cert, key, httpbin, path="/serial")
        assert answer.get("status") == 200, answer
        der = bytes.fromhex(str(answer["peer_cert_der"]))
        return x509.load_der_x509_certificate(der).serial_number

    first = served_serial()
    deadline = time.monotonic() + 4 * SHORT_TTL_SECONDS
    serials = {first}
    while len(serials) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        serials.add(served_serial())
    assert len(serials) >= 3, f"the served certificate did not change: {serials}"
    assert httpbin.envoy_pid() == envoy_pid, "Envoy was restarted"
    on_disk = x509.load_pem_x509_certificate(
        (httpbin.volumes["workload-certs"] / "cert-chain.pem").read_bytes()).serial_number
    assert on_disk != first


def test_strict_mode_and_an_agent_that_starts_before_its_ca(cluster: Cluster) -> None:
    mesh = cluster.mesh
    reviews = mesh.add_pod("reviews", mesh.inject(EXAMPLES / "deployment.yaml",
                                                  ca_port=LATE_CA_PORT, mtls_mode="STRICT",
                                                  native_sidecars=True))
    init_containers = [c["name"] for c in reviews.spec["spec"]["initContainers"]]
    assert init_containers[:2] == ["istio-init", "istio-proxy"]  # a native sidecar
    mesh.run_init(reviews)
    proxy = mesh.start_proxy(reviews)
    time.sleep(2)
    assert proxy.alive(), proxy.log()
    assert not mesh.probe_ready(reviews), "ready without a certificate"
    assert f"{CA_IP}:{LATE_CA_PORT}" in proxy.log() and "unreachable" in proxy.log()
    late_ca = mesh.start_ca(LATE_CA_PORT)
    try:
        mesh.wait_ready(reviews, timeout=25)
    finally:
        late_ca.stop()
    mesh.start_app(reviews)
    mesh.wait_listening(reviews.netns, reviews.ip, APP_PORT)
    # Mesh traffic works; plaintext to a STRICT pod is refused and never reaches its app.
    seen = _seen(_call(cluster, cluster.payments, reviews.ip, path="/strict"))
    assert f"URI={cluster.payments.spiffe_id}" in str(seen["xfcc"])
    plain = mesh.client(mesh.cp, host=reviews.ip, port=APP_PORT, path="/plain-to-strict")
    assert plain.get("status") != 200, plain
    assert not [seen for seen in reviews.app_requests() if seen["path"] == "/plain-to-strict"]


PROBED_POD = """
apiVersion: v1
kind: Pod
metadata: {name: probed, namespace: demo}
spec:
  containers:
    - name: web
      image: shop:1
      ports: [{name: http, containerPort: 8080}]
      livenessProbe: {httpGet: {path: /live, port: http}, timeoutSeconds: 2}
      readinessProbe: {tcpSocket: {port: 8080}}
      startupProbe: {tcpSocket: {port: 8089}}  # nothing listens there
"""


def test_rewritten_probes_pass_strict_mtls_from_the_node_where_direct_ones_cannot(
    cluster: Cluster, tmp_path: Path
) -> None:
    mesh = cluster.mesh
    manifest = tmp_path / "probed.yaml"
    manifest.write_text(PROBED_POD)
    probed = mesh.add_pod("probed", mesh.inject(manifest, mtls_mode="STRICT"))
    web = probed.container("web")
    assert web["livenessProbe"]["httpGet"] == {"path": "/app-health/web/livez", "port": 15020}
    mesh.run_init(probed)
    mesh.start_proxy(probed)
    mesh.wait_ready(probed)
    app = mesh.start_app(probed)
    mesh.wait_listening(probed.netns, probed.ip, APP_PORT)

    def kubelet(probe: str) -> dict[str, object]:
        """The rewritten probe as kubelet sends it: from the node's side, to the pod's IP."""
        action = web[probe]["httpGet"]
        return mesh.client(mesh.cp, host=probed.ip, port=action["port"], path=action["path"],
                           headers={"user-agent": "kube-probe/1.34"})

    # The agent ran the original probe against the app, past the STRICT inbound listener.
    assert kubelet("livenessProbe").get("status") == 200
    live = [seen for seen in probed.app_requests() if seen["path"] == "/live"]
    assert live and live[-1]["peer"] == "127.0.0.1"
    assert kubelet("readinessProbe").get("status") == 200
    assert kubelet("startupProbe").get("status") == 503
    # The original probe sent straight to the app's port, as kubelet would without rewriting:
    # STRICT refuses plaintext, and the app never sees it.
    direct = mesh.client(mesh.cp, host=probed.ip, port=APP_PORT, path="/live-direct")
    assert direct.get("status") != 200, direct
    assert not [seen for seen in probed.app_requests() if seen["path"] == "/live-direct"]
    # An app that stops answering fails its rewritten probes.
    app.stop()
    assert kubelet("livenessProbe").get("status") == 503
    assert kubelet("readinessProbe").get("status") == 503


def test_sigterm_drains_and_exits_zero(cluster: Cluster) -> None:
    # Last in the file: it stops payments' sidecar.
    proxy = cluster.payments.proxy
    assert proxy is not None and proxy.alive()
    started = time.monotonic()
    assert proxy.stop(timeout=30) == 0, proxy.log()[-3000:]
    assert time.monotonic() - started < 30
