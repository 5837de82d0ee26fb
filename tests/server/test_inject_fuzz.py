"""Fuzzing: whatever arrives, a well-formed answer or a clear error; never a 5xx or a crash."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector.commands.cli import main
from tests.support.pods import pod, replicaset_pod, review
from tests.support.servers import Server

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=30) | st.sampled_from(["", "true", "false", "∞", "\x00",
                                                          "istio-proxy", "x" * 5000]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
ANNOTATIONS = ["sidecar.istio.io/inject", "sidecar.istio.io/proxyCPU",
               "sidecar.istio.io/nativeSidecar", "proxy.istio.io/config",
               "traffic.sidecar.istio.io/includeInboundPorts",
               "traffic.sidecar.istio.io/excludeOutboundIPRanges", "sidecar.istio.io/status",
               "prometheus.io/port", "kubectl.kubernetes.io/default-container"]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document, for mutation."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


@st.composite
def mutated_reviews(draw: st.DrawFn) -> dict[str, Any]:
    base = draw(st.sampled_from([pod(), replicaset_pod(), pod(init_containers=[
        {"name": "init", "image": "busybox"}], volumes=[{"name": "data", "emptyDir": {}}])]))
    body = review(copy.deepcopy(base), api_version=draw(st.sampled_from(
        ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])))
    annotations = draw(st.dictionaries(st.sampled_from(ANNOTATIONS), st.text(max_size=40),
                                       max_size=3))
    body["request"]["object"]["metadata"].setdefault("annotations", {}).update(annotations)
    for _ in range(draw(st.integers(0, 3))):
        candidates = [p for p in paths(body["request"]) if p]
        where = draw(st.sampled_from(candidates))
        parent = body["request"]
        for step in where[:-1]:
            parent = parent[step]
        if draw(st.booleans()):
            parent[where[-1]] = draw(json_values)
        elif isinstance(parent, dict):
            del parent[where[-1]]
    if draw(st.booleans()):
        # Duplicate container names, as a broken controller might send.
        containers = body["request"].get("object", {})
        containers = containers.get("spec", {}) if isinstance(containers, dict) else {}
        if isinstance(containers, dict) and isinstance(containers.get("containers"), list):
            containers["containers"] = containers["containers"] * 2
    return body


def check_answer(sent: dict[str, Any], reply: httpx.Response) -> None:
    assert reply.status_code in (200, 400), reply.text
    if reply.status_code == 400:
        assert isinstance(reply.json()["error"], str)
        return
    answer = reply.json()
    assert answer["kind"] == "AdmissionReview"
    assert answer["apiVersion"] == sent["apiVersion"]
    response = answer["response"]
    assert response["uid"] == sent["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert "patch" not in response and response["status"]["message"]
    if "patch" in response:
        original = sent["request"]["object"]
        patched = jsonpatch.apply_patch(original, json.loads(base64.b64decode(response["patch"])))
        if not (isinstance(original, dict) and original.get("apiVersion") == "v1"
                and original.get("kind") == "Pod"):
            return
        try:
            kubernetes_validate.validate(original, "1.33", strict=True)
        except kubernetes_validate.ValidationError:
            return  # it was invalid before: the API server refuses it either way
        kubernetes_validate.validate(patched, "1.33", strict=True)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=mutated_reviews())
def test_mutated_reviews_get_well_formed_answers(client: httpx.Client,
                                                 body: dict[str, Any]) -> None:
    check_answer(body, client.post("/inject", json=body))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=json_values)
def test_any_json_gets_an_answer_or_400(client: httpx.Client, document: Any) -> None:
    reply = client.post("/inject", json=document)
    assert reply.status_code in (200, 400), reply.text
    if reply.status_code == 400:
        assert isinstance(reply.json()["error"], str)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300))
def test_any_bytes_get_an_answer_or_400(client: httpx.Client, raw: bytes) -> None:
    reply = client.post("/inject", content=raw)
    assert reply.status_code in (200, 400), reply.text


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting_and_huge_strings(client: httpx.Client, depth: int) -> None:
    nested: Any = "bottom"
    for _ in range(depth):
        nested = {"a": [nested]}
    body = review(pod(annotations={"deep": "x" * 1_000_000}))
    body["request"]["object"]["metadata"]["labels"] = {"nested": "ok"}
    body["request"]["object"]["spec"]["extra"] = nested
    reply = client.post("/inject", content=json.dumps(body).encode() if depth < 1000 else
                        b'{"a":' * depth + b"1" + b"}" * depth)
    assert reply.status_code in (200, 400)


def test_the_server_survived(server: Server, client: httpx.Client) -> None:
    assert server.process.poll() is None
    assert client.get("/healthz").status_code == 200


yaml_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["kind: Pod", "kind: Deployment", "kind: List", "items:",
                              "- kind: Pod", "spec:", "  template:", "    spec:",
                              "      containers: [{name: a}]", "metadata:", "  name: x",
                              "  annotations: {sidecar.istio.io/proxyCPU: lots}",
                              "---", "{", "]", "  - 1", ": :", "\t"]),
             max_size=12).map("\n".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=yaml_text)
def test_kube_inject_on_random_yaml_exits_0_or_2(tmp_path_factory: pytest.TempPathFactory,
                                                text: str) -> None:
    manifest = Path(tmp_path_factory.mktemp("fuzz")) / "in.yaml"
    manifest.write_text(text)
    out = manifest.with_name("out.yaml")
    assert main(["kube-inject", "-f", str(manifest), "-o", str(out)]) in (0, 2)
