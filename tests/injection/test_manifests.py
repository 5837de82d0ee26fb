"""kube-inject's walking of manifests, in-process: which pod of each kind of document is
injected, Lists item by item, YAML streams document by document, and errors that name where."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from injector.injection.manifests import ManifestError, inject_document, inject_yaml
from injector.mesh.config import MeshConfig
from tests.support import mutator
from tests.support.pods import pod

MESH = MeshConfig()


def template(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"labels": labels or {"app": "shop"}},
            "spec": {"containers": [{"name": "shop", "image": "shop:1"}]}}


def workload(kind: str, api_version: str = "apps/v1", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"template": template(), **spec}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        body.setdefault("selector", {"matchLabels": {"app": "shop"}})
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": kind.lower()},
            "spec": body}


CRONJOB = {
    "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report"},
    "spec": {"schedule": "0 * * * *",
             "jobTemplate": {"spec": {"template": {**template(),
                                                   "spec": {**template()["spec"],
                                                            "restartPolicy": "OnFailure"}}}}},
}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop"},
           "spec": {"selector": {"app": "shop"}, "ports": [{"port": 80, "targetPort": 8080}]}}
JOB = workload("Job", "batch/v1")
JOB["spec"]["template"]["spec"]["restartPolicy"] = "Never"


def injected_template(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] == "Pod":
        return document
    if document["kind"] == "CronJob":
        return document["spec"]["jobTemplate"]["spec"]["template"]
    return document["spec"]["template"]


def assert_injected(pod_like: dict[str, Any]) -> None:
    spec = pod_like["spec"]
    assert spec["initContainers"][-1]["name"] == "istio-init"
    assert spec["containers"][-1]["name"] == "istio-proxy"
    assert "sidecar.istio.io/status" in pod_like["metadata"]["annotations"]


def test_every_workload_kind_in_a_multi_document_stream() -> None:
    documents = [pod(), workload("Deployment"), workload("StatefulSet", serviceName="shop"),
                 workload("DaemonSet"), workload("ReplicaSet"), JOB, CRONJOB, SERVICE]
    out = list(yaml.safe_load_all(inject_yaml(yaml.safe_dump_all(documents), MESH, "app.yaml")))
    assert [d["kind"] for d in out] == [d["kind"] for d in documents]
    for document in out[:-1]:
        assert_injected(injected_template(document))
        kubernetes_validate.validate(document, "1.33", strict=True)
    assert out[-1] == SERVICE
    deployment_labels = out[1]["spec"]["template"]["metadata"]["labels"]
    assert deployment_labels["service.istio.io/canonical-name"] == "shop"
    # Only the template changes: the workload's own fields are kept.
    assert out[1]["spec"]["selector"] == documents[1]["spec"]["selector"]


def test_replication_controllers_and_deployment_configs_are_injected() -> None:
    controller = workload("ReplicationController", "v1", selector={"app": "shop"})
    config = workload("DeploymentConfig", "apps.openshift.io/v1", replicas=1,
                      selector={"app": "shop"})
    out = list(yaml.safe_load_all(inject_yaml(yaml.safe_dump_all([controller, config]), MESH,
                                              "app.yaml")))
    for document, given in zip(out, (controller, config), strict=True):
        assert_injected(injected_template(document))
        assert document["spec"]["selector"] == given["spec"]["selector"]
        assert document["spec"]["template"]["metadata"]["labels"][
            "service.istio.io/canonical-name"] == "shop"
    kubernetes_validate.validate(out[0], "1.33", strict=True)


def test_a_list_is_injected_item_by_item() -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [workload("Deployment"), SERVICE]}
    out = inject_document(listing, MESH, "list.yaml")
    assert out["kind"] == "List"
    assert_injected(out["items"][0]["spec"]["template"])
    assert out["items"][1] == SERVICE


def test_opted_out_templates_and_injected_pods_pass_through() -> None:
    opted_out = workload("Deployment")
    opted_out["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    annotated_out = pod(annotations={"sidecar.istio.io/inject": "false"})
    already = inject_document(pod(), MESH, "pod")
    for document in (opted_out, annotated_out, already):
        assert inject_document(document, MESH, "doc") is document


@pytest.mark.parametrize("document", [None, "text", 7, ["a"], {"kind": "Deployment"},
                                      {"kind": "List", "items": "none"}, {"no": "kind"}])
def test_what_holds_no_pod_passes_through(document: Any) -> None:
    assert inject_document(document, MESH, "doc") is document


def test_the_document_read_is_left_as_it_was() -> None:
    for document in (pod(), workload("Deployment"), CRONJOB):
        before = copy.deepcopy(document)
        assert inject_document(document, MESH, "doc") != before
        assert document == before


def test_a_template_is_named_after_its_workload() -> None:
    deployment = workload("Deployment")
    deployment["metadata"]["name"] = "checkout"
    deployment["spec"]["template"]["metadata"]["labels"] = {"tier": "web"}
    labels = inject_document(deployment, MESH, "doc")["spec"]["template"]["metadata"]["labels"]
    assert labels["service.istio.io/canonical-name"] == "checkout"


def test_the_mesh_config_decides_what_is_injected() -> None:
    native = inject_document(pod(), MeshConfig(native_sidecars=True), "doc")
    assert [c["name"] for c in native["spec"]["initContainers"]] == ["istio-init", "istio-proxy"]
    ignoring = MeshConfig(ignored_namespaces=("shop",))
    assert inject_document(pod(), ignoring, "doc")["spec"] == pod()["spec"]
    # The namespace's labels are unknown offline: it counts as enabled, whatever the policy.
    assert_injected(inject_document(pod(), MeshConfig(policy="disabled"), "doc"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (yaml.safe_dump_all([SERVICE, pod(annotations={
            "traffic.sidecar.istio.io/includeInboundPorts": "http"})]),
         "app.yaml document 2 (Pod web-7d4b9c-x2x9z): annotation "
         "traffic.sidecar.istio.io/includeInboundPorts='http'"),
        (yaml.safe_dump({"kind": "List", "items": [SERVICE, {
            **workload("Deployment"), "spec": {"template": {"metadata": {}}}}]}),
         "app.yaml document 1 item 2: the Deployment's pod has no spec"),
        (yaml.safe_dump(pod(volumes=[{"name": "istio-data", "emptyDir": {}}])),
         "app.yaml document 1 (Pod web-7d4b9c-x2x9z): the pod already has volumes named "
         "istio-data"),
        ("kind: Pod\nmetadata: {name: [unclosed\n", "app.yaml line 3: "),
    ],
)
def test_an_error_names_the_document(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as refused:
        inject_yaml(text, MESH, "app.yaml")
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_an_empty_stream_stays_empty() -> None:
    assert list(yaml.safe_load_all(inject_yaml("", MESH, "empty.yaml"))) == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kind: Pod\nmetadata: [a, b]\nspec: {containers: [{name: a}]}\n",
         "the Pod's metadata must be an object"),
        ("kind: Pod\nmetadata: {annotations: {1: x}}\nspec: {containers: [{name: a}]}\n",
         "metadata.annotations must map strings to strings"),
        ("kind: Pod\nmetadata: {name: {a: 1}}\nspec: {containers: [{name: a}]}\n",
         "metadata.name must be a string"),
        ("kind: Pod\nmetadata: {namespace: [a]}\nspec: {containers: [{name: a}]}\n",
         "metadata.namespace must be a string"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: [1]\n", "spec must be an object"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: {template: [1]}\n",
         "pod template must be an object"),
        ("kind: Pod\nspec: {containers: [{name: a}, {name: a}]}\n", "two containers named 'a'"),
        ("kind: Pod\nspec: {containers: [{name: istio-init}]}\n", "istio-init"),
        ("kind: Pod\nmetadata: {labels: {app: " + "x" * 64 + "}}\n"
         "spec: {containers: [{name: a}]}\n", "limit of 63"),
        ("".join(" " * depth + "a:\n" for depth in range(300)), "nested deeper than 100"),
        ("a: " + "[" * 5000 + "]" * 5000, "line 1"),
        ("a: " + "{a: " * 5000 + "1" + "}" * 5000, "line 1"),
        ("a: " + "[" * 500 + "]" * 500, "nested deeper than 100"),
        ("a: &x " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*x" + "]" * 60,
         "nested deeper than 100"),
        ("&a [*a]", "contains itself"),
        ("a: 2001-13-45\n", "a value cannot be read"),
        ("a: " + "1" * 5000 + "\n", "a value cannot be read"),
        ("\x00", "app.yaml"),
        ("x" * (8 * 1024 * 1024 + 1), "larger than 8 MiB"),
        # Found by bench_fuzz: the workload's name, with a line break, was in the message whole.
        ('kind: Deployment\nmetadata: {name: "a\\nb\\u2028"}\n'
         "spec: {template: {spec: {containers: [{name: a}, {name: a}]}}}\n",
         "(Deployment 'a\\nb\\u2028')"),
    ],
)
def test_a_malformed_manifest_is_a_one_line_error_naming_where(text: str, words: str) -> None:
    # Each was a traceback (AttributeError, TypeError, RecursionError, ValueError) before.
    with pytest.raises(ManifestError) as refused:
        inject_yaml(text, MESH, "app.yaml")
    message = str(refused.value)
    assert words in message and message.startswith("app.yaml")
    assert "\n" not in message and len(message) < 500


def test_nesting_up_to_the_bound_is_injected() -> None:
    manifest = pod()
    deep: Any = "bottom"
    for _ in range(90):
        deep = {"a": deep}
    manifest["metadata"]["annotations"] = {"note": "kept"}
    manifest["spec"]["containers"][0]["x-deep"] = deep
    out = yaml.safe_load(inject_yaml(yaml.safe_dump(manifest), MESH, "deep.yaml"))
    assert out["spec"]["containers"][-1]["name"] == "istio-proxy"


def test_every_json_type_in_every_position_is_injected_or_refused() -> None:
    documents = 0
    for case in mutator.cases(workload("Deployment"), mutator.systematic_count(
            workload("Deployment"))):
        documents += 1
        text = mutator.encode(case.document).decode()
        try:
            out = inject_yaml(text, MESH, "fuzz.yaml")
        except ManifestError as error:
            assert "\n" not in str(error), case.description
            continue
        assert isinstance(out, str), case.description
    assert documents >= 21 * 15
