"""deploy/components/revision: a second installation, revision `canary`, beside the default one
(examples/revision-canary), with Istio's webhook selectors for a revision.

Istio is the oracle of which webhook a pod is sent to: ISTIO below is its table, written out
from its selectors (manifests/charts/istio-control/istio-discovery/templates/mutatingwebhook.yaml
and revision-tags-mwc.yaml), and a test renders Istio's own chart to hold the table to them."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import Cluster, Mesh
from tests.support.deploy import (
    DEPLOY,
    NOT_INJECTED_YET,
    ROOT,
    check_consistency,
    comparable,
    find,
    helm_template,
    mesh_config_of,
    render,
    serve_args,
    validate_strict,
    webhooks_called,
)
from tests.support.eventually import eventually
from tests.support.istio_parity import manifests_dir
from tests.support.pods import pod
from tests.support.servers import Server, free_port, start_server

COMPONENT = DEPLOY / "components" / "revision"
OVERLAY = ROOT / "examples" / "revision-canary"
TAG_COMPONENT = DEPLOY / "components" / "revision-tag"
REVISION = "canary"
REVISION_NAMESPACE = "mesh-canary"
CLUSTER_SCOPED = ("Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration")


def overlay_of(directory: Path, base: Path, *components: Path) -> Path:
    """A kustomize overlay in `directory` of `base` with `components` (relative paths only)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(base, directory)],
        "components": [os.path.relpath(component, directory) for component in components]}))
    return directory


@functools.cache
def revision_objects() -> list[dict[str, Any]]:
    return render(OVERLAY)


@functools.cache
def default_objects() -> list[dict[str, Any]]:
    """The default installation with the revision tag `prod` (deploy/components/revision-tag)."""
    with tempfile.TemporaryDirectory() as directory:
        return render(overlay_of(Path(directory), DEPLOY, TAG_COMPONENT))


def renamed_revision(directory: Path, name: str) -> list[dict[str, Any]]:
    """The objects of revision `name` made as the component's comment says: a copy of it in
    `directory` with `canary` replaced in every file, used from an overlay of deploy/."""
    component = directory / f"deploy-components-{name}"
    shutil.copytree(COMPONENT, component)
    for path in component.iterdir():
        path.write_text(path.read_text().replace(REVISION, name))
    return render(overlay_of(directory / "overlay", DEPLOY, component))


def webhook_configuration(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "MutatingWebhookConfiguration")


# --- the rendered revision ------------------------------------------------------------------

def test_the_revision_renders_valid_consistent_objects() -> None:
    objects = revision_objects()
    for obj in objects:
        validate_strict(obj)
    check_consistency(objects)
    assert find(objects, "Namespace")["metadata"]["name"] == REVISION_NAMESPACE
    assert {obj["metadata"].get("namespace") for obj in objects
            if obj["kind"] not in CLUSTER_SCOPED} == {REVISION_NAMESPACE}


def test_the_revision_is_named_the_same_everywhere() -> None:
    """The server's --revision, its mesh config, the webhook configuration it keeps the caBundle
    of (and its label), and the ClusterRole that lets it."""
    objects = revision_objects()
    _, mesh = mesh_config_of(objects)
    assert serve_args(objects)["revision"] == [REVISION]
    assert mesh.revision == REVISION
    configuration = webhook_configuration(objects)
    assert configuration["metadata"]["name"] == f"injector-{REVISION}"
    assert configuration["metadata"]["labels"]["istio.io/rev"] == REVISION
    role = find(objects, "ClusterRole")
    webhook_rule = next(rule for rule in role["rules"]
                        if rule["resources"] == ["mutatingwebhookconfigurations"])
    assert webhook_rule["resourceNames"] == [configuration["metadata"]["name"]]
    binding = find(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "injector",
                                    "namespace": REVISION_NAMESPACE}]
    # Its pods wait for the plugged-in CA both installations share (deploy/README.md).
    volumes = find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "cacerts")["secret"]["optional"] is False


def test_no_object_of_the_revision_is_one_of_the_default_installation() -> None:
    """Applied side by side, neither installation overwrites an object of the other."""
    revision = set(comparable(revision_objects()))
    default = set(comparable(render(DEPLOY)))
    assert len(revision) == len(default)
    assert revision.isdisjoint(default), revision & default
    revision_names = {(kind, name) for kind, _, name in revision if kind in CLUSTER_SCOPED}
    assert len(revision_names) == len(CLUSTER_SCOPED)
    assert revision_names.isdisjoint({(kind, name) for kind, _, name in default})
    names = [hook["name"] for hook in webhook_configuration(revision_objects())["webhooks"]]
    assert len(set(names)) == len(names) == 2
    assert set(names).isdisjoint(hook["name"] for hook in webhook_configuration(
        default_objects())["webhooks"])


