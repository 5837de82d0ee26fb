"""deploy/components/revision-tag: a revision tag for the default installation, with Istio's
selector precedence (istio-injection wins over istio.io/rev; a pod's istio.io/rev counts only in a
namespace with neither; no pod sent to two webhooks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.deploy import DEPLOY, POD_LABELS, find, render, validate_strict, webhooks_called

COMPONENT = DEPLOY / "components" / "revision-tag"


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    overlay = tmp_path_factory.mktemp("tagged")
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(DEPLOY, overlay)}\n"
        f"components:\n  - {os.path.relpath(COMPONENT, overlay)}\n")
    objects = render(overlay)
    for obj in objects:
        validate_strict(obj)
    config: dict = find(objects, "MutatingWebhookConfiguration", "injector")
    return config


@pytest.mark.parametrize(("namespace_labels", "pod", "called"), [
    ({"istio.io/rev": "prod"}, "unset", ["tag-prod.namespace.injector.mesh"]),
    ({"istio.io/rev": "prod"}, "false", []),
    ({"istio.io/rev": "prod", "istio-injection": "enabled"}, "unset",
     ["namespace.injector.mesh"]),  # istio-injection wins
    ({"istio.io/rev": "prod", "istio-injection": "disabled"}, "true", []),
    ({"istio.io/rev": "other"}, "true", []),  # another revision's
    ({}, "true", ["object.injector.mesh"]),
    ({}, "unset", []),
])
def test_the_tag_selects_as_istios_webhooks_do(hooks: dict, namespace_labels: dict[str, str],
                                               pod: str, called: list[str]) -> None:
    assert webhooks_called(hooks, "shop", namespace_labels, POD_LABELS[pod]) == called


@pytest.mark.parametrize(("namespace_labels", "pod_labels", "called"), [
    ({}, {"istio.io/rev": "prod"}, ["tag-prod.object.injector.mesh"]),
    ({}, {"istio.io/rev": "prod", "sidecar.istio.io/inject": "true"},
     ["tag-prod.object.injector.mesh"]),
    ({}, {"istio.io/rev": "prod", "sidecar.istio.io/inject": "false"}, []),
    # The namespace's label wins over the pod's, whichever it is.
    ({"istio-injection": "enabled"}, {"istio.io/rev": "prod"}, ["namespace.injector.mesh"]),
    ({"istio-injection": "disabled"}, {"istio.io/rev": "prod"}, []),
    ({"istio.io/rev": "default"}, {"istio.io/rev": "prod"},
     ["rev-default.namespace.injector.mesh"]),
    ({"istio.io/rev": "other"}, {"istio.io/rev": "prod"}, []),  # another revision's
    ({}, {"istio.io/rev": "other"}, []),
])
def test_a_pod_labelled_with_the_tag_is_selected_as_by_istios_tag(
        hooks: dict, namespace_labels: dict[str, str], pod_labels: dict[str, str],
        called: list[str]) -> None:
    """Istio's tag webhooks also select a pod labelled istio.io/rev=<tag> in a namespace with
    neither label (revision-tags-mwc.yaml's rev.object)."""
    assert webhooks_called(hooks, "shop", namespace_labels, pod_labels) == called


def test_the_tags_webhooks_are_named_after_it(hooks: dict) -> None:
    assert [hook["name"] for hook in hooks["webhooks"]][-2:] == [
        "tag-prod.namespace.injector.mesh", "tag-prod.object.injector.mesh"]


def test_the_tag_leaves_the_system_namespaces_and_the_injectors_own_alone(hooks: dict) -> None:
    for namespace in ("kube-system", "mesh-system"):
        assert webhooks_called(hooks, namespace, {"istio.io/rev": "prod"},
                               POD_LABELS["unset"]) == []
        assert webhooks_called(hooks, namespace, {}, {"istio.io/rev": "prod"}) == []


def test_the_component_is_documented() -> None:
    assert "components/revision-tag" in (DEPLOY / "README.md").read_text()
    assert Path(COMPONENT / "kustomization.yaml").exists()
