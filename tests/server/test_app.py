"""The webhook through the real HTTPS server, as kube-apiserver calls it."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest

from tests.support.pods import pod, replicaset_pod, review
from tests.support.servers import Server

KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")


def admit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    reply = client.post("/inject", json=body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["apiVersion"] == body["apiVersion"]
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == body["request"]["uid"]
    return answer["response"]


def kubectl_patch(obj: dict[str, Any], ops: list[dict[str, Any]], workdir: Path) -> dict:
    """The patch applied by kubectl, which uses the API server's RFC 6902 implementation."""
    manifest = workdir / "pod.json"
    manifest.write_text(json.dumps(obj))
    done = subprocess.run(
        [KUBECTL, "patch", "--local", "-f", str(manifest), "--type=json",
         "-p", json.dumps(ops), "-o", "json"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


INJECTED_PODS = {
    "minimal": pod(),
    "replicaset": replicaset_pod(),
    "labels-with-slashes": pod(labels={"app.kubernetes.io/name": "shop", "team~x": "a"},
                               annotations={"example.com/owner": "payments"}),
    "own-init-and-volumes": pod(
        init_containers=[{"name": "migrate", "image": "flyway:10"}],
        volumes=[{"name": "config", "configMap": {"name": "shop"}}],
    ),
    "native": pod(annotations={"sidecar.istio.io/nativeSidecar": "true"},
                  init_containers=[{"name": "migrate", "image": "flyway:10"}]),
    "hold": pod(annotations={"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}),
    "overrides": pod(annotations={
        "sidecar.istio.io/proxyCPU": "50m",
        "sidecar.istio.io/proxyMemoryLimit": "256Mi",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9100",
    }),
}


@pytest.mark.parametrize("api_version", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
@pytest.mark.parametrize("name", sorted(INJECTED_PODS))
def test_injected_pods_patch_identically_and_validate(
    client: httpx.Client, tmp_path: Path, name: str, api_version: str
) -> None:
    original = INJECTED_PODS[name]
    response = admit(client, review(original, api_version=api_version))
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    injected = jsonpatch.apply_patch(original, ops)
    assert kubectl_patch(original, ops, tmp_path) == injected
    kubernetes_validate.validate(injected, "1.33", strict=True)
    # The pod's own containers, init containers and volumes keep their content and order.
    spec, own = injected["spec"], original["spec"]
    proxy_first = name == "hold"
    own_init = own.get("initContainers", [])
    if name == "native":
        assert [c["name"] for c in spec["initContainers"][:2]] == ["istio-init", "istio-proxy"]
        assert spec["initContainers"][2:] == own_init
        assert spec["containers"] == own["containers"]
    else:
        app_containers = spec["containers"][1:] if proxy_first else spec["containers"][:-1]
        assert app_containers == own["containers"]
        assert spec["initContainers"][:-1] == own_init
        assert spec["initContainers"][-1]["name"] == "istio-init"
        assert spec["containers"][0 if proxy_first else -1]["name"] == "istio-proxy"
    assert spec["volumes"][: len(own.get("volumes", []))] == own.get("volumes", [])
    # Sent again, as on reinvocation, the injected pod gets no patch.
    again = admit(client, review(injected, api_version=api_version))
    assert again["allowed"] is True
    assert "patch" not in again and "patchType" not in again


@pytest.mark.parametrize(
    ("obj", "namespace"),
    [
        (pod(labels={"sidecar.istio.io/inject": "false"}), "shop"),
        (pod(annotations={"sidecar.istio.io/inject": "false"}), "shop"),
        (pod(hostNetwork=True), "shop"),
        (pod(), "kube-system"),
        (pod(), "mesh-system"),
    ],
)
def test_skipped_pods_are_allowed_unchanged(
    client: httpx.Client, obj: dict[str, Any], namespace: str
) -> None:
    response = admit(client, review(obj, namespace=namespace))
    assert response["allowed"] is True
    assert "patch" not in response


def test_an_object_that_is_not_a_pod_is_allowed_unchanged(client: httpx.Client) -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                  "spec": {"template": pod()}}
    response = admit(client, review(deployment, kind="Deployment"))
    assert response == {"uid": response["uid"], "allowed": True}


def test_a_pod_with_a_generate_name_only_is_injected(client: httpx.Client) -> None:
    unnamed = replicaset_pod()
    assert "name" not in unnamed["metadata"]
    response = admit(client, review(unnamed))
    ops = json.loads(base64.b64decode(response["patch"]))
    injected = jsonpatch.apply_patch(unnamed, ops)
    assert injected["metadata"]["labels"]["service.istio.io/canonical-name"] == "reviews"


def test_a_malformed_override_refuses_the_pod_naming_the_annotation(client: httpx.Client) -> None:
    bad = pod(annotations={"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40"})
    response = admit(client, review(bad))
    assert response["allowed"] is False
    assert "patch" not in response
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in response["status"]["message"]
    assert response["status"]["code"] == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"kind": "Pod", "apiVersion": "v1"}', "not an AdmissionReview"),
        (b'["AdmissionReview"]', "not an AdmissionReview"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
         "no request"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"object": pod()}}).encode(), "no uid"),
        (json.dumps({"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview",
                     "request": {"uid": "x"}}).encode(), "apiVersion"),
    ],
)
def test_bad_bodies_get_400_with_a_json_error(
    client: httpx.Client, body: bytes, message: str
) -> None:
    reply = client.post("/inject", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert message in reply.json()["error"]


def test_a_body_over_8_mib_gets_413(client: httpx.Client) -> None:
    big = review(pod(annotations={"filler": "x" * (8 * 1024 * 1024)}))
    reply = client.post("/inject", content=json.dumps(big).encode())
    assert reply.status_code == 413
    assert "error" in reply.json()


def test_a_body_of_more_json_values_than_a_pod_can_hold_gets_413_before_parsing(
        client: httpx.Client) -> None:
    # 8 MiB of 1,000-deep objects: orjson took 0.9 s and 380 MB to parse it, /healthz waiting.
    deep = '{"a":' * 1000 + '"leaf"' + "}" * 1000
    body = json.dumps(review(pod(nested=["@"] * 1300))).replace('"@"', deep).encode()
    assert len(body) < 8 * 1024 * 1024
    reply = client.post("/inject", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert "100000 JSON values" in reply.json()["error"]
    metrics = client.get("/metrics").text
    assert 'injector_admission_requests_total{reason="too-complex",result="rejected"} 1.0' in (
        metrics)
    # A big pod of ordinary shape is parsed and injected all the same.
    env = [{"name": f"VAR_{index}", "value": "x" * 40} for index in range(5000)]
    big = pod(containers=[{"name": "app", "image": "nginx", "env": env}])
    assert admit(client, review(big))["allowed"] is True


def test_a_pod_that_is_not_shaped_like_a_pod_is_refused_not_crashed(client: httpx.Client) -> None:
    broken = copy.deepcopy(pod())
    broken["spec"]["containers"] = "app"
    response = admit(client, review(broken))
    assert response["allowed"] is False
    assert "spec.containers" in response["status"]["message"]


def test_unknown_paths_and_methods_answer_json(client: httpx.Client) -> None:
    assert client.get("/inject").status_code == 405
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and "error" in missing.json()


def test_health_readiness_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    admit(client, review(pod()))
    admit(client, review(pod(labels={"sidecar.istio.io/inject": "false"})))
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'injector_admission_requests_total{reason="namespace-enabled",result="injected"}' in text
    assert 'injector_admission_requests_total{reason="pod-label-false",result="skipped"}' in text
    assert 'injector_injection_duration_seconds_bucket{le="0.0001"}' in text


def test_the_serving_certificate_verifies_against_the_root_for_its_names(server: Server) -> None:
    for host in ("127.0.0.1", "localhost"):
        with httpx.Client(verify=server.ssl_context(), timeout=10) as https:
            assert https.get(f"https://{host}:{server.port}/healthz").status_code == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_below_1_2_is_refused(server: Server) -> None:
    def handshake(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
             "-CAfile", str(server.root_cert), *flags],
            input="", capture_output=True, text=True, timeout=20, check=False,
        )

    assert "New, TLSv1.2, Cipher is ECDHE" in handshake("-tls1_2").stdout
    assert "New, TLSv1.3, Cipher is" in handshake("-tls1_3").stdout
    # SECLEVEL=0 lets this client offer TLS 1.1 at all: the refusal must come from the server.
    old = handshake("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "Cipher is (NONE)" in old.stdout