def test_every_webhook_of_a_revision_and_a_tag_leaves_out_pods_injected_already() -> None:
    """As the base's (tests/deploy/test_webhooks.py): one call per pod, not a second on
    reinvocation. (The chart renders the same: held equal below.)"""
    for objects in (revision_objects(), default_objects()):
        for hook in webhook_configuration(objects)["webhooks"]:
            assert hook["matchConditions"] == [NOT_INJECTED_YET], hook["name"]


def test_the_revisions_mesh_config_is_the_bases_but_for_where_and_which_revision() -> None:
    revision, _ = mesh_config_of(revision_objects())
    base, _ = mesh_config_of(render(DEPLOY))
    changed = {key for key in revision.keys() | base.keys() if revision.get(key) != base.get(key)}
    assert changed == {"caAddress", "injectorNamespace", "revision"}


def test_the_chart_renders_the_same_revision(tmp_path: Path) -> None:
    """The Helm chart, `revision=canary` with the shared CA (ca.mode=cacerts) in mesh-canary, and
    the component: one revision, whichever tool installs it."""
    charted = comparable(helm_template(
        ROOT / "charts" / "injector", "injector", REVISION_NAMESPACE, "--set",
        f"revision={REVISION}", "--set", "ca.mode=cacerts", home=tmp_path))
    kustomized = comparable(revision_objects())
    assert sorted(charted) == sorted(kustomized)
    for key, expected in kustomized.items():
        assert charted[key] == expected, f"{key} differs between the chart and the component"


def test_the_chart_renders_the_same_tag(tmp_path: Path) -> None:
    """The Helm chart's `revisionTags={prod}` and deploy/ with components/revision-tag: the
    same tag, with the same two webhooks, whichever tool installs it."""
    charted = comparable(helm_template(ROOT / "charts" / "injector", "injector", "mesh-system",
                                       "--set", "revisionTags={prod}", home=tmp_path))
    kustomized = comparable(default_objects())
    assert sorted(charted) == sorted(kustomized)
    for key, expected in kustomized.items():
        assert charted[key] == expected, f"{key} differs between the chart and the component"


def test_another_revision_name_is_one_substitution_away(tmp_path: Path) -> None:
    """What the component's comment tells a user to do for revision `blue`: copy it, replace
    `canary` in every file. The result is as consistent as canary."""
    objects = renamed_revision(tmp_path, "blue")
    for obj in objects:
        validate_strict(obj)
    check_consistency(objects)
    _, mesh = mesh_config_of(objects)
    assert (mesh.revision, mesh.injector_namespace) == ("blue", "mesh-blue")
    assert serve_args(objects)["revision"] == ["blue"]
    assert webhook_configuration(objects)["metadata"]["name"] == "injector-blue"
    assert [hook["name"] for hook in webhook_configuration(objects)["webhooks"]] == [
        "rev-blue.namespace.injector.mesh", "rev-blue.object.injector.mesh"]
    assert not [obj for obj in objects if REVISION in json.dumps(obj)]


def test_no_two_webhooks_of_the_installations_side_by_side_share_a_name(tmp_path: Path) -> None:
    """The default installation with its tag, canary and a copy of it (blue) installed together:
    each webhook's name is its own, since the API server's errors ("failed calling webhook NAME")
    and admission metrics name a webhook without its configuration."""
    blue = renamed_revision(tmp_path, "blue")
    names = [hook["name"] for objects in (default_objects(), revision_objects(), blue)
             for hook in webhook_configuration(objects)["webhooks"]]
    assert len(names) == 4 + 2 + 2 + 2
    assert len(set(names)) == len(names), sorted(names)


# --- which webhook a pod is sent to, with both installed -------------------------------------

