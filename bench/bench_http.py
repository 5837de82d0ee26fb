"""Admission over HTTPS with keep-alive, and the RSS of `injector serve`.

`injector serve` (default settings, JSON logs to a file) answers a typical ReplicaSet pod's
AdmissionReview; two baselines on the same uvicorn settings and TLS context (bench.echo_server)
read a body of the same size: a raw ASGI echo (the limit for Python on this stack) and a FastAPI
echo route that parses it with orjson (the framework's floor). wrk drives each at concurrency 1,
16 and 64, the three interleaved round after round. Throughput and latency are the median
round's (the best round's throughput is shown too); ratios are the median over rounds of the
ratio within a round (runs seconds apart), steadier on a shared machine than a ratio of two
figures taken minutes apart.

Idle RSS is read once `serve` answers; loaded RSS (now and peak) after the last round; then
idle memory in each configuration: with or without a Kubernetes API, with or without Istio's gRPC
CA, the last two together being what deploy/ ships.
Run alone with `python -m bench.bench_http`.
"""

from __future__ import annotations

import base64
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import harness
from tests.support.pods import replicaset_pod, review
from tests.support.servers import free_port

TARGETS = {"inject": 0.80, "inject_vs_raw": 0.35, "p99_ms": 10.0, "idle_rss_mib": 80.0}


def typical_review() -> bytes:
    return orjson.dumps(review(replicaset_pod()))


def _check_answers(servers: dict[str, harness.Server], body: bytes, certs: Path) -> None:
    """Each server answers the body with 200; serve really injects (a patch, allowed)."""
    verify = str(certs / "root-cert.pem")
    for name, server in servers.items():
        reply = httpx.post(f"{server.url}/inject", content=body, verify=verify, timeout=10,
                           headers={"content-type": "application/json"})
        if reply.status_code != 200:
            raise RuntimeError(f"{name}: HTTP {reply.status_code} {reply.text[:200]}")
        if name == "inject":
            response = reply.json()["response"]
            if not (response["allowed"] and base64.b64decode(response["patch"])):
                raise RuntimeError(f"serve did not inject: {reply.text[:300]}")


# The configurations whose idle memory is reported: (Kubernetes API, gRPC CA). deploy/ ships
# the last: a Kubernetes API (in-cluster) and Istio's gRPC CA on 15012.
RSS_CONFIGURATIONS = {
    "no API, no gRPC CA": (False, False),
    "gRPC CA": (False, True),
    "API": (True, False),
    "API + gRPC CA (as shipped)": (True, True),
}
AS_SHIPPED = "API + gRPC CA (as shipped)"
# `injector serve` with only what the image installs (the Dockerfile's `pip install .`): the
# kubernetes package imports kubernetes_validate when it is there (kubernetes.dynamic), and with
# it jsonschema, 2.7 MiB in all; it is one of our test dependencies, absent from the image.
_AS_INSTALLED = ("import sys; sys.modules['kubernetes_validate'] = None; "
                 "from injector.commands.cli import main; sys.exit(main())")
# What is read from /proc/PID/status and /proc/PID/smaps_rollup, in KiB.
_STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile")
_ROLLUP_FIELDS = ("Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Anonymous")


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS split into anonymous and file-backed pages, and smaps_rollup's private, shared and
    proportional figures: the file-backed part is shared libraries' pages (the same for every
    worker, and for every process that maps them), the anonymous part this process's own."""
    figures: dict[str, int] = {}
    for name, fields in (("status", _STATUS_FIELDS), ("smaps_rollup", _ROLLUP_FIELDS)):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                figures[key] = int(value.split()[0])
    return figures


