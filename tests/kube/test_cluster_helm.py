"""The Helm chart (charts/injector): `helm lint`, `helm template` equal to deploy/ with default
values (the one source of truth: the two cannot drift apart), each value doing what it says, and
`helm install` into a real kube-apiserver, after which a pod in a labelled namespace is
injected. Helm is built from its Go module like the cluster's peers (tests/cluster/build.sh)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from injector.mesh.config import load_mesh_config
from tests.support.certs import self_signed_authority
from tests.support.cluster import (
    MESH_NAMESPACE,
    ROOT,
    Mesh,
    start_cluster,
)
from tests.support.deploy import (
    DEPLOY,
    MESH_CONFIGMAP,
    comparable,
    find,
    render,
    validate_strict,
    webhooks_called,
)
from tests.support.peers import CLUSTER_SCRIPT, built
from tests.support.pods import pod
from tests.support.servers import free_port

CHART = ROOT / "charts" / "injector"
RELEASE = "injector"


def helm_binary() -> Path:
    return built(CLUSTER_SCRIPT, "helm", "--helm-dir")


def helm(*args: str, home: Path, check: bool = True, kubeconfig: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    """helm, its caches and settings in `home` (never the user's), and `kubeconfig` if given."""
    environment = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
                   "HELM_CONFIG_HOME": str(home / "config"),
                   "HELM_DATA_HOME": str(home / "data")}
    environment.pop("KUBECONFIG", None)
    if kubeconfig is not None:
        environment["KUBECONFIG"] = str(kubeconfig)
    result = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True,
                            timeout=120, check=False, env=environment)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}{result.stdout}"
    return result


def template(home: Path, *values: str) -> list[dict[str, Any]]:
    """`helm template` of the chart into mesh-system, with `--set` values."""
    sets = [arg for value in values for arg in ("--set", value)]
    rendered = helm("template", RELEASE, str(CHART), "--namespace", MESH_NAMESPACE, *sets,
                    home=home).stdout
    return [document for document in yaml.safe_load_all(rendered) if document]


# --- lint and template ----------------------------------------------------------------------------

def test_helm_lint_passes_strictly(tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHART), home=tmp_path)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_default_values_render_exactly_the_objects_of_deploy(tmp_path: Path) -> None:
    charted = comparable(template(tmp_path))
    kustomized = comparable(render(DEPLOY))
    assert sorted(charted) == sorted(kustomized)
    for key, expected in kustomized.items():
        assert charted[key] == expected, f"{key} differs between the chart and deploy/"


def test_every_rendered_object_is_valid_kubernetes(tmp_path: Path) -> None:
    rendered = template(tmp_path, "revision=canary", "revisionTags={prod,stable}",
                        "ca.mode=cacerts")
    for obj in rendered:
        validate_strict(obj)


def test_values_change_what_they_say(tmp_path: Path) -> None:
    rendered = template(tmp_path, "replicas=3", "image.repository=registry.example/mesh/injector",
                        "image.tag=0.2.0", "resources.limits.cpu=2",
                        "webhook.failurePolicy=Ignore", "webhook.timeoutSeconds=5",
                        "meshConfig.policy=disabled")
    deployment = find(rendered, "Deployment", "injector")
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/mesh/injector:0.2.0"
    assert container["resources"]["limits"]["cpu"] == 2
    # The sidecars run the same image: the mesh config follows.
    mesh = load_mesh_config(yaml.safe_load(find(rendered, "ConfigMap")["data"]["mesh.yaml"]))
    assert mesh.proxy_image == "registry.example/mesh/injector:0.2.0"
    assert mesh.policy == "disabled"
    assert mesh.ca_address == "injector.mesh-system.svc:443"
    for webhook in find(rendered, "MutatingWebhookConfiguration")["webhooks"]:
        assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Ignore", 5)


