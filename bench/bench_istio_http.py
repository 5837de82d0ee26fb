"""Admission over HTTPS beside Istio's injection webhook, on one core each, in one run.

Three servers answer the same AdmissionReview bodies on `POST /inject`, each started on the
server core (`taskset`), one at a time in turn under wrk on the client core:

- `istio`: Istio's own webhook handler (`inject.NewWebhook` with the templates, values and mesh
  config of Istio's default istio-discovery chart) behind Go's TLS server: tests/istio/webhook,
  built by tests/istio/build.sh (`make cluster-binaries`), with GOMAXPROCS=1;
- `inject`: `injector serve` with one worker (default settings, JSON logs to a file);
- `raw`: the raw ASGI echo of bench.echo_server on serve's own uvicorn and TLS settings, which
  reads the body and answers a fixed small JSON: the limit of Python's stack on this core.

Both injectors' answers are checked once before the load (an allowed AdmissionReview whose JSON
patch adds an `istio-proxy` container), so a refusal is never timed. The bodies: the typical
ReplicaSet pod of bench_http at concurrency 1, 16 and 64; at 16, a bigger pod (10 containers, 10
env vars each, as bench_inject), and the typical pod with another app label in every request, so
that our patch cache (the pods of one ReplicaSet, alike at admission, share a patch; Istio has
no such cache) never answers: the comparison without it. Rounds are interleaved
(`harness.interleaved`); figures are the median round's, ratios the median over rounds of the
ratio within a round. Beside them, each server's CPU time per request (all its processes, from
/proc; the median over rounds): on a machine shared with other work it is steadier than
throughput, which counts the time the server waited for its core. Idle RSS is each server's
once it answers and has been idle for a second.

`--workers 2` against one worker when wrk has its own core: this machine has two cores, so two
workers and wrk cannot each have one, and nothing here pretends otherwise. With three cores or
more it is measured outright (one worker on one core, two workers on two, wrk on a core of its
own). On two cores, two figures are reported, each labelled for what it is:

- measured, shared: one worker pinned with wrk on the other core, against two workers on both
  cores with wrk running among them (taking its share of them); a lower bound of the scaling;
- projected from CPU time: each run's server CPU seconds (all processes, from /proc) and wrk's
  (rusage) are read; two workers' requests per server CPU-second times the two cores they
  would have, against one worker's requests per server CPU-second times its one core. It
  assumes that a worker with a whole core would use all of it (the server is CPU-bound, no
  waiting on anything) and that two workers on two idle cores cost per request what they cost
  sharing them with wrk; the CPU each used per second of the run is printed beside it.

A separate network namespace for wrk (a veth pair) was considered and not used: it separates
the network stack, not the CPUs, and the two cores would still be shared three ways.

Run alone with `python -m bench.bench_istio_http` (BENCH_SECONDS and BENCH_ROUNDS shorten it).
"""

from __future__ import annotations

import base64
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import harness
from bench.bench_http import typical_review
from tests.support.pods import pod, replicaset_pod, review

TARGETS = {"vs_istio": 1.0, "p99_vs_istio": 1.0, "vs_raw": 0.5, "workers": 1.6,
           "idle_rss_mib": 80.0}
BIG_CONCURRENCY = (16,)
# In the varied body, each request's own number in the pod's app label (see `varied_review`).
SEQUENCE = "@SEQ@"
SERVERS = ("istio", "inject", "raw")
WORKER_CONCURRENCY = (16, 64)


def bigger_review() -> bytes:
    """A pod of 10 containers with 10 env vars each (bench_inject's), as one review."""
    containers = [{"name": f"app-{index}", "image": "registry.local/app:1.0",
                   "env": [{"name": f"VAR_{n}", "value": f"value-{n}"} for n in range(10)],
                   "ports": [{"containerPort": 8080 + index}]} for index in range(10)]
    return orjson.dumps(review(pod(containers=containers)))


def varied_review() -> bytes:
    """The typical review with SEQUENCE in its app label, which wrk replaces by a new number
    each request: every pod a different app, so that its added labels (Istio's canonical name)
    differ and our injector's patch cache (injector.injection.patch: the pods of one
    ReplicaSet, alike at admission, share a patch) never answers one. Istio has no such cache."""
    pod_object = replicaset_pod()
    pod_object["metadata"]["labels"]["app"] = f"reviews-{SEQUENCE}"
    return orjson.dumps(review(pod_object))


