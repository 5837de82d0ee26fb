"""What the webhook adds to pod creation as the API server sees it: the latency of `POST
/api/v1/namespaces/<ns>/pods` through a real kube-apiserver (and etcd), in a namespace labelled
`istio-injection=enabled` (the API server calls the injector, applies its patch, validates and
stores the larger pod) against an unlabelled one (no webhook call), with deploy/ applied and
`injector serve` behind its webhooks, as in the cluster tests (tests/support/cluster.py).

One client, one pod at a time, over one keep-alive HTTPS connection as the admin; the two
namespaces take turns round after round (in reverse order every other round), and the ratios
are taken within a round, then the median over rounds. etcd runs without fsync in a temporary
directory: absolute times are lower than on a real cluster's disks; the ratio is the figure.

Run alone with `python -m bench.bench_cluster` (the binaries: `make cluster-binaries`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from tests.support.cluster import Cluster, install_mesh, start_cluster
from tests.support.pods import pod

PODS = int(os.environ.get("BENCH_PODS", "200"))
WARMUP_PODS = 20


def _manifest(namespace: str) -> dict[str, Any]:
    manifest = pod()
    manifest["metadata"] = {"generateName": "bench-", "namespace": namespace,
                            "labels": {"app": "bench"}}
    return manifest


def _create_pods(api: httpx.Client, namespace: str, count: int, injected: bool) -> list[float]:
    """Milliseconds per create, each checked: stored (201), injected or not as expected."""
    path = f"/api/v1/namespaces/{namespace}/pods"
    body = _manifest(namespace)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        answer = api.post(path, json=body)
        times.append((time.perf_counter() - started) * 1000)
        if answer.status_code != 201:
            raise RuntimeError(f"pod create in {namespace}: HTTP {answer.status_code} "
                               f"{answer.text[:300]}")
        names = [c["name"] for c in answer.json()["spec"]["containers"]]
        if ("istio-proxy" in names) is not injected:
            raise RuntimeError(f"pod in {namespace} injected={not injected}: {names}")
    return times


def _percentile(times: list[float], fraction: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(cluster: Cluster) -> dict[str, Any]:
    labelled = cluster.namespace("bench-meshed", {"istio-injection": "enabled"})
    unlabelled = cluster.namespace("bench-plain")
    cases = {"labelled": (labelled, True), "unlabelled": (unlabelled, False)}
    rounds: list[dict[str, dict[str, float]]] = []
    with cluster.admin_client() as api:
        for namespace, injected in cases.values():
            _create_pods(api, namespace, WARMUP_PODS, injected)
        for index in range(harness.ROUNDS):
            order = list(cases) if index % 2 == 0 else list(reversed(cases))
            figures = {}
            for name in order:
                namespace, injected = cases[name]
                times = _create_pods(api, namespace, PODS, injected)
                figures[name] = {"p50_ms": _percentile(times, 0.50),
                                 "p99_ms": _percentile(times, 0.99)}
            rounds.append(figures)
    result: dict[str, Any] = {"pods_per_round": PODS, "rounds": rounds}
    for name in cases:
        for key in ("p50_ms", "p99_ms"):
            result[f"{name}_{key}"] = statistics.median(r[name][key] for r in rounds)
    for key in ("p50_ms", "p99_ms"):
        result[f"ratio_{key.removesuffix('_ms')}"] = statistics.median(
            r["labelled"][key] / r["unlabelled"][key] for r in rounds)
    return result


def main() -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = start_cluster(workdir / "cluster")
    try:
        mesh = install_mesh(cluster, workdir / "mesh")
        try:
            result = measure(cluster)
        finally:
            mesh.stop_injector()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"pod creates through kube-apiserver, {PODS} a round, {harness.ROUNDS} rounds: "
          "median round; ratio: median of the within-round ratios")
    print(f"{'namespace':<12} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("unlabelled", "labelled"):
        print(f"{name:<12} {result[f'{name}_p50_ms']:>8.2f} {result[f'{name}_p99_ms']:>8.2f}")
    print(f"{'ratio':<12} {result['ratio_p50']:>8.2f} {result['ratio_p99']:>8.2f}")
    return result


if __name__ == "__main__":
    main()