def _idle_rss_by_configuration(workdir: Path) -> dict[str, dict[str, float]]:
    """Idle memory (MiB) of `serve` without and with a Kubernetes API (the tests' fake API
    server: the kubernetes client loaded, the namespace watch and the other cluster duties
    running) and without and with Istio's gRPC CA (on a free port), each read 2 s after it
    answers, a configuration at a time, all with the same certificates, each with only the
    packages the image installs."""
    from tests.support.fakeapi import start_fake_kube

    workdir.mkdir()
    certs = harness.certs_dir(workdir)
    kube = start_fake_kube(workdir)
    figures: dict[str, dict[str, float]] = {}
    try:
        for index, (name, (api, grpc)) in enumerate(RSS_CONFIGURATIONS.items()):
            args = ["-c", _AS_INSTALLED, "serve", "--certs-dir", str(certs)]
            if api:
                args += ["--kubeconfig", str(kube.kubeconfig)]
            grpc_port = str(free_port()) if grpc else "0"
            server = harness.start(f"rss-{index}", args, workdir, certs,
                                   env={"INJECTOR_GRPC_PORT": grpc_port})
            try:
                time.sleep(2)
                figures[name] = {key: kib / 1024
                                 for key, kib in _memory_kib(server.process.pid).items()}
            finally:
                server.stop()
    finally:
        kube.stop()
    return figures


def _workers_scaling(workdir: Path, certs: Path, script: Path) -> dict[str, Any]:
    """`serve` with one worker and with one per core, nothing pinned (wrk takes its share of
    the same cores), interleaved round by round: what `--workers` buys on this machine."""
    counts = {"1": 1, "all": max(2, len(harness.CPUS))}
    servers = {
        name: harness.start(f"inject-{count}w",
                            ["-m", "injector", "serve", "--certs-dir", str(certs),
                             "--workers", str(count)], workdir, certs, pin=False)
        for name, count in counts.items()
    }
    try:
        runs = harness.interleaved(servers, "/inject", script, (16, 64), pin=False)
    finally:
        for server in servers.values():
            server.stop()
    scaling: dict[str, Any] = {"workers": counts["all"]}
    print(f"--workers {counts['all']} against 1 worker, nothing pinned (wrk shares the cores):")
    for connections in (16, 64):
        for name in ("1", "all"):
            load = harness.median(runs[(name, connections)])
            ratio = _median_ratio(runs, name, "1", connections)
            scaling[f"workers_{name}_c{connections}"] = {
                "requests_per_second": load.per_second, "p50_ms": load.p50_ms,
                "p99_ms": load.p99_ms, "ratio_to_one_worker": ratio,
                "non_2xx": sum(run.non_2xx for run in runs[(name, connections)]),
            }
            print(f"{connections:4} {counts[name]} worker(s) {load.per_second:8.0f} req/s "
                  f"p50 {load.p50_ms:6.2f} ms p99 {load.p99_ms:6.2f} ms  x{ratio:.2f}")
    return scaling


def _median_ratio(runs: dict[tuple[str, int], list[harness.Load]], name: str, baseline: str,
                  connections: int) -> float:
    return statistics.median(
        ours.per_second / theirs.per_second
        for ours, theirs in zip(runs[(name, connections)], runs[(baseline, connections)],
                                strict=True))


