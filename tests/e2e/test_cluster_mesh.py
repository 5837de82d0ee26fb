"""The whole path, through the real kube-apiserver: two pods created with kubectl in a labelled
namespace, injected by the webhook the API server called, taken back as stored (`kubectl get -o
json`) and run as written by the network-namespace harness (tests/e2e/mesh.py: istio-init, then
the agent and Envoy); each agent authenticates to the CA with a TokenRequest token bound to its
pod, reviewed by the real API server; one app calls the other over mTLS and the callee sees the
caller's SPIFFE ID.

The API server, etcd and `injector serve` run on the host's loopback (as in the other cluster
tests); the pods reach the CA at the harness's control-plane address, where a small forwarder
of ours listens inside the control-plane namespace and relays to the injector on loopback. The
host's network namespace is not changed: the forwarder only holds a socket in the other one.

Needs root and what tests/e2e/test_mesh.py needs; skipped with the reason otherwise (CI runs as
root, where a skip fails).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import mesh as harness
from tests.e2e.mesh import APP_PORT, CA_IP, CA_PORT, EXAMPLES, Pod
from tests.support.cluster import Cluster, Mesh, install_mesh, start_cluster
from tests.support.eventually import eventually

_MISSING = harness.missing_prerequisite()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

AUDIENCE = "istio-ca"

# Relays TCP from an address inside a network namespace to a port on the host's loopback:
# the listening socket is made inside the namespace (setns on this thread, then back), every
# connection is relayed from here, in the host's namespace.
FORWARDER = r"""
import ctypes, os, socket, sys, threading
netns, host, port, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
def enter(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
home = os.open("/proc/self/ns/net", os.O_RDONLY)
enter(os.open(f"/var/run/netns/{netns}", os.O_RDONLY))
listener = socket.create_server((host, port), backlog=64)
enter(home)
print("listening", flush=True)
def relay(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(client):
    try:
        upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    other = threading.Thread(target=relay, args=(client, upstream), daemon=True)
    other.start()
    relay(upstream, client)
    other.join()
    client.close()
    upstream.close()
while True:
    connection, _ = listener.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
"""


@dataclass
class Capstone:
    cluster: Cluster
    mesh: Mesh
    net: harness.Mesh
    namespace: str
    caller: Pod
    callee: Pod


def _manifest(path: Path, name: str, service_account: str) -> dict[str, Any]:
    """An example pod for a cluster without a kubelet to mount API credentials: its own name and
    ServiceAccount, and no automounted API token (the harness mounts what the sidecar needs)."""
    manifest: dict[str, Any] = yaml.safe_load(path.read_text())
    manifest["metadata"] = {"name": name, "labels": manifest["metadata"].get("labels") or {},
                            "annotations": manifest["metadata"].get("annotations") or {}}
    manifest["spec"]["serviceAccountName"] = service_account
    manifest["spec"]["automountServiceAccountToken"] = False
    return manifest


@pytest.fixture(scope="module")
def capstone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capstone]:
    workdir = tmp_path_factory.mktemp("capstone")
    cluster = start_cluster(workdir / "cluster")
    forwarder: subprocess.Popen[str] | None = None
    try:
        (workdir / "net").mkdir()
        with harness.Mesh(workdir / "net") as net:
            # The sidecars find the CA at the control plane's address, inside the mesh CIDRs.
            config = net.mesh_config(ca_port=CA_PORT)
            mesh = install_mesh(cluster, workdir / "mesh", config=config,
                                serve_args=("--dns-name", CA_IP))
            assert mesh.injector is not None
            net.certs_dir = mesh.injector.certs_dir  # the root the pods' ConfigMap volume holds
            forwarder = subprocess.Popen(
                [sys.executable, "-c", FORWARDER, net.cp, CA_IP, str(CA_PORT), str(mesh.port)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert forwarder.stdout is not None
            assert forwarder.stdout.readline().strip() == "listening", forwarder.stdout.read()

            namespace = cluster.namespace("capstone", {"istio-injection": "enabled"})
            pods = {}
            for name, example, account in (("caller", "annotated-pod.yaml", "payments"),
                                           ("callee", "pod.yaml", "httpbin")):
                cluster.service_account(namespace, account)
                cluster.create_pod(namespace, _manifest(EXAMPLES / example, name, account))
                stored = cluster.get("pod", name, "-n", namespace)
                pod = net.add_pod(name, stored)
                net.run_init(pod)
                token = cluster.token(namespace, account, audience=AUDIENCE, bound_pod=name,
                                      seconds=3600)
                net.start_proxy(pod, token=token)
                pods[name] = pod
            for pod in pods.values():
                if "postStart" in (pod.container("istio-proxy").get("lifecycle") or {}):
                    hook = net.post_start(pod)
                    assert hook.returncode == 0, hook.stderr
                net.wait_ready(pod)
                net.start_app(pod)
                net.wait_listening(pod.netns, pod.ip, APP_PORT)
            yield Capstone(cluster, mesh, net, namespace, pods["caller"], pods["callee"])
            mesh.stop_injector()
    finally:
        if forwarder is not None:
            forwarder.terminate()
            forwarder.wait(timeout=10)
        cluster.stop()


def test_pods_stored_by_the_api_server_run_and_talk_mtls_with_their_identities(
        capstone: Capstone) -> None:
    caller, callee = capstone.caller, capstone.callee
    for pod in (caller, callee):
        assert pod.spec["metadata"]["uid"]  # as stored by the API server, not as written
        assert "sidecar.istio.io/status" in pod.spec["metadata"]["annotations"]
    assert caller.spiffe_id == f"spiffe://cluster.local/ns/{capstone.namespace}/sa/payments"

    def called() -> dict[str, Any] | None:
        answer = capstone.net.client(caller.netns, host=callee.ip, port=APP_PORT, path="/hello")
        return answer if answer.get("status") == 200 else None

    answer = eventually(called, 30, interval=0.5, what="the caller's request answered")
    seen = json.loads(answer["body"])
    assert seen["app"] == "callee" and seen["path"] == "/hello"
    # The callee's Envoy saw the caller's certificate: its SVID, from our CA, for its pod's
    # TokenReview-verified identity.
    assert f"URI={caller.spiffe_id}" in str(seen["xfcc"]), seen
    assert f"By={callee.spiffe_id}" in str(seen["xfcc"]), seen
    # Both SVIDs were issued on tokens the real API server reviewed.
    assert capstone.mesh.injector is not None
    issued = [re.search(r"spiffe_id=(\S+) .*authenticator=(\S+)", json.loads(line)["msg"])
              for line in capstone.mesh.injector.log().splitlines()
              if line.startswith("{") and "issued SVID" in line]
    assert {(found[1], found[2]) for found in issued if found} >= {
        (caller.spiffe_id, "tokenreview"), (callee.spiffe_id, "tokenreview")}
