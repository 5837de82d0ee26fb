"""Hostile callers over HTTPS, against a real `injector serve`: every JSON type in every position
of a review, a certificate request and a manifest (tests/support/mutator.py), and the issue's
rows of a single request that used to take memory or the event loop.

The case count per target is `INJECTOR_FUZZ_CASES` (default: every single change of each
document, a few thousand in all); `bench/bench_fuzz.py` runs many more.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from injector.mesh.config import MeshConfig
from tests.support import mutator
from tests.support.certs import make_csr, p256
from tests.support.pods import pod, review
from tests.support.servers import WEB_TOKEN, Server

JSON = {"content-type": "application/json"}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def assert_healthy(server: Server, client: httpx.Client) -> None:
    assert server.process.poll() is None, server.log()[-3000:]
    assert client.get("/healthz").status_code == 200


def assert_no_failures(run: mutator.Run) -> None:
    shown = "\n".join(run.failures[:20])
    assert not run.failures, f"{len(run.failures)} of {run.cases} {run.target} cases:\n{shown}"


def test_every_type_in_every_position_of_a_review(ca_server: Server,
                                                  ca_client: httpx.Client) -> None:
    document = mutator.review_document()

    def send(case: mutator.Case) -> str | None:
        body = mutator.encode(case.document)
        reply = ca_client.post("/inject", content=body, headers=JSON)
        return mutator.inject_problem(body, reply.status_code, reply.content)

    count = mutator.case_count(mutator.systematic_count(document))
    run = mutator.run("review", document, count, send)
    assert run.cases == count
    assert_no_failures(run)
    assert_healthy(ca_server, ca_client)


def test_every_type_in_every_position_of_a_certificate_request(
        ca_server: Server, ca_client: httpx.Client) -> None:
    document = mutator.csr_document(make_csr(p256()).decode())
    headers = {**JSON, "authorization": f"Bearer {WEB_TOKEN}"}

    def send(case: mutator.Case) -> str | None:
        reply = ca_client.post("/v1/certificates", content=mutator.encode(case.document),
                               headers=headers)
        return mutator.certificate_problem(reply.status_code, reply.content)

    # Few positions: the single changes, then combinations of them.
    run = mutator.run("certificate request", document,
                      mutator.case_count(4 * mutator.systematic_count(document)), send)
    assert_no_failures(run)
    assert_healthy(ca_server, ca_client)


def test_every_type_in_every_position_of_a_manifest() -> None:
    document, mesh = mutator.manifest_document(), MeshConfig()

    def inject(case: mutator.Case) -> str | None:
        return mutator.manifest_problem(mutator.encode(case.document).decode(), mesh)

    run = mutator.run("manifest", document,
                      mutator.case_count(mutator.systematic_count(document)), inject)
    assert_no_failures(run)


def test_twenty_7_mib_proxy_images_do_not_stay_in_memory(ca_server: Server,
                                                         ca_client: httpx.Client) -> None:
    # The row: RSS 64 MB -> 555 MB, never released (the caches kept every image).
    ca_client.post("/inject", json=review(pod()))  # the first admission's own allocations
    before = rss_bytes(ca_server.process.pid)
    for index in range(20):
        image = f"registry.local/{index}/" + "i" * (7 * 1024 * 1024)
        reply = ca_client.post("/inject", json=review(pod(annotations={
            "sidecar.istio.io/proxyImage": image})), timeout=60)
        response = reply.json()["response"]
        assert response["allowed"] is False
        assert "over Kubernetes' limit of 262144" in response["status"]["message"]
        assert len(reply.content) < 2000  # the image is not echoed back
    grown = rss_bytes(ca_server.process.pid) - before
    assert grown < 150 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert_healthy(ca_server, ca_client)


def test_a_big_proxy_config_flow_list_leaves_healthz_answering(
        ca_server: Server, ca_client: httpx.Client) -> None:
    # The row: PyYAML blocked the event loop 11.8 s on 256 KiB of it, and /healthz was
    # silent. 190 KiB here: under Kubernetes' 256 KiB and the server's 100,000 JSON values, so
    # it reaches the annotation's parser (PyYAML took 2.5 s on it).
    flow_list = "[" + "1," * 95_000 + "1]"
    body = review(pod(annotations={"proxy.istio.io/config": flow_list}))
    replies: list[httpx.Response] = []

    def hostile() -> None:
        with ca_server.client(timeout=60) as own:
            replies.append(own.post("/inject", json=body))

    sender = threading.Thread(target=hostile)
    sender.start()
    try:
        with ca_server.client(timeout=1) as probe:
            for _ in range(20):  # while the hostile request is in flight, and after
                assert probe.get("/healthz").status_code == 200
    finally:
        sender.join(timeout=60)
    response: dict[str, Any] = replies[0].json()["response"]
    assert response["allowed"] is False
    assert "proxy.istio.io/config" in response["status"]["message"]
    assert "longer than 4096 characters" in response["status"]["message"]
