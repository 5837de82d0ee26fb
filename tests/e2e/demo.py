"""`make demo`: an offline mesh on this machine, and a call through it, told step by step.

As root, with no cluster: a control-plane network namespace runs `injector serve` (the webhook
and the CA, with a static token file); two pod namespaces are wired to it with veth pairs. Each
pod is a manifest from examples/ sent through the running webhook; its `istio-init` and
`istio-proxy` containers then run exactly as the webhook wrote them (see tests/e2e/mesh.py), next
to a tiny HTTP app. Pod A's app calls pod B's IP in plain HTTP; the transcript shows the call
leaving through A's Envoy as mTLS with A's SPIFFE certificate, entering through B's Envoy, and
B's app seeing A's SPIFFE ID. Everything is removed at the end, also on Ctrl-C or SIGTERM.

    sudo make demo        # or: sudo .venv/bin/python -m tests.e2e.demo
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from tests.e2e import mesh as harness
from tests.e2e.mesh import APP_PORT, CA_IP, CA_PORT, EXAMPLES, Mesh, Pod, metric

POD_A = EXAMPLES / "annotated-pod.yaml"  # payments, namespace default
POD_B = EXAMPLES / "pod.yaml"  # httpbin, namespace demo


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n== {text}")


def _svid_summary(pod: Pod) -> str:
    """What the agent put into the pod's certificate volume."""
    from cryptography import x509

    certs = pod.volumes["workload-certs"]
    leaf = x509.load_pem_x509_certificate((certs / "cert-chain.pem").read_bytes())
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    life = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    key_mode = oct((certs / "key.pem").stat().st_mode & 0o777)
    return (f"SVID {', '.join(uris)} (serial {leaf.serial_number:x}, valid {life.days}d "
            f"{life.seconds // 3600}h more), key.pem mode {key_mode}")


def _counters(mesh: Mesh, pod: Pod) -> dict[str, float]:
    text = mesh.prometheus(pod)
    return {
        "outbound mTLS connections": metric(text, "envoy_cluster_upstream_cx_total",
                                            envoy_cluster_name="outbound_mtls_http"),
        "outbound TLS handshakes": metric(text, "envoy_cluster_ssl_handshake",
                                          envoy_cluster_name="outbound_mtls_http"),
        "inbound TLS handshakes": metric(text, "envoy_listener_ssl_handshake",
                                         envoy_listener_address="0.0.0.0_15006"),
        "inbound mTLS HTTP requests": metric(text, "envoy_http_downstream_rq_total",
                                             envoy_http_conn_manager_prefix="inbound_mtls_http"),
    }


