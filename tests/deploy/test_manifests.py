"""The base's objects, one property at a time: what the SPEC and the runtime rely on."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from injector.mesh import names
from tests.support.deploy import (
    K8S_VERSION,
    NAMESPACE,
    find,
    find_container,
    pod_spec,
    selector_matches,
    serve_args,
    validate_strict,
)


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
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (443, 15017), (names.GRPC_CA_PORT, names.GRPC_CA_PORT)]


def test_istios_grpc_ca_port_is_served_and_exposed(objects: list[dict[str, Any]]) -> None:
    """Istio's sidecars reach the CA as istiod's: Service port 15012, the container's port,
    and serve's --grpc-port, one number and one name."""
    container = find_container(pod_spec(objects)["containers"], "injector")
    assert {"containerPort": names.GRPC_CA_PORT, "name": names.GRPC_CA_PORT_NAME,
            "protocol": "TCP"} in container["ports"]
    assert serve_args(objects)["grpc-port"] == [str(names.GRPC_CA_PORT)]
    service = find(objects, "Service", "injector")
    assert {"name": names.GRPC_CA_PORT_NAME, "port": names.GRPC_CA_PORT,
            "targetPort": names.GRPC_CA_PORT, "protocol": "TCP"} in service["spec"]["ports"]
