"""The overlay deploy/README.md documents: a new namespace and image, kept consistent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.deploy import (
    DEPLOY,
    POD_LABELS,
    check_consistency,
    find,
    pod_spec,
    render,
    validate_strict,
    webhooks_called,
)

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


def test_overlay_without_the_mesh_config_is_caught(tmp_path: Path) -> None:
    objects = render(make_overlay(tmp_path / "overlay", edit_mesh_config=False))
    with pytest.raises(AssertionError):
        check_consistency(objects)