def adds_proxy(answer: Mapping[str, Any]) -> bool:
    """Whether an AdmissionReview answer allows the pod with a JSON patch that adds a container
    named istio-proxy (as a whole containers list, or one container)."""
    response = answer.get("response") or {}
    if not response.get("allowed") or not response.get("patch"):
        return False
    for operation in orjson.loads(base64.b64decode(response["patch"])):
        if operation.get("op") != "add" or not str(operation.get("path", "")).startswith(
                ("/spec/containers", "/spec/initContainers")):
            continue
        value = operation.get("value")
        added = value if isinstance(value, list) else [value]
        if any(isinstance(item, dict) and item.get("name") == "istio-proxy" for item in added):
            return True
    return False


def _check_answers(servers: Mapping[str, harness.Server], bodies: Mapping[str, bytes],
                   certs: Path) -> None:
    """Every server answers every body with 200; both injectors inject (allowed, a patch that
    adds istio-proxy), so that neither is timed refusing."""
    verify = ssl.create_default_context(cafile=str(certs / "root-cert.pem"))
    for name, server in servers.items():
        for body_name, body in bodies.items():
            reply = httpx.post(f"{server.url}/inject", verify=verify, timeout=30,
                               content=body.replace(SEQUENCE.encode(), b"0"),
                               headers={"content-type": "application/json"})
            if reply.status_code != 200:
                raise RuntimeError(f"{name}, {body_name}: HTTP {reply.status_code} "
                                   f"{reply.text[:300]}")
            if name != "raw" and not adds_proxy(reply.json()):
                raise RuntimeError(f"{name} did not inject the {body_name}: {reply.text[:500]}")


def istio_webhook_command(certs: Path) -> list[str]:
    """tests/istio/webhook, built, with the dev serving pair and Istio's charts from the Go
    module cache (failing, with how to build it, when it is missing)."""
    from tests.support.istio_parity import manifests_dir
    from tests.support.peers import ISTIO_SCRIPT, built

    return [str(built(ISTIO_SCRIPT, "webhook")), "--cert", str(certs / "tls.crt"),
            "--key", str(certs / "tls.key"), "--manifests", str(manifests_dir())]


def _median_ratio(runs: Mapping[tuple[str, int], list[harness.Load]], name: str, baseline: str,
                  connections: int, figure: str = "per_second") -> float:
    """The median over rounds of name's figure over baseline's, within each round."""
    return statistics.median(
        float(getattr(ours, figure)) / float(getattr(theirs, figure))
        for ours, theirs in zip(runs[(name, connections)], runs[(baseline, connections)],
                                strict=True))