def test_a_revision_names_its_webhooks_and_selects_istio_io_rev(tmp_path: Path) -> None:
    rendered = template(tmp_path, "revision=canary", "revisionTags={prod}")
    configuration = find(rendered, "MutatingWebhookConfiguration")
    assert configuration["metadata"]["name"] == "injector-canary"
    # Each name carries its revision or tag: the API server's errors and admission metrics name
    # a webhook without its configuration.
    assert [w["name"] for w in configuration["webhooks"]] == [
        "rev-canary.namespace.injector.mesh", "rev-canary.object.injector.mesh",
        "tag-prod.namespace.injector.mesh", "tag-prod.object.injector.mesh"]
    mesh = load_mesh_config(yaml.safe_load(find(rendered, "ConfigMap")["data"]["mesh.yaml"]))
    assert mesh.revision == "canary"

    def called(namespace_labels: dict[str, str], pod_labels: dict[str, str]) -> list[str]:
        return webhooks_called(configuration, "shop", namespace_labels, pod_labels)

    assert called({"istio.io/rev": "canary"}, {}) == ["rev-canary.namespace.injector.mesh"]
    assert called({"istio.io/rev": "prod"}, {}) == ["tag-prod.namespace.injector.mesh"]
    assert called({}, {"istio.io/rev": "canary"}) == ["rev-canary.object.injector.mesh"]
    assert called({}, {"istio.io/rev": "prod"}) == ["tag-prod.object.injector.mesh"]
    assert called({"istio.io/rev": "canary"}, {"istio.io/rev": "prod"}) == [
        "rev-canary.namespace.injector.mesh"]  # the namespace's label wins
    assert called({"istio.io/rev": "canary"}, {"sidecar.istio.io/inject": "false"}) == []
    assert called({"istio-injection": "enabled"}, {}) == []  # the default revision's
    assert called({"istio.io/rev": "canary", "istio-injection": "disabled"}, {}) == []


def test_tags_on_the_default_revision_stay_exclusive_of_its_webhooks(tmp_path: Path) -> None:
    configuration = find(template(tmp_path, "revisionTags={prod}"),
                         "MutatingWebhookConfiguration")
    assert configuration["metadata"]["name"] == "injector"
    label_sets: list[dict[str, str]] = [{}, {"istio-injection": "enabled"},
                                        {"istio.io/rev": "prod"}, {"istio.io/rev": "default"}]
    for namespace_labels in label_sets:
        for pod_labels in ({}, {"sidecar.istio.io/inject": "true"}, {"istio.io/rev": "default"},
                           {"istio.io/rev": "prod"}):
            assert len(webhooks_called(configuration, "shop", namespace_labels,
                                       pod_labels)) <= 1, (namespace_labels, pod_labels)
    assert webhooks_called(configuration, "shop", {"istio.io/rev": "prod"}, {}) == [
        "tag-prod.namespace.injector.mesh"]
    assert webhooks_called(configuration, "shop", {"istio.io/rev": "default"}, {}) == [
        "rev-default.namespace.injector.mesh"]
    assert webhooks_called(configuration, "shop", {}, {"istio.io/rev": "default"}) == [
        "rev-default.object.injector.mesh"]
    assert webhooks_called(configuration, "shop", {}, {"istio.io/rev": "prod"}) == [
        "tag-prod.object.injector.mesh"]


def test_default_is_refused_as_a_revision_or_a_tag_name(tmp_path: Path) -> None:
    """The default installation answers istio.io/rev=default itself: a tag `default` (Istio's
    `istioctl tag set default`) would send its pods to a second webhook, and a revision `default`
    would be a second default installation. Both stop the install with a message saying so."""
    for value, message in (("revisionTags={prod,default}", "revisionTags: `default` is refused"),
                           ("revision=default", "revision: `default` is the default")):
        result = helm("template", RELEASE, str(CHART), "--set", value, home=tmp_path,
                      check=False)
        assert result.returncode != 0, value
        assert message in result.stderr, result.stderr


def test_a_tag_named_as_the_revision_or_twice_is_refused(tmp_path: Path) -> None:
    """Either would have two webhooks select the same pods: the install stops saying why."""
    result = helm("template", RELEASE, str(CHART), "--set", "revision=canary", "--set",
                  "revisionTags={prod,canary}", home=tmp_path, check=False)
    assert result.returncode != 0
    assert "revisionTags: `canary` is the revision's own name" in result.stderr, result.stderr
    result = helm("template", RELEASE, str(CHART), "--set", "revisionTags={prod,prod}",
                  home=tmp_path, check=False)
    assert result.returncode != 0
    assert "revisionTags': items at 0 and 1 are equal" in result.stderr, result.stderr