# Istio's webhooks, with the default revision (tag prod) and revision canary installed:
# abbreviation: (configuration, webhook).
ISTIO_WEBHOOKS = {
    "D.rev.namespace": ("istio-sidecar-injector", "rev.namespace.sidecar-injector.istio.io"),
    "D.rev.object": ("istio-sidecar-injector", "rev.object.sidecar-injector.istio.io"),
    "D.namespace": ("istio-sidecar-injector", "namespace.sidecar-injector.istio.io"),
    "D.object": ("istio-sidecar-injector", "object.sidecar-injector.istio.io"),
    "T.rev.namespace": ("istio-revision-tag-prod", "rev.namespace.sidecar-injector.istio.io"),
    "T.rev.object": ("istio-revision-tag-prod", "rev.object.sidecar-injector.istio.io"),
    "C.rev.namespace": ("istio-sidecar-injector-canary", "rev.namespace.sidecar-injector.istio.io"),
    "C.rev.object": ("istio-sidecar-injector-canary", "rev.object.sidecar-injector.istio.io"),
}
# Ours for each of Istio's. The istio.io/rev webhooks are named after their revision or tag
# (rev-default.*, rev-canary.*, tag-prod.*), where Istio names each configuration's rev.*: the
# API server's errors and admission metrics leave the configuration out, and so one name is one
# webhook there.
OURS = {
    "D.namespace": ("injector", "namespace.injector.mesh"),
    "D.object": ("injector", "object.injector.mesh"),
    "D.rev.namespace": ("injector", "rev-default.namespace.injector.mesh"),
    "D.rev.object": ("injector", "rev-default.object.injector.mesh"),
    "T.rev.namespace": ("injector", "tag-prod.namespace.injector.mesh"),
    "T.rev.object": ("injector", "tag-prod.object.injector.mesh"),
    "C.rev.namespace": ("injector-canary", "rev-canary.namespace.injector.mesh"),
    "C.rev.object": ("injector-canary", "rev-canary.object.injector.mesh"),
}
# Where we differ from Istio, on purpose (deploy/README.md, "Revisions"): nowhere in this table.
DIFFERENCES: set[str] = set()

NAMESPACES = {
    "-": {},
    "enabled": {"istio-injection": "enabled"},
    "disabled": {"istio-injection": "disabled"},
    "rev=default": {"istio.io/rev": "default"},
    "rev=canary": {"istio.io/rev": "canary"},
    "rev=prod": {"istio.io/rev": "prod"},
    "enabled,rev=default": {"istio-injection": "enabled", "istio.io/rev": "default"},
    "enabled,rev=canary": {"istio-injection": "enabled", "istio.io/rev": "canary"},
    "enabled,rev=prod": {"istio-injection": "enabled", "istio.io/rev": "prod"},
    "disabled,rev=default": {"istio-injection": "disabled", "istio.io/rev": "default"},
    "disabled,rev=canary": {"istio-injection": "disabled", "istio.io/rev": "canary"},
    "disabled,rev=prod": {"istio-injection": "disabled", "istio.io/rev": "prod"},
}
PODS = {
    "-": {},
    "inject=true": {"sidecar.istio.io/inject": "true"},
    "inject=false": {"sidecar.istio.io/inject": "false"},
    "rev=canary": {"istio.io/rev": "canary"},
    "inject=true,rev=canary": {"sidecar.istio.io/inject": "true", "istio.io/rev": "canary"},
    "inject=false,rev=canary": {"sidecar.istio.io/inject": "false", "istio.io/rev": "canary"},
    "rev=default": {"istio.io/rev": "default"},
    "inject=false,rev=default": {"sidecar.istio.io/inject": "false", "istio.io/rev": "default"},
    "rev=prod": {"istio.io/rev": "prod"},
    "inject=false,rev=prod": {"sidecar.istio.io/inject": "false", "istio.io/rev": "prod"},
}
# The webhook Istio calls ("-": none): a row per namespace's labels, a column per pod's labels,
# in PODS' order. istio-injection wins over istio.io/rev; "disabled" and inject=false win over
# everything; a pod's istio.io/rev (a revision's or a tag's) counts only in a namespace with
# neither label.
ISTIO: dict[str, tuple[str, ...]] = {
    # pod:                   -                  inject=true        inject=false
    #                        rev=canary         inject=true,       inject=false,
    #                                           rev=canary         rev=canary
    #                        rev=default        inject=false,      rev=prod
    #                                           rev=default
    #                        inject=false,
    #                        rev=prod
    "-":                    ("-",               "D.object",        "-",
                             "C.rev.object",    "C.rev.object",    "-",
                             "D.rev.object",    "-",               "T.rev.object",
                             "-"),
    "enabled":              ("D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "-",               "D.namespace",
                             "-"),
    "disabled":             ("-",               "-",               "-",
                             "-",               "-",               "-",
                             "-",               "-",               "-",
                             "-"),
    "rev=default":          ("D.rev.namespace", "D.rev.namespace", "-",
                             "D.rev.namespace", "D.rev.namespace", "-",
                             "D.rev.namespace", "-",               "D.rev.namespace",
                             "-"),
    "rev=canary":           ("C.rev.namespace", "C.rev.namespace", "-",
                             "C.rev.namespace", "C.rev.namespace", "-",
                             "C.rev.namespace", "-",               "C.rev.namespace",
                             "-"),
    "rev=prod":             ("T.rev.namespace", "T.rev.namespace", "-",
                             "T.rev.namespace", "T.rev.namespace", "-",
                             "T.rev.namespace", "-",               "T.rev.namespace",
                             "-"),
    "enabled,rev=default":  ("D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "-",               "D.namespace",
                             "-"),
    "enabled,rev=canary":   ("D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "-",               "D.namespace",
                             "-"),
    "enabled,rev=prod":     ("D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "D.namespace",     "-",
                             "D.namespace",     "-",               "D.namespace",
                             "-"),
    "disabled,rev=default": ("-",               "-",               "-",
                             "-",               "-",               "-",
                             "-",               "-",               "-",
                             "-"),
    "disabled,rev=canary":  ("-",               "-",               "-",
                             "-",               "-",               "-",
                             "-",               "-",               "-",
                             "-"),
    "disabled,rev=prod":    ("-",               "-",               "-",
                             "-",               "-",               "-",
                             "-",               "-",               "-",
                             "-"),
}
CASES = list(itertools.product(NAMESPACES, PODS))


