"""The first look at a pod: what injection cannot read, and Kubernetes' own limits, refused by
name before anything else is done with the pod."""

from __future__ import annotations

from typing import Any

import pytest

from injector.injection import limits
from tests.support.pods import pod, replicaset_pod


def test_pods_as_the_api_server_sends_them_pass() -> None:
    assert limits.check(pod()) is None
    assert limits.check(replicaset_pod()) is None
    at_the_limits = pod(
        "p" * 253,
        labels={"k" * 63: "v" * 63, f"{'d' * 253}/{'n' * 63}": "a.b_c-d", "empty": ""},
        annotations={"a": "x" * (256 * 1024 - 1)},
        containers=[{"name": "c" * 63, "image": "a"}],
        init_containers=[{"name": "init-1", "image": "b"}],
    )
    assert limits.check(at_the_limits) is None
    # Kubernetes counts bytes of UTF-8: 2 bytes each, just at the limit.
    assert limits.check(pod(annotations={"a": "\u00e9" * (128 * 1024 - 1)})) is None


@pytest.mark.parametrize(("change", "words"), [
    (lambda p: p["metadata"].update(annotations={"a": "x" * 256 * 1024}),
     "metadata.annotations total 262145 bytes, over Kubernetes' limit of 262144"),
    (lambda p: p["metadata"].update(annotations={"a": "\u00e9" * 128 * 1024}),
     "total 262145 bytes"),
    (lambda p: p["metadata"].update(annotations={f"k{n}": "x" * 1024 for n in range(300)}),
     "over Kubernetes' limit of 262144"),
    (lambda p: p["metadata"].update(labels={"app": "x" * 64}),
     "the label 'app' is 64 characters long, over Kubernetes' limit of 63"),
    (lambda p: p["metadata"].update(labels={"app": "-web"}), "not a label value"),
    (lambda p: p["metadata"].update(labels={"app": "web shop"}), "not a label value"),
    (lambda p: p["metadata"].update(labels={"app": "\uff11\uff10"}), "not a label value"),
    (lambda p: p["metadata"].update(labels={"k" * 318: "v"}), "limit of 317"),
    (lambda p: p["metadata"].update(name="p" * 254),
     "metadata.name is 254 characters long, over Kubernetes' limit of 253"),
    (lambda p: p["metadata"].update(generateName="p" * 254), "metadata.generateName"),
    (lambda p: p["metadata"].update(namespace="n" * 64), "limit of 63"),
    (lambda p: p["spec"]["containers"][0].update(name="App"), "not a DNS label"),
    (lambda p: p["spec"]["containers"][0].update(name="c" * 64), "not a DNS label"),
    (lambda p: p["spec"].update(initContainers=[{"name": "app"}]),
     "two containers named 'app'"),
    (lambda p: p["spec"]["containers"].append({"name": "app"}), "two containers named 'app'"),
])
def test_what_kubernetes_refuses_is_refused_naming_the_limit(change: Any, words: str) -> None:
    subject = pod()
    change(subject)
    problem = limits.check(subject)
    assert problem is not None and problem.reason == "kubernetes-limit"
    assert words in problem.message
    assert len(problem.message) < 400  # a long name is cut, not echoed whole


@pytest.mark.parametrize(("change", "words"), [
    (lambda p: p.update(metadata=["a"]), "metadata must be an object"),
    (lambda p: p["metadata"].update(name={"a": {"b": 1}}), "metadata.name must be a string"),
    (lambda p: p["metadata"].update(namespace=7), "metadata.namespace must be a string"),
    (lambda p: p["metadata"].update(labels={"a": 1}), "metadata.labels must map strings"),
    (lambda p: p["metadata"].update(annotations={1: "x"}),
     "metadata.annotations must map strings"),
    (lambda p: p["metadata"].update(annotations=["a"]), "metadata.annotations must map"),
    (lambda p: p["metadata"].update(ownerReferences={"a": 1}), "ownerReferences"),
    (lambda p: p.update(spec=None), "spec must be an object"),
    (lambda p: p["spec"].update(containers={}), "spec.containers must be a non-empty list"),
    (lambda p: p["spec"].update(initContainers=[{"name": 1}]), "spec.initContainers"),
    (lambda p: p["spec"].update(volumes=[["x"]]), "spec.volumes"),
])
def test_what_injection_cannot_read_is_an_invalid_pod(change: Any, words: str) -> None:
    subject = pod()
    change(subject)
    problem = limits.check(subject)
    assert problem is not None and problem.reason == "invalid-pod"
    assert words in problem.message


@pytest.mark.parametrize("subject", [None, [], "pod", 7, {"spec": []}])
def test_what_is_not_a_pod_at_all_is_an_invalid_pod(subject: Any) -> None:
    problem = limits.check(subject)
    assert problem is not None and problem.reason == "invalid-pod"
