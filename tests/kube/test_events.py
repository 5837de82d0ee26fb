"""Which admissions become Events, and that writing them is never in an admission's way: the
recorder's choices on its own, then a real server whose Kubernetes API refuses or has gone while
pods keep being admitted. (The Events as stored by the real API server:
tests/kube/test_cluster_events.py.)"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from kubernetes.client import ApiClient

from injector.injection.webhook import Outcome
from injector.kube import events
from injector.kube.client import Rest
from tests.support.eventually import eventually
from tests.support.fakeapi import RunningFakeKube
from tests.support.pods import replicaset_pod, review
from tests.support.servers import Server, start_server


def recorder(**kwargs: Any) -> events.EventRecorder:
    # Its writer is never started here: what `observe` queues is what is looked at.
    return events.EventRecorder(Rest(ApiClient()), **kwargs)


def outcome(result: str, reason: str, namespace: str = "shop") -> Outcome:
    body = orjson.dumps({"response": {"status": {"message": "annotation x: bad"}}})
    return Outcome(body, result, reason, namespace, "reviews-v1-5d8c9f7b4-")


@pytest.mark.parametrize(("result", "reason", "queued"), [
    ("injected", "namespace-enabled", 1),
    ("denied", "invalid-annotation", 1),
    ("skipped", "host-network", 1),
    ("skipped", "ignored-namespace", 1),
    ("skipped", "policy-disabled", 1),
    ("skipped", "pod-annotation-false", 0),  # what the user asked for
    ("skipped", "already-injected", 0),  # a reinvocation
    ("ignored", "not-a-create", 0),
])
def test_which_admissions_become_events(result: str, reason: str, queued: int) -> None:
    events_of = recorder()
    events_of.observe(outcome(result, reason), review(replicaset_pod()))
    assert events_of.backlog == queued


def test_one_event_per_owner_and_reason_in_the_window() -> None:
    events_of = recorder()
    for _ in range(10):
        events_of.observe(outcome("injected", "namespace-enabled"), review(replicaset_pod()))
    events_of.observe(outcome("denied", "invalid-annotation"), review(replicaset_pod()))
    other = replicaset_pod()
    other["metadata"]["ownerReferences"][0]["uid"] = "another-uid"
    events_of.observe(outcome("injected", "namespace-enabled"), review(other))
    assert events_of.backlog == 3
    # A window of zero: every admission is an Event.
    eager = recorder(window_seconds=0)
    for _ in range(3):
        eager.observe(outcome("injected", "namespace-enabled"), review(replicaset_pod()))
    assert eager.backlog == 3


def without_owner() -> dict[str, Any]:
    pod = replicaset_pod()
    del pod["metadata"]["ownerReferences"]
    return review(pod)


def dry_run() -> dict[str, Any]:
    answered = review(replicaset_pod())
    answered["request"]["dryRun"] = True
    return answered


def forged_owner(value: Any) -> dict[str, Any]:
    pod = replicaset_pod()
    pod["metadata"]["ownerReferences"] = value
    return review(pod)


@pytest.mark.parametrize("answered", [
    without_owner(), dry_run(), forged_owner("ReplicaSet/x"), forged_owner([{"kind": 3}]),
    forged_owner([{"apiVersion": "v1", "kind": "X", "name": "n" * 300, "uid": "u"}]),
    {"request": None}, {},
], ids=["no-owner", "dry-run", "owners-a-string", "owner-kind-a-number", "owner-name-too-long",
        "request-null", "empty"])
def test_no_event_without_a_well_formed_owner_or_for_a_dry_run(answered: dict[str, Any]
                                                              ) -> None:
    events_of = recorder()
    events_of.observe(outcome("injected", "namespace-enabled"), answered)
    assert events_of.backlog == 0


@pytest.mark.parametrize("namespace", ["../../secrets", "Shop", "", "a" * 64])
def test_a_namespace_kubernetes_would_not_allow_gets_no_event(namespace: str) -> None:
    events_of = recorder()
    events_of.observe(outcome("injected", "namespace-enabled", namespace),
                      review(replicaset_pod()))
    assert events_of.backlog == 0


def test_the_queue_is_bounded_and_drops_what_does_not_fit() -> None:
    events_of = recorder(window_seconds=0)
    for index in range(events.QUEUE_SIZE + 50):
        pod = copy.deepcopy(replicaset_pod())
        pod["metadata"]["ownerReferences"][0]["uid"] = f"uid-{index}"
        events_of.observe(outcome("injected", "namespace-enabled"), review(pod))
    assert events_of.backlog == events.QUEUE_SIZE
    assert events_of.dropped == 50


@pytest.fixture
def serving(tmp_path: Path, fake_kube: RunningFakeKube) -> Iterator[Server]:
    """A server with a Kubernetes API (the fake one, which has no Events at all: every write
    of one is refused with 404)."""
    fake_kube.api.store.add_namespace("shop", {"istio-injection": "enabled"})
    server = start_server(tmp_path, "--kubeconfig", str(fake_kube.kubeconfig))
    yield server
    server.stop()


def admit_many(server: Server, count: int) -> None:
    with server.client() as https:
        for index in range(count):
            pod = replicaset_pod()
            pod["metadata"]["ownerReferences"][0]["uid"] = f"owner-{index}"
            answer = https.post("/inject", json=review(pod))
            assert answer.status_code == 200
            assert answer.json()["response"]["patch"], "not injected"


def test_refused_event_writes_do_not_fail_admissions(serving: Server,
                                                     fake_kube: RunningFakeKube) -> None:
    admit_many(serving, 10)
    eventually(lambda: ("POST", "/api/v1/namespaces/shop/events") in fake_kube.api.requests,
               15, what="an Event written")
    eventually(lambda: "events: cannot write an Event in shop" in serving.log(), 15,
               what="the refused write logged")
    assert serving.log().count("events: cannot write an Event") == 1  # once a minute at most
    assert "Traceback" not in serving.log()


def test_an_api_that_has_gone_does_not_fail_admissions(serving: Server,
                                                       fake_kube: RunningFakeKube) -> None:
    fake_kube.stop()
    admit_many(serving, 10)
    eventually(lambda: "events: cannot write an Event in shop" in serving.log(), 15,
               what="the failed write logged")
    admit_many(serving, 5)