def called(configurations: list[dict[str, Any]], namespace: str, pod_case: str
           ) -> list[tuple[str, str]]:
    """(configuration, webhook) of every webhook the API server calls for the pod."""
    return [(configuration["metadata"]["name"], hook)
            for configuration in configurations
            for hook in webhooks_called(configuration, "shop", NAMESPACES[namespace],
                                        PODS[pod_case])]


def istio_expects(namespace: str, pod_case: str) -> list[str]:
    assert set(ISTIO) == set(NAMESPACES)
    assert all(len(row) == len(PODS) for row in ISTIO.values())
    expected = ISTIO[namespace][list(PODS).index(pod_case)]
    return [] if expected == "-" else [expected]


@functools.cache
def istio_configurations(home: Path) -> list[dict[str, Any]]:
    """Istio's own webhook configurations, rendered from its chart in the Go module cache: the
    default revision with tag prod, and revision canary."""
    chart = manifests_dir() / "charts" / "istio-control" / "istio-discovery"
    default = helm_template(chart, "istiod", "istio-system", "--set", "revisionTags={prod}",
                            "--show-only", "templates/mutatingwebhook.yaml",
                            "--show-only", "templates/revision-tags-mwc.yaml", home=home)
    canary = helm_template(chart, "istiod-canary", "istio-system", "--set", "revision=canary",
                           "--show-only", "templates/mutatingwebhook.yaml", home=home)
    return [*default, *canary]


def test_the_table_is_istios_own(tmp_path_factory: pytest.TempPathFactory) -> None:
    configurations = istio_configurations(tmp_path_factory.getbasetemp() / "istio-helm")
    assert sorted(c["metadata"]["name"] for c in configurations) == sorted(
        {configuration for configuration, _ in ISTIO_WEBHOOKS.values()})
    by_name = {webhook: abbreviation for abbreviation, webhook in ISTIO_WEBHOOKS.items()}
    for namespace, pod_case in CASES:
        istio_called = [by_name[hook] for hook in called(configurations, namespace, pod_case)]
        assert istio_called == istio_expects(namespace, pod_case), (namespace, pod_case)


@pytest.mark.parametrize(("namespace", "pod_case"), CASES)
def test_default_and_revision_call_istios_webhook_and_never_two(namespace: str,
                                                               pod_case: str) -> None:
    configurations = [webhook_configuration(default_objects()),
                      webhook_configuration(revision_objects())]
    ours = called(configurations, namespace, pod_case)
    assert len(ours) <= 1, f"{ours}: the pod would get two sidecars"
    expected = [OURS[abbreviation] for abbreviation in istio_expects(namespace, pod_case)
                if abbreviation not in DIFFERENCES]
    assert ours == expected
    for abbreviation in istio_expects(namespace, pod_case):
        assert OURS[abbreviation] is not None or abbreviation in DIFFERENCES