def _show_pod(name: str, response: dict[str, Any], pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    proxy = next(c for c in [*spec.get("initContainers", ()), *spec["containers"]]
                 if c["name"] == "istio-proxy")
    init = next(c for c in spec["initContainers"] if c["name"] == "istio-init")
    say(f"   {name}: allowed={response['allowed']}, patchType={response.get('patchType')}")
    say(f"   initContainers: {[c['name'] for c in spec.get('initContainers', ())]}")
    say(f"   containers:     {[c['name'] for c in spec['containers']]}")
    say(f"   istio-init:  {shlex.join(init['command'] + init['args'])}")
    say(f"   istio-proxy: {shlex.join(proxy['command'] + proxy['args'])}  "
        f"(uid {proxy['securityContext']['runAsUser']}, read-only root filesystem)")
    plain_env = {e["name"]: e["value"] for e in proxy["env"] if "value" in e}
    say(f"   istio-proxy env: {plain_env}")


def demo(workdir: Path) -> int:
    with harness.Mesh(workdir) as mesh:
        step(f"control plane: network namespace {mesh.cp}")
        for manifest in (POD_A, POD_B):
            mesh.token_for(yaml.safe_load(manifest.read_text()))
        say(f"   static CA tokens for the pods' service accounts in {mesh.token_file.name}")
        mesh.start_ca()
        say(f"   injector serve: webhook and CA on https://{CA_IP}:{CA_PORT}")

        pods: list[Pod] = []
        for label, manifest in (("A", POD_A), ("B", POD_B)):
            step(f"pod {label}: {manifest.relative_to(harness.REPO)} through POST /inject")
            response, injected = mesh.admit(manifest)
            _show_pod(injected["metadata"]["name"], response, injected)
            pod = mesh.add_pod(injected["metadata"]["name"], injected)
            say(f"   network namespace {pod.netns}, pod IP {pod.ip}")
            pods.append(pod)
        pod_a, pod_b = pods

        for pod in pods:
            step(f"{pod.name}: istio-init, then istio-proxy")
            mesh.run_init(pod)
            say("   istio-init: iptables REDIRECT rules applied "
                "(outbound -> 15001, inbound -> 15006, uid 1337 exempt)")
            mesh.start_proxy(pod)
            if "lifecycle" in pod.container("istio-proxy"):
                hook = mesh.post_start(pod)
                say(f"   postStart `injector agent wait`: {hook.stdout.strip() or hook.stderr}")
            mesh.wait_ready(pod)
            say(f"   agent: {_svid_summary(pod)}")
            say(f"   GET {pod.ip}:15021/healthz/ready -> 200")
            mesh.start_app(pod)
            mesh.wait_listening(pod.netns, pod.ip, APP_PORT)
            say(f"   app: HTTP on :{APP_PORT}")

        before_a, before_b = _counters(mesh, pod_a), _counters(mesh, pod_b)
        url = f"http://{pod_b.ip}:{APP_PORT}/hello"
        step(f"the app in {pod_a.name}: GET {url} (plain HTTP, as any app)")
        answer = mesh.client(pod_a.netns, host=pod_b.ip, port=APP_PORT, path="/hello")
        if answer.get("status") != 200:
            say(f"   the call failed: {answer}")
            return 1
        seen = json.loads(answer["body"])
        say(f"   HTTP {answer['status']}; the app in {pod_b.name} answered with what it saw:")
        say(f"   {json.dumps(seen, indent=2)}".replace("\n", "\n   "))

        after_a, after_b = _counters(mesh, pod_a), _counters(mesh, pod_b)
        step("through both Envoys, over mTLS")
        for who, before, after, keys in (
                (pod_a.name, before_a, after_a,
                 ("outbound mTLS connections", "outbound TLS handshakes")),
                (pod_b.name, before_b, after_b,
                 ("inbound TLS handshakes", "inbound mTLS HTTP requests"))):
            for key in keys:
                say(f"   {who} Envoy: {key}: {before[key]:.0f} -> {after[key]:.0f}")
        xfcc = str(seen.get("xfcc"))
        fields = dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part)
        say(f"   the app in {pod_b.name} was called from {seen['peer']} (its own sidecar's "
            "inbound passthrough address)")
        say(f"   x-forwarded-client-cert: By={fields.get('By')}")
        say(f"                            URI={fields.get('URI')}")
        ok = (fields.get("URI") == pod_a.spiffe_id and fields.get("By") == pod_b.spiffe_id
              and after_a["outbound mTLS connections"] > before_a["outbound mTLS connections"]
              and after_b["inbound TLS handshakes"] > before_b["inbound TLS handshakes"])
        if ok:
            say(f"\nthe app in {pod_b.name} saw the SPIFFE ID of {pod_a.name}, "
                f"{pod_a.spiffe_id}, verified by mTLS between the two sidecars.")
        else:
            say("\nunexpected: the call did not carry the caller's identity as it should")
        step("cleaning up")
    say("   processes stopped, network namespaces deleted")
    return 0 if ok else 1


def main() -> int:
    missing = harness.missing_prerequisite()
    if missing is not None:
        print(f"demo: {missing}", file=sys.stderr)
        return 2

    def interrupted(number: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(number).name)

    # SIGTERM unwinds like Ctrl-C: the Mesh context manager stops what it started and deletes
    # the namespaces.
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="injector-demo-") as workdir:
        try:
            status = demo(Path(workdir))
        except KeyboardInterrupt:
            print("\ninterrupted: cleaned up", file=sys.stderr)
            return 130
        except harness.MeshError as error:
            print(f"\ndemo failed: {error}", file=sys.stderr)
            return 1
    say(f"\n(done in {time.monotonic() - started:.1f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