def main() -> dict[str, Any]:
    if not harness.have_wrk():
        print("wrk is not installed (Debian package wrk): skipped")
        return {"skipped": "wrk not installed"}
    body = typical_review()
    results: dict[str, Any] = {"body_bytes": len(body), "pinned": harness.PINNED,
                               "seconds_per_run": harness.SECONDS, "rounds": harness.ROUNDS}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        workdir = Path(tmp)
        certs = harness.certs_dir(workdir)
        servers: dict[str, harness.Server] = {}
        try:
            servers["inject"] = harness.start(
                "inject", ["-m", "injector", "serve", "--certs-dir", str(certs)], workdir, certs)
            time.sleep(1)
            idle = servers["inject"].rss_kib()
            servers["raw"] = harness.start(
                "raw", ["-m", "bench.echo_server", "raw", "--certs-dir", str(certs)],
                workdir, certs)
            servers["fastapi"] = harness.start(
                "fastapi", ["-m", "bench.echo_server", "fastapi", "--certs-dir", str(certs)],
                workdir, certs)
            _check_answers(servers, body, certs)
            script = harness.wrk_script(body, {"Content-Type": "application/json"}, workdir)
            runs = harness.interleaved(
                {name: servers[name] for name in ("raw", "fastapi", "inject")}, "/inject",
                script, harness.CONCURRENCY)
            loaded = servers["inject"].rss_kib()
        finally:
            for server in servers.values():
                server.stop()
        scaling = _workers_scaling(workdir, certs, script)
        by_configuration = _idle_rss_by_configuration(workdir / "rss")

    print(f"typical AdmissionReview: {len(body)} bytes; server and wrk pinned to their own "
          f"cores: {harness.PINNED}; {harness.ROUNDS} rounds of {harness.SECONDS} s: median "
          "round's req/s and latency, median ratio within rounds")
    print(f"{'conc':>4} {'server':8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} "
          f"{'vs fastapi':>10} {'vs raw':>7} {'best req/s':>10} {'its p99':>7}")
    table: dict[str, Any] = {}
    for connections in harness.CONCURRENCY:
        for name in ("raw", "fastapi", "inject"):
            load = harness.median(runs[(name, connections)])
            best = harness.best(runs[(name, connections)])
            vs_fastapi = _median_ratio(runs, name, "fastapi", connections)
            vs_raw = _median_ratio(runs, name, "raw", connections)
            table[f"{name}_c{connections}"] = {
                "requests_per_second": load.per_second, "p50_ms": load.p50_ms,
                "p90_ms": load.p90_ms, "p99_ms": load.p99_ms, "max_ms": load.max_ms,
                "non_2xx": sum(run.non_2xx for run in runs[(name, connections)]),
                "socket_errors": sum(run.socket_errors for run in runs[(name, connections)]),
                "ratio_to_fastapi_echo": vs_fastapi, "ratio_to_raw_echo": vs_raw,
                "all_rounds_per_second": [run.per_second for run in runs[(name, connections)]],
                "best_round": {"requests_per_second": best.per_second, "p50_ms": best.p50_ms,
                               "p99_ms": best.p99_ms},
            }
            row = table[f"{name}_c{connections}"]
            print(f"{connections:4} {name:8} {load.per_second:8.0f} {load.p50_ms:7.2f} "
                  f"{load.p99_ms:7.2f} {row['non_2xx']:7} {vs_fastapi:10.2f} {vs_raw:7.2f} "
                  f"{best.per_second:10.0f} {best.p99_ms:7.2f}")
    results["runs"] = table
    results["workers"] = scaling
    at16 = table["inject_c16"]
    rss: dict[str, Any] = {
        "idle_rss_mib": idle["VmRSS"] / 1024, "loaded_rss_mib": loaded["VmRSS"] / 1024,
        "peak_rss_mib": loaded["VmHWM"] / 1024,
        "idle_rss_with_api_mib": by_configuration["API"]["VmRSS"],
        "idle_rss_as_shipped_mib": by_configuration[AS_SHIPPED]["VmRSS"],
        "idle_by_configuration_mib": by_configuration}
    results["rss"] = rss
    print(f"RSS of injector serve: idle {rss['idle_rss_mib']:.1f} MiB, after load "
          f"{rss['loaded_rss_mib']:.1f} MiB (peak {rss['peak_rss_mib']:.1f} MiB)")
    print(f"idle memory by configuration, MiB: {'VmRSS':>6} {'anon':>6} {'file':>6} "
          f"{'private':>7} {'shared':>6}")
    for name, memory in by_configuration.items():
        private = memory["Private_Clean"] + memory["Private_Dirty"]
        print(f"  {name:31} {memory['VmRSS']:6.1f} {memory['RssAnon']:6.1f} "
              f"{memory['RssFile']:6.1f} {private:7.1f} {memory['Shared_Clean']:6.1f}")
    verdicts = {
        "inject_c16_vs_fastapi_echo >= 0.80": at16["ratio_to_fastapi_echo"] >= TARGETS["inject"],
        "inject_c16_vs_raw_echo >= 0.35": at16["ratio_to_raw_echo"] >= TARGETS["inject_vs_raw"],
        "inject_c16_p99 < 10 ms": at16["p99_ms"] < TARGETS["p99_ms"],
        "idle_rss < 80 MiB": rss["idle_rss_mib"] < TARGETS["idle_rss_mib"],
        "idle_rss with an API < 80 MiB": (
            rss["idle_rss_with_api_mib"] < TARGETS["idle_rss_mib"]),
        "idle_rss as shipped (API + gRPC CA) < 80 MiB": (
            rss["idle_rss_as_shipped_mib"] < TARGETS["idle_rss_mib"]),
    }
    results["targets"] = verdicts
    harness.report_targets(verdicts)
    return results


if __name__ == "__main__":
    main()