def test_the_webhooks_are_documented() -> None:
    """deploy/README.md's table of which webhook a pod reaches names every webhook of the three
    configurations, and the istio.io/rev=default row names the default installation's."""
    readme = (DEPLOY / "README.md").read_text()
    assert "components/revision" in readme and "examples/revision-canary" in readme
    for configuration, webhook in filter(None, OURS.values()):
        assert f"`{configuration}/{webhook}`" in readme, webhook
    row = next(line for line in readme.splitlines() if line.startswith("| `istio.io/rev=default`"))
    assert "`injector/rev-default.namespace.injector.mesh`" in row


# --- applied to a real API server --------------------------------------------------------------

def test_istio_io_rev_default_is_injected_by_the_default_installation(
        kube_cluster: Cluster, kube_mesh: Mesh) -> None:
    """deploy/ as applied (kube_mesh): a namespace labelled only istio.io/rev=default, as
    `istioctl tag set default` and Istio's docs have users label it, gets its pods injected once;
    so does a pod labelled so in an unlabelled namespace; istio-injection=disabled still wins."""
    names = (f"web-{number}" for number in itertools.count())

    def proxies(namespace: str, labels: dict[str, str] | None = None) -> tuple[int, str | None]:
        """How many istio-proxy containers a pod created in `namespace` got, and the revision
        its injection annotation names."""
        stored = kube_cluster.create_pod(namespace, pod(next(names), labels=labels))
        containers = [c["name"] for c in stored["spec"]["containers"]]
        return (containers.count("istio-proxy"),
                (stored["metadata"].get("annotations") or {}).get("istio.io/rev"))

    assert proxies(kube_cluster.namespace("revdefault", {"istio.io/rev": "default"})) == (
        1, "default")
    assert proxies(kube_cluster.namespace("plain"), {"istio.io/rev": "default"}) == (1, "default")
    disabled = kube_cluster.namespace("revdisabled", {"istio-injection": "disabled",
                                                      "istio.io/rev": "default"})
    assert proxies(disabled) == (0, None)
    assert proxies(disabled, {"istio.io/rev": "default",
                              "sidecar.istio.io/inject": "true"}) == (0, None)


def test_a_namespace_labelled_for_the_revision_is_injected_by_its_server(
        kube_cluster: Cluster, kube_mesh: Mesh, tmp_path: Path) -> None:
    """examples/revision-canary applied beside deploy/ (kube_mesh), its webhooks pointed at a
    canary server on loopback that runs with its own ServiceAccount's token and the shared CA
    (the default installation's, as deploy/README.md says to plug in): a pod in a namespace
    labelled istio.io/rev=canary is injected by it, once, and says so; the default installation
    still injects its own namespaces."""
    port = free_port()
    overlay = overlay_of(tmp_path / "overlay", OVERLAY)
    by_url = [{"op": "replace", "path": f"/webhooks/{index}/clientConfig",
               "value": {"url": f"https://127.0.0.1:{port}/inject"}} for index in range(2)]
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["patches"] = [{"target": {"kind": "MutatingWebhookConfiguration",
                                            "name": f"injector-{REVISION}"},
                                 "patch": yaml.safe_dump(by_url)}]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    canary: Server | None = None
    try:
        kube_cluster.kubectl("apply", "-k", str(overlay))
        # The shared CA: the default installation's, plugged into the revision (cacerts).
        certs = tmp_path / "canary" / "certs"
        certs.mkdir(parents=True)
        assert kube_mesh.injector is not None
        for name in ("root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem"):
            shutil.copy(kube_mesh.injector.certs_dir / name, certs / name)
            (certs / name).chmod(0o600)
        config = tmp_path / "canary-mesh.yaml"
        config.write_text(yaml.safe_dump(mesh_config_of(revision_objects())[0]))
        token = kube_cluster.token(REVISION_NAMESPACE, "injector", seconds=3600)
        kubeconfig = kube_cluster.token_kubeconfig(tmp_path / "canary.kubeconfig", token)
        canary = start_server(tmp_path / "canary", "--kubeconfig", str(kubeconfig),
                              "--config", str(config), f"--revision={REVISION}",
                              port=port, certs_dir=certs)
        root = base64.b64encode(canary.root_cert.read_bytes()).decode()

        def bundles() -> list[str | None]:
            stored = kube_cluster.get("mutatingwebhookconfiguration", f"injector-{REVISION}")
            return [hook["clientConfig"].get("caBundle") for hook in stored["webhooks"]]

        eventually(lambda: bundles() == [root, root], 30,
                   what=f"the canary's root in injector-canary's caBundle ({canary.log_path})")

        names = (f"web-{number}" for number in itertools.count())

        def injected_by(namespace: str, labels: dict[str, str] | None = None) -> str | None:
            """The revision that injected a pod created in `namespace`, or None."""
            manifest = pod(next(names), labels=labels)
            stored = kube_cluster.create_pod(namespace, manifest)
            containers = [c["name"] for c in stored["spec"]["containers"]]
            if "istio-proxy" not in containers:
                return None
            assert containers.count("istio-proxy") == 1, containers
            annotations = stored["metadata"]["annotations"]
            status = json.loads(annotations["sidecar.istio.io/status"])
            assert status["revision"] == annotations["istio.io/rev"]
            return str(annotations["istio.io/rev"])

        assert injected_by(kube_cluster.namespace("rev", {"istio.io/rev": REVISION})) == REVISION
        unlabelled = kube_cluster.namespace("plain")
        assert injected_by(unlabelled, {"istio.io/rev": REVISION,
                                        "sidecar.istio.io/inject": "true"}) == REVISION
        assert injected_by(unlabelled) is None
        assert injected_by(kube_cluster.namespace("legacy", {"istio-injection": "enabled",
                                                             "istio.io/rev": REVISION})
                           ) == "default"
        assert "HTTP 403" not in canary.log()
    finally:
        if canary is not None:
            canary.stop()
        # Other tests share this cluster: leave no webhook of the revision behind.
        kube_cluster.kubectl("delete", "-k", str(overlay), "--wait=false",
                             "--ignore-not-found", check=False)


