"""RBAC: exactly the calls the injector makes at run time, and nothing wider."""

from __future__ import annotations

import itertools
from typing import Any

from tests.support.deploy import NAMESPACE, find

# (kind, apiGroup, resource, resourceNames, verbs): every rule, exactly.
EXPECTED_RULES = {
    ("ClusterRole", "admissionregistration.k8s.io", "mutatingwebhookconfigurations",
     ("injector",), ("get", "patch")),
    ("ClusterRole", "", "namespaces", (), ("list", "watch")),
    ("ClusterRole", "", "configmaps", ("istio-ca-root-cert",),
     ("get", "list", "patch", "watch")),
    ("ClusterRole", "", "configmaps", (), ("create",)),
    ("ClusterRole", "authentication.k8s.io", "tokenreviews", (), ("create",)),
    ("ClusterRole", "", "events", (), ("create",)),
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
