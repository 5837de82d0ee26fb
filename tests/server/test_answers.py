"""Answers remembered but for their uid (injector.server.answers): a review seen before, with
another uid, gets exactly the answer a server that never saw it would give; anything else is
answered afresh."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from injector.mesh.config import MeshConfig
from injector.server.answers import Answers
from injector.server.app import Admission
from tests.support.pods import pod, replicaset_pod, review

MESH = MeshConfig()


def unknown(_: str) -> None:
    return None


def body_of(document: Mapping[str, Any], uid: str) -> bytes:
    copy = orjson.loads(orjson.dumps(document))
    copy["request"]["uid"] = uid
    return orjson.dumps(copy)


def answer(admission: Admission, body: bytes) -> tuple[int, bytes]:
    return admission.answer(body, time.perf_counter())


def fresh(body: bytes, labels: Any = unknown) -> tuple[int, bytes]:
    """The answer of a server that never saw a review before."""
    return answer(Admission(MESH, labels), body)


REVIEWS = {
    "injected": review(replicaset_pod()),
    "skipped (host network)": review(pod(hostNetwork=True)),
    "ignored namespace": review(pod(), namespace="kube-system"),
    "refused (bad annotation)": review(pod(annotations={
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/33"})),
    "not a create": review(pod(), operation="UPDATE"),
}


@pytest.mark.parametrize("name", REVIEWS)
def test_a_review_seen_before_with_another_uid_gets_a_fresh_servers_answer(name: str) -> None:
    admission = Admission(MESH, unknown)
    for uid in ("5f0c-first", "a3e1b2c4-0000-4a1b-9c3d-2b1e4f5a6b7c", "7"):
        body = body_of(REVIEWS[name], uid)
        assert answer(admission, body) == fresh(body)
        assert orjson.loads(answer(admission, body)[1])["response"]["uid"] == uid
    assert len(admission.answers) == 1


def test_what_cannot_be_told_apart_by_its_bytes_is_answered_afresh() -> None:
    # The uid elsewhere in the review (here as the pod's name); a string with an escape in it
    # (a key could hide behind it); a uid of other characters: each answered in full.
    named_like_uid = review(pod(name="0123-4567"))
    escaped = review(pod(annotations={"note": 'say "hi"'}))
    for document, uid in ((named_like_uid, "0123-4567"), (escaped, "0123-4567"),
                          (review(pod()), "uid.with.dots")):
        admission = Admission(MESH, unknown)
        body = body_of(document, uid)
        for _ in range(3):
            assert answer(admission, body) == fresh(body)
        assert len(admission.answers) == 0
    assert Answers.split(b'{"request":{"uid":"abc"}}') == (
        (b'{"request":{"uid":"', b'"}}'), b"abc")
    assert Answers.split(b'{"request":{"uid":"a\\"b"}}') is None
    assert Answers.split(b"{" + b" " * Answers.MAX_BODY_BYTES + b"}") is None


def test_a_relabelled_namespace_gets_a_fresh_decision() -> None:
    labels = {"istio-injection": "enabled"}
    admission = Admission(MESH, lambda namespace: labels if namespace == "shop" else None)
    for uid in ("first", "second", "third"):  # the last one answered from memory
        body = body_of(review(pod()), uid)
        assert orjson.loads(answer(admission, body)[1])["response"].get("patch")
    assert len(admission.answers) == 1
    labels["istio-injection"] = "disabled"  # changed in place, as a watch might
    refused = answer(admission, body_of(review(pod()), "second"))
    assert "patch" not in orjson.loads(refused[1])["response"]
    assert refused == fresh(body_of(review(pod()), "second"), lambda namespace: labels)


def test_a_review_seen_once_is_not_kept() -> None:
    # Every pod different (a new spec each time): nothing is kept, however many there are.
    admission = Admission(MESH, unknown)
    for index in range(50):
        document = review(replicaset_pod())
        document["request"]["object"]["metadata"]["labels"]["app"] = f"app-{index}"
        answer(admission, body_of(document, f"uid-{index}"))
    assert len(admission.answers) == 0


def counted(result: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("injector_admission_requests_total",
                                      {"result": result, "reason": reason})
    return value or 0.0


def test_an_answer_from_memory_is_counted_and_logged_as_any(
        caplog: pytest.LogCaptureFixture) -> None:
    admission = Admission(MESH, unknown)
    for uid in ("first", "second"):
        answer(admission, body_of(review(replicaset_pod()), uid))
    before = counted("injected", "namespace-enabled")
    with caplog.at_level("INFO", logger="injector.webhook"):
        answer(admission, body_of(review(replicaset_pod()), "third"))
    assert len(admission.answers) == 1
    assert counted("injected", "namespace-enabled") == before + 1
    [record] = [record for record in caplog.records if record.name == "injector.webhook"]
    assert record.getMessage().endswith("injected (namespace-enabled)")
    assert record.fields["result"] == "injected"  # type: ignore[attr-defined]


def test_over_https_each_replica_gets_its_own_uid(client: httpx.Client) -> None:
    document = review(replicaset_pod())
    answers = [client.post("/inject", content=body_of(document, f"replica-{index}"),
                           headers={"content-type": "application/json"}).json()
               for index in range(4)]
    assert [item["response"]["uid"] for item in answers] == [
        "replica-0", "replica-1", "replica-2", "replica-3"]
    assert answers[0]["response"]["patch"] == answers[2]["response"]["patch"]


def test_the_events_see_each_admission_with_its_own_review() -> None:
    seen: list[tuple[Any, Any]] = []
    admission = Admission(MESH, unknown, lambda outcome, review: seen.append((outcome, review)))
    bodies = [body_of(review(replicaset_pod()), uid) for uid in ("first", "second", "third")]
    answers = [answer(admission, body)[1] for body in bodies]
    assert len(admission.answers) == 1  # the third from memory
    assert [outcome.body for outcome, _ in seen] == answers
    assert [review["request"]["uid"] for _, review in seen] == ["first", "second", "third"]
    assert [outcome.result for outcome, _ in seen] == ["injected"] * 3