def _table(runs: Mapping[tuple[str, int], list[harness.Load]],
           concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """Per concurrency and server: the median round's figures, the best round's throughput, and
    the ratios within rounds: ours/Istio's throughput, Istio's p99 over ours, ours/raw echo."""
    print(f"{'conc':>4} {'server':7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} "
          f"{'best req/s':>10} {'CPU µs/req':>10}")
    table: dict[str, Any] = {}
    for connections in concurrencies:
        for name in SERVERS:
            loads = runs[(name, connections)]
            load, best = harness.median(loads), harness.best(loads)
            cpu_per_request = statistics.median(
                run.extra["server_cpu_s"] * 1e6 / run.requests for run in loads if run.requests)
            table[f"{name}_c{connections}"] = {
                "requests_per_second": load.per_second, "p50_ms": load.p50_ms,
                "p90_ms": load.p90_ms, "p99_ms": load.p99_ms, "max_ms": load.max_ms,
                "non_2xx": sum(run.non_2xx for run in loads),
                "socket_errors": sum(run.socket_errors for run in loads),
                "all_rounds_per_second": [run.per_second for run in loads],
                "best_round": {"requests_per_second": best.per_second, "p99_ms": best.p99_ms},
                "server_cpu_us_per_request": cpu_per_request,
            }
            print(f"{connections:4} {name:7} {load.per_second:8.0f} {load.p50_ms:7.2f} "
                  f"{load.p99_ms:7.2f} {table[f'{name}_c{connections}']['non_2xx']:7} "
                  f"{best.per_second:10.0f} {cpu_per_request:10.0f}")
        ratios = {
            "inject_vs_istio": _median_ratio(runs, "inject", "istio", connections),
            "istio_p99_vs_inject": _median_ratio(runs, "istio", "inject", connections,
                                                 "p99_ms"),
            "inject_vs_raw": _median_ratio(runs, "inject", "raw", connections),
            "istio_vs_raw": _median_ratio(runs, "istio", "raw", connections),
        }
        table[f"ratios_c{connections}"] = ratios
        print(f"{connections:4} ours/Istio x{ratios['inject_vs_istio']:.2f}, Istio's p99/ours "
              f"x{ratios['istio_p99_vs_inject']:.2f}, ours/raw echo "
              f"x{ratios['inject_vs_raw']:.2f} (Istio/raw echo x{ratios['istio_vs_raw']:.2f})")
    return table


def _serve(name: str, workdir: Path, certs: Path, workers: int, cpus: list[int] | None,
           pin: bool) -> harness.Server:
    """`injector serve --workers N`, on the server core (`pin`), on `cpus`, or anywhere."""
    command = [sys.executable, "-m", "injector", "serve", "--certs-dir", str(certs),
               "--workers", str(workers)]
    if cpus is not None:
        command = ["taskset", "-c", ",".join(map(str, cpus)), *command]
    return harness.start_command(name, command, workdir, certs, pin=pin)


def _workers_scaling(workdir: Path, certs: Path, script: Path) -> dict[str, Any]:
    """One worker against two, wrk on a core of its own where there is one for it; on two cores
    the shared measurement and the CPU-time projection (see the module's docstring)."""
    own_core = len(harness.CPUS) >= 3 and harness.PINNED
    if own_core:
        servers = {"one": _serve("workers-1", workdir, certs, 1, [harness.CPUS[-1]], False),
                   "two": _serve("workers-2", workdir, certs, 2, harness.CPUS[-2:], False)}
        wrk_pinned: bool | dict[str, bool] = True
    else:
        servers = {"one": _serve("workers-1", workdir, certs, 1, None, True),
                   "two": _serve("workers-2", workdir, certs, 2, None, False)}
        wrk_pinned = {"one": True, "two": False}
    try:
        runs = harness.interleaved(servers, "/inject", script, WORKER_CONCURRENCY,
                                   pin=wrk_pinned, measure_cpu=True)
    finally:
        for server in servers.values():
            server.stop()
    arrangement = ("measured: one worker on one core, two on two, wrk on its own core"
                   if own_core else
                   "2 cores: wrk cannot have its own; measured shared, and projected from "
                   "server CPU time")
    print(f"--workers 2 against 1 worker ({arrangement}):")
    scaling: dict[str, Any] = {"arrangement": arrangement, "wrk_own_core": own_core}
    for connections in WORKER_CONCURRENCY:
        one, two = runs[("one", connections)], runs[("two", connections)]
        measured = _median_ratio(runs, "two", "one", connections)
        row: dict[str, Any] = {
            "one_worker": _cpu_row(one), "two_workers": _cpu_row(two),
            "measured_ratio": measured,
        }
        line = (f"{connections:4} one worker {harness.median(one).per_second:7.0f} req/s "
                f"(server CPU {row['one_worker']['server_cpu_per_s']:.2f}/s), two workers "
                f"{harness.median(two).per_second:7.0f} req/s (server CPU "
                f"{row['two_workers']['server_cpu_per_s']:.2f}/s, wrk "
                f"{row['two_workers']['wrk_cpu_per_s']:.2f}/s): measured x{measured:.2f}")
        if not own_core:
            # Two whole cores' worth of two workers' requests per server CPU-second, over one
            # whole core's worth of one worker's: within each round. CPU time, not wall time,
            # so that neither wrk nor the machine's other work counts against either.
            projected = statistics.median(2 * _per_cpu_second(b) / _per_cpu_second(a)
                                          for a, b in zip(one, two, strict=True))
            row["projected_ratio"] = projected
            line += f", projected x{projected:.2f}"
        scaling[f"c{connections}"] = row
        print(line)
    return scaling


def _per_cpu_second(load: harness.Load) -> float:
    return load.requests / load.extra["server_cpu_s"] if load.extra["server_cpu_s"] else 0.0


def _cpu_row(loads: list[harness.Load]) -> dict[str, float]:
    """The median round's throughput, and the CPU the server and wrk used per second of it."""
    load = harness.median(loads)
    return {"requests_per_second": load.per_second, "p99_ms": load.p99_ms,
            "server_cpu_per_s": load.extra["server_cpu_s"] / load.seconds,
            "wrk_cpu_per_s": load.extra["client_cpu_s"] / load.seconds,
            "requests_per_server_cpu_s": _per_cpu_second(load)}


def main() -> dict[str, Any]:
    if not harness.have_wrk():
        print("wrk is not installed (Debian package wrk): skipped")
        return {"skipped": "wrk not installed"}
    bodies = {"typical": typical_review(), "bigger": bigger_review(),
              "varied": varied_review()}
    results: dict[str, Any] = {
        "body_bytes": {name: len(body) for name, body in bodies.items()},
        "pinned": harness.PINNED, "seconds_per_run": harness.SECONDS, "rounds": harness.ROUNDS}
    with tempfile.TemporaryDirectory(prefix="bench-istio-http-") as tmp:
        workdir = Path(tmp)
        certs = harness.certs_dir(workdir)
        servers: dict[str, harness.Server] = {}
        idle: dict[str, dict[str, int]] = {}
        try:
            servers["istio"] = harness.start_command(
                "istio", istio_webhook_command(certs), workdir, certs, env={"GOMAXPROCS": "1"})
            servers["inject"] = harness.start(
                "inject", ["-m", "injector", "serve", "--certs-dir", str(certs)], workdir, certs)
            servers["raw"] = harness.start(
                "raw", ["-m", "bench.echo_server", "raw", "--certs-dir", str(certs)],
                workdir, certs)
            time.sleep(1)
            idle = {name: server.rss_kib() for name, server in servers.items()}
            _check_answers(servers, bodies, certs)
            runs = {}
            for body_name, concurrencies in (("typical", harness.CONCURRENCY),
                                             ("bigger", BIG_CONCURRENCY),
                                             ("varied", BIG_CONCURRENCY)):
                script = harness.wrk_script(
                    bodies[body_name], {"Content-Type": "application/json"}, workdir,
                    vary=SEQUENCE if body_name == "varied" else None)
                runs[body_name] = harness.interleaved(servers, "/inject", script, concurrencies,
                                                      measure_cpu=True)
            loaded = {name: server.rss_kib() for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        typical_script = harness.wrk_script(bodies["typical"],
                                            {"Content-Type": "application/json"}, workdir)
        scaling = _workers_scaling(workdir, certs, typical_script)

    print(f"Istio's webhook (Go, GOMAXPROCS=1), injector serve (1 worker) and the raw ASGI echo, "
          f"each on the server core, wrk on the other (pinned: {harness.PINNED}); "
          f"{harness.ROUNDS} rounds of {harness.SECONDS} s: median round, median ratio within "
          "rounds")
    print(f"typical ReplicaSet pod ({len(bodies['typical'])} bytes):")
    results["typical"] = _table(runs["typical"], harness.CONCURRENCY)
    print(f"bigger pod, 10 containers ({len(bodies['bigger'])} bytes):")
    results["bigger"] = _table(runs["bigger"], BIG_CONCURRENCY)
    print("typical pod, every request another app (no patch from our cache):")
    results["varied"] = _table(runs["varied"], BIG_CONCURRENCY)
    results["workers"] = scaling
    rss = {name: {"idle_rss_mib": idle[name]["VmRSS"] / 1024,
                  "loaded_rss_mib": loaded[name]["VmRSS"] / 1024,
                  "peak_rss_mib": loaded[name]["VmHWM"] / 1024} for name in SERVERS}
    results["rss"] = rss
    for name in SERVERS:
        print(f"RSS of {name}: idle {rss[name]['idle_rss_mib']:.1f} MiB, after load "
              f"{rss[name]['loaded_rss_mib']:.1f} MiB (peak {rss[name]['peak_rss_mib']:.1f} MiB)")
    ratios = results["typical"]["ratios_c16"]
    workers = scaling["c16"]
    workers_ratio = workers["measured_ratio" if scaling["wrk_own_core"] else "projected_ratio"]
    verdicts = {
        "c16 ours/Istio throughput >= 1.0": ratios["inject_vs_istio"] >= TARGETS["vs_istio"],
        "c16 p99 no worse than Istio's": ratios["istio_p99_vs_inject"] >= TARGETS["p99_vs_istio"],
        "c16 ours/raw ASGI echo >= 0.5": ratios["inject_vs_raw"] >= TARGETS["vs_raw"],
        ("c16 --workers 2 >= 1.6x one worker"
         + ("" if scaling["wrk_own_core"] else " (projected from CPU time: 2 cores)")):
            workers_ratio >= TARGETS["workers"],
        "idle RSS of serve < 80 MiB": rss["inject"]["idle_rss_mib"] < TARGETS["idle_rss_mib"],
    }
    results["targets"] = verdicts
    harness.report_targets(verdicts)
    return results


if __name__ == "__main__":
    main()