def test_a_plugged_in_ca_is_a_secret_the_pods_wait_for(tmp_path: Path) -> None:
    authority = self_signed_authority()
    root = authority.roots[0].public_bytes(serialization.Encoding.PEM).decode()
    values = tmp_path / "ca.yaml"
    values.write_text(yaml.safe_dump({"ca": {"mode": "cacerts", "cacerts": {
        "rootCert": root, "caCert": root, "certChain": root, "caKey": "KEY"}}}))
    rendered = [d for d in yaml.safe_load_all(helm(
        "template", RELEASE, str(CHART), "-n", MESH_NAMESPACE, "-f", str(values),
        home=tmp_path).stdout) if d]
    secret = find(rendered, "Secret", "cacerts")
    assert sorted(secret["data"]) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem",
                                      "root-cert.pem"]
    volumes = find(rendered, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "cacerts")["secret"]["optional"] is False
    # The root is known before any replica runs: the webhooks trust it from the start.
    bundle = base64.b64encode(root.encode()).decode()
    for webhook in find(rendered, "MutatingWebhookConfiguration")["webhooks"]:
        assert webhook["clientConfig"]["caBundle"] == bundle

    # selfSigned (the default): no Secret, and a cacerts Secret is optional, as in deploy/.
    rendered = template(tmp_path)
    assert not [d for d in rendered if d["kind"] == "Secret"]


def test_bad_values_are_refused_by_the_schema(tmp_path: Path) -> None:
    for value in ("webhook.failurePolicy=Sometimes", "webhook.timeoutSeconds=60",
                  "revision=Not_A_Label", "replicas=0", "ca.mode=vault"):
        result = helm("template", RELEASE, str(CHART), "--set", value, home=tmp_path,
                      check=False)
        assert result.returncode != 0, value
        assert "values don't meet the specifications of the schema" in result.stderr, value


# --- install ---------------------------------------------------------------------------------

def test_helm_install_into_a_real_api_server_injects_a_pod(tmp_path: Path) -> None:
    """A cluster of its own (deploy/ holds the same cluster-wide names in the session's), the
    chart installed as its README says, the injector on loopback with the token of the chart's
    ServiceAccount and the chart's mesh config; then a pod in a labelled namespace."""
    cluster = start_cluster(tmp_path / "cluster")
    mesh: Mesh | None = None
    try:
        port = free_port()
        # As values.yaml says: the namespace first, then the chart takes it over (its labels).
        cluster.kubectl("create", "namespace", MESH_NAMESPACE)
        helm("install", RELEASE, str(CHART), "--namespace", MESH_NAMESPACE, "--take-ownership",
             "--set", f"webhook.url=https://127.0.0.1:{port}/inject",
             home=tmp_path, kubeconfig=cluster.admin_kubeconfig)
        status = json.loads(helm("status", RELEASE, "-n", MESH_NAMESPACE, "-o", "json",
                                 home=tmp_path, kubeconfig=cluster.admin_kubeconfig).stdout)
        assert status["info"]["status"] == "deployed"
        namespace = cluster.get("namespace", MESH_NAMESPACE)
        assert namespace["metadata"]["labels"]["istio-injection"] == "disabled"

        config = tmp_path / "mesh.yaml"
        config.write_text(cluster.get("configmap", MESH_CONFIGMAP, "-n", MESH_NAMESPACE)["data"][
            "mesh.yaml"])
        token = cluster.token(MESH_NAMESPACE, "injector", seconds=3600)
        kubeconfig = cluster.token_kubeconfig(tmp_path / "injector.kubeconfig", token)
        mesh = Mesh(cluster, tmp_path / "mesh", port, kubeconfig, config)
        mesh.start_injector()  # and waits for its root in every webhook's caBundle

        shop = cluster.namespace("shop", {"istio-injection": "enabled"})
        stored = cluster.create_pod(shop, pod("web"))
        names = [c["name"] for c in stored["spec"]["containers"]]
        assert names == ["app", "istio-proxy"]
        assert "istio-init" in [c["name"] for c in stored["spec"]["initContainers"]]
        plain = cluster.create_pod(cluster.namespace("plain"), pod("web"))
        assert [c["name"] for c in plain["spec"]["containers"]] == ["app"]
        # The injector ran with the chart's RBAC and saw nothing refused, and `injector check`
        # finds the chart's webhooks healthy.
        assert "HTTP 403" not in mesh.injector.log()  # type: ignore[union-attr]
        checked = subprocess.run(
            [sys.executable, "-m", "injector", "check", "webhook", "-o", "json", "--kubeconfig",
             str(cluster.admin_kubeconfig), "--config", str(config)],
            capture_output=True, text=True, timeout=120, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        helm("uninstall", RELEASE, "-n", MESH_NAMESPACE, home=tmp_path,
             kubeconfig=cluster.admin_kubeconfig)
        left = cluster.kubectl("get", "mutatingwebhookconfiguration", "-o", "name").stdout
        assert "injector" not in left
    finally:
        if mesh is not None:
            mesh.stop_injector()
        cluster.stop()