def test_the_tag_injects_its_namespaces_and_its_pods_once(
        kube_cluster: Cluster, kube_mesh: Mesh, tmp_path: Path) -> None:
    """deploy/ as applied (kube_mesh), with components/revision-tag applied over it (its two
    webhooks pointed at the same injector on loopback): a pod in a namespace labelled
    istio.io/rev=prod is injected once, and so is a pod labelled istio.io/rev=prod in an
    unlabelled namespace (Istio's tag webhooks select both); istio-injection=disabled on the
    namespace still wins over the pod's label."""
    overlay = overlay_of(tmp_path / "tagged", DEPLOY, TAG_COMPONENT)
    assert kube_mesh.injector is not None
    root = base64.b64encode(kube_mesh.injector.root_cert.read_bytes()).decode()
    shipped = webhook_configuration(default_objects())["webhooks"]
    base_count = len(webhook_configuration(render(DEPLOY))["webhooks"])
    # The base's webhooks as kube_mesh applied them (their caBundle is the server's, left alone);
    # the tag's with the root already in, rather than waiting for the server's next round.
    by_url = [{"op": "replace", "path": f"/webhooks/{index}/clientConfig",
               "value": {"url": kube_mesh.webhook_url,
                         **({"caBundle": root} if index >= base_count else {})}}
              for index in range(len(shipped))]
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["patches"] = [{"target": {"kind": "MutatingWebhookConfiguration",
                                            "name": "injector"},
                                 "patch": yaml.safe_dump(by_url)}]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    try:
        kube_cluster.kubectl("apply", "-k", str(overlay))
        stored = kube_cluster.get("mutatingwebhookconfiguration", "injector")
        assert [hook["name"] for hook in stored["webhooks"]] == [hook["name"] for hook in shipped]
        names = (f"web-{number}" for number in itertools.count())

        def proxies(namespace: str, labels: dict[str, str] | None = None) -> int:
            """How many istio-proxy containers a pod created in `namespace` got."""
            created = kube_cluster.create_pod(namespace, pod(next(names), labels=labels))
            return [c["name"] for c in created["spec"]["containers"]].count("istio-proxy")

        assert proxies(kube_cluster.namespace("tagged", {"istio.io/rev": "prod"})) == 1
        plain = kube_cluster.namespace("plain")
        assert proxies(plain, {"istio.io/rev": "prod"}) == 1
        assert proxies(plain, {"istio.io/rev": "prod", "sidecar.istio.io/inject": "false"}) == 0
        assert proxies(plain) == 0
        disabled = kube_cluster.namespace("tagoff", {"istio-injection": "disabled"})
        assert proxies(disabled, {"istio.io/rev": "prod"}) == 0
    finally:
        # Other tests share this cluster: back to deploy/ as kube_mesh applied it (apply drops
        # the webhooks it added).
        kube_cluster.kubectl("apply", "-k", str(kube_mesh.workdir / "overlay"))
    assert kube_mesh.ca_bundles() == [root] * base_count
