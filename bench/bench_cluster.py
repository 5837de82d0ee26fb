"""Pod creation as the cluster sees it, our webhook beside Istio's (issue 17, item 3): `POST
/api/v1/namespaces/<ns>/pods` through one real kube-apiserver (and etcd), in one run, in three
namespaces of that one API server:

- `ours`: labelled `istio-injection=enabled`, sent by deploy/'s namespace webhook to `injector
  serve` (deploy/ applied as the cluster tests apply it, tests/support/cluster.py);
- `istio`: labelled only `bench.injector/webhook=istio`, sent by a MutatingWebhookConfiguration
  of the same shape as ours (deploy/'s namespace webhook, its selector and URL changed) to
  Istio's own webhook handler (`pkg/kube/inject` with its default template and mesh config,
  served over TLS by tests/istio/webhook, built by tests/istio/build.sh); none of our webhooks
  matches that namespace, nor theirs ours;
- `unlabelled`: no webhook called at all: the floor the other two are measured over.

Each webhook is reached by URL on loopback (no kube-proxy here), its caBundle the dev root of
`injector certs init`, and both serve the very same certificate and key (EC P-256). Every pod
the API server returns is checked: 201, and injected by the intended injector (ours runs
`injector agent` in istio-proxy, Istio's runs `pilot-agent`'s `proxy sidecar`), or, in the
floor, not injected; a misrouted webhook fails the run rather than pass for the other.
Each webhook keeps its own project's reinvocation policy. Ours is `IfNeeded`, as deploy/ ships
it: the API server's ServiceAccount plugin mounts its token into the containers we added, which
would have us called a second time per pod to find it already injected, but deploy/'s
`matchConditions` (not-injected-yet) stop that call in the API server: one call per pod (the
"calls" column). Istio ships no such condition, and is measured without it. Istio's chart
ships `Never`: its handler re-injects an injected pod (takes out what it added and
injects again), so a reinvocation would cost it a second whole injection
(BENCH_ISTIO_REINVOCATION=IfNeeded shows it: about twice the CPU per pod).

Placement on this 2-core machine: both webhooks on the same core (harness.SERVER_CPU), one core
each, one at a time busy: `injector serve` with one worker, Istio's with GOMAXPROCS=1. etcd,
kube-apiserver and the client (threads of this process, one keep-alive HTTPS connection each,
as the admin) all share the other core (harness.CLIENT_CPU), as a cluster's control plane runs
apart from the webhook's node. On one core everything shares it and only the ratios hold. etcd
runs without fsync in a temporary directory, so absolute times are lower than on a real
cluster's disks: the ratios are the figures.

Pods are created at concurrency 1 (one client, one pod at a time) and 8 (eight clients),
BENCH_PODS a batch; pods/s is the batch over its wall time, p50 and p99 of the single creates,
the webhook's own CPU per pod (utime + stime of its process over the batch, from /proc), and
the API server's calls to it per pod with their mean time as the API server waits (from its
/metrics, `apiserver_admission_webhook_admission_duration_seconds`): what of a create's time is
the webhook's, round trip included, and what is the API server's own work. The three
namespaces take turns in every round (in reverse order every other round); ratios are taken
within a round, then the median over rounds. Pods are deleted between batches, untimed, so that
etcd holds the same few in every batch.

Run alone with `python -m bench.bench_cluster` (binaries: `make cluster-binaries`).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import harness
from bench.bench_istio_http import istio_webhook_command
from injector.mesh.names import NAMESPACE_LABEL, PROXY_CONTAINER, STATUS_ANNOTATION
from tests.support.cluster import DEPLOY, Cluster, install_mesh, start_cluster
from tests.support.pods import pod
from tests.support.servers import child_pids, free_port

PODS = int(os.environ.get("BENCH_PODS", "200"))
WARMUP_PODS = 20
CONCURRENCY = (1, 8)
CASES = ("unlabelled", "ours", "istio")
INJECTORS = ("ours", "istio")

# The namespace label that sends a namespace's pods to Istio's webhook, and only there.
ISTIO_SELECTOR_LABEL = "bench.injector/webhook"
ISTIO_WEBHOOK_CONFIGURATION = "istio-bench"
ISTIO_WEBHOOK = "namespace.sidecar-injector.istio.io"
# deploy/'s webhook for labelled namespaces, the one our pods go through.
OUR_WEBHOOK = "namespace.injector.mesh"
# As Istio's istio-discovery chart ships it (values.yaml, sidecarInjectorWebhook): its handler
# re-injects an injected pod, so a reinvocation would inject it a second time.
# BENCH_ISTIO_REINVOCATION=IfNeeded gives it ours, to see what that costs.
ISTIO_REINVOCATION_POLICY = os.environ.get("BENCH_ISTIO_REINVOCATION", "Never")


# --- where each pod went -------------------------------------------------------------------------

def _proxy(created: dict[str, Any]) -> dict[str, Any] | None:
    containers = [*created["spec"].get("initContainers", []), *created["spec"]["containers"]]
    return next((c for c in containers if c["name"] == PROXY_CONTAINER), None)


def _status(created: dict[str, Any]) -> str | None:
    annotations: dict[str, str] = created["metadata"].get("annotations") or {}
    return annotations.get(STATUS_ANNOTATION)


def _injected_by_us(created: dict[str, Any]) -> str | None:
    """Why `created` is not a pod our injector injected, or None."""
    proxy = _proxy(created)
    if proxy is None or _status(created) is None:
        return "not injected"
    if proxy.get("command", [])[:2] != ["injector", "agent"]:
        return f"istio-proxy runs {proxy.get('command')} {proxy.get('args')}, not our agent"
    return None


def _injected_by_istio(created: dict[str, Any]) -> str | None:
    """Why `created` is not a pod Istio's injector injected, or None."""
    proxy = _proxy(created)
    if proxy is None or _status(created) is None:
        return "not injected"
    if proxy.get("command") or proxy.get("args", [])[:2] != ["proxy", "sidecar"]:
        return (f"istio-proxy runs {proxy.get('command')} {proxy.get('args')}, not "
                "pilot-agent's proxy sidecar")
    return None


def _not_injected(created: dict[str, Any]) -> str | None:
    if _proxy(created) is not None or _status(created) is not None:
        return "injected, where no webhook should be called"
    return None


CHECKS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "unlabelled": _not_injected, "ours": _injected_by_us, "istio": _injected_by_istio}


# --- placement -----------------------------------------------------------------------------------

def _pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` and of its children on `cpu`: the Go runtimes and uvicorn have
    started their threads by now, and sched_setaffinity moves one thread at a time (threads
    started later inherit it)."""
    if not harness.PINNED:
        return
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task.name), {cpu})
    for child in child_pids(pid):
        _pin(child, cpu)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` and its children so far (utime and stime, fields 14
    and 15 of /proc/PID/stat): what a webhook spent, whatever the API server waited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / _CLOCK_TICKS + sum(cpu_seconds(child) for child in child_pids(pid))


# --- Istio's webhook -----------------------------------------------------------------------------

def start_istio_webhook(workdir: Path, certs: Path) -> harness.Server:
    """Istio's webhook (tests/istio/webhook, started as bench_istio_http starts it) serving
    `certs`' tls.crt/tls.key on the webhooks' core with GOMAXPROCS=1, answering /healthz."""
    return harness.start_command("istio-webhook", istio_webhook_command(certs), workdir, certs,
                                 env={"GOMAXPROCS": "1"})


def istio_webhook_configuration(url: str, ca_pem: bytes) -> dict[str, Any]:
    """A MutatingWebhookConfiguration of the same shape as deploy/'s namespace webhook (same
    rules, object selector, failure policy, timeout), with Istio's own reinvocation policy and
    no match conditions (Istio's chart has none),
    sending the namespaces labelled ISTIO_SELECTOR_LABEL=istio, and those only, to `url`."""
    shipped = yaml.safe_load((DEPLOY / "webhook.yaml").read_text())
    webhook = copy.deepcopy(next(w for w in shipped["webhooks"] if w["name"] == OUR_WEBHOOK))
    webhook["name"] = ISTIO_WEBHOOK
    webhook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(ca_pem).decode()}
    webhook["namespaceSelector"] = {"matchLabels": {ISTIO_SELECTOR_LABEL: "istio"}}
    webhook["reinvocationPolicy"] = ISTIO_REINVOCATION_POLICY
    webhook.pop("matchConditions", None)  # ours (deploy/webhook.yaml); Istio's chart has none
    return {"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": ISTIO_WEBHOOK_CONFIGURATION}, "webhooks": [webhook]}


# --- creating pods -------------------------------------------------------------------------------

@dataclass
class Batch:
    """One batch of creates: each create's milliseconds, the batch's wall time, and the CPU
    seconds its webhook spent meanwhile (0 where none is called)."""

    times_ms: list[float]
    seconds: float
    webhook_cpu_seconds: float

    @property
    def pods_per_second(self) -> float:
        return len(self.times_ms) / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def figures(self) -> dict[str, float]:
        return {"pods_per_s": self.pods_per_second, "p50_ms": self.percentile(0.50),
                "p99_ms": self.percentile(0.99),
                "webhook_cpu_ms_per_pod": self.webhook_cpu_seconds * 1000 / len(self.times_ms)}


def _manifest(namespace: str) -> dict[str, Any]:
    manifest = pod()
    manifest["metadata"] = {"generateName": "bench-", "namespace": namespace,
                            "labels": {"app": "bench"}}
    return manifest


class Creator:
    """`concurrency` clients, one keep-alive connection to the API server each."""

    def __init__(self, cluster: Cluster, concurrency: int) -> None:
        self.clients = [cluster.admin_client() for _ in range(concurrency)]
        for client in self.clients:  # connected before anything is timed
            client.get("/version").raise_for_status()
        self.pool = ThreadPoolExecutor(concurrency)

    def close(self) -> None:
        self.pool.shutdown()
        for client in self.clients:
            client.close()

    def create(self, case: str, namespace: str, count: int, webhook_pid: int | None) -> Batch:
        """`count` pods in `namespace`, shared out among the clients as they come free; each
        checked as CHECKS[case] says."""
        path = f"/api/v1/namespaces/{namespace}/pods"
        body = json.dumps(_manifest(namespace)).encode()
        check = CHECKS[case]
        times: list[float] = []
        left = iter(range(count))
        lock = threading.Lock()

        def client_loop(client: httpx.Client) -> None:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                started = time.perf_counter()
                answer = client.post(path, content=body,
                                     headers={"content-type": "application/json"})
                times.append((time.perf_counter() - started) * 1000)
                if answer.status_code != 201:
                    raise RuntimeError(f"pod create in {namespace} ({case}): HTTP "
                                       f"{answer.status_code} {answer.text[:300]}")
                problem = check(answer.json())
                if problem is not None:
                    raise RuntimeError(f"pod in {namespace} ({case}): {problem}")

        cpu_before = cpu_seconds(webhook_pid) if webhook_pid else 0.0
        started = time.perf_counter()
        for done in [self.pool.submit(client_loop, client) for client in self.clients]:
            done.result()
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(webhook_pid) - cpu_before if webhook_pid else 0.0
        return Batch(times, seconds, cpu)


@dataclass(frozen=True)
class Webhook:
    """A case's webhook: its server's process, and its name in its configuration (the name
    the API server's metrics give it)."""

    pid: int
    name: str


_CALLS = "apiserver_admission_webhook_admission_duration_seconds"


def webhook_calls(api: httpx.Client) -> dict[str, tuple[int, float]]:
    """(calls, seconds) of pod creates the API server has sent each webhook so far, from its
    /metrics: the webhook's time as the API server waits for it, round trip included."""
    calls: dict[str, tuple[int, float]] = {}
    for line in api.get("/metrics").raise_for_status().text.splitlines():
        if not line.startswith(f"{_CALLS}_") or 'operation="CREATE"' not in line:
            continue
        metric, _, value = line.rpartition(" ")
        name = metric.partition('name="')[2].partition('"')[0]
        count, seconds = calls.get(name, (0, 0.0))
        if metric.startswith(f"{_CALLS}_count{{"):
            calls[name] = (count + int(float(value)), seconds)
        elif metric.startswith(f"{_CALLS}_sum{{"):
            calls[name] = (count, seconds + float(value))
    return calls


def _calls_between(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]],
                   name: str) -> dict[str, float]:
    """Calls of webhook `name` per pod of a batch, and their mean milliseconds."""
    calls_before, seconds_before = before.get(name, (0, 0.0))
    calls_after, seconds_after = after.get(name, (0, 0.0))
    calls = calls_after - calls_before
    return {"webhook_calls_per_pod": calls / PODS,
            "webhook_call_ms": (seconds_after - seconds_before) * 1000 / calls if calls else 0.0}


def _delete_pods(api: httpx.Client, namespace: str) -> None:
    """Every pod of `namespace`, untimed: unscheduled pods go at once, without a grace period."""
    api.delete(f"/api/v1/namespaces/{namespace}/pods").raise_for_status()


# --- the run -------------------------------------------------------------------------------------

def measure(cluster: Cluster, namespaces: dict[str, str], webhooks: dict[str, Webhook],
            ) -> dict[str, Any]:
    """Rounds of batches, every case (its pods in `namespaces[case]`, its webhook
    `webhooks[case]`) at every concurrency in each; the figures by concurrency: per case the
    median over rounds, and the ratios, each the median of within-round ones."""
    rounds: list[dict[int, dict[str, dict[str, float]]]] = []
    with harness.on_client_cpu(), cluster.admin_client() as api:
        creators = {c: Creator(cluster, c) for c in CONCURRENCY}
        try:
            for case in CASES:
                creators[1].create(case, namespaces[case], WARMUP_PODS, None)
                _delete_pods(api, namespaces[case])
            for index in range(harness.ROUNDS):
                order = list(CASES) if index % 2 == 0 else list(reversed(CASES))
                figures: dict[int, dict[str, dict[str, float]]] = {}
                for concurrency in CONCURRENCY:
                    for case in order:
                        webhook = webhooks.get(case)
                        calls_before = webhook_calls(api)
                        batch = creators[concurrency].create(
                            case, namespaces[case], PODS, webhook.pid if webhook else None)
                        calls_after = webhook_calls(api)
                        figures.setdefault(concurrency, {})[case] = batch.figures()
                        if webhook is not None:
                            figures[concurrency][case].update(
                                _calls_between(calls_before, calls_after, webhook.name))
                        _delete_pods(api, namespaces[case])
                rounds.append(figures)
        finally:
            for creator in creators.values():
                creator.close()
    return summarise(rounds)


def summarise(rounds: list[dict[int, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    result: dict[str, Any] = {"pods_per_batch": PODS, "rounds": rounds}
    for concurrency in CONCURRENCY:
        at = [r[concurrency] for r in rounds]
        summary: dict[str, Any] = {
            case: {key: statistics.median(figures[case][key] for figures in at)
                   for key in ("pods_per_s", "p50_ms", "p99_ms", "webhook_cpu_ms_per_pod")}
            for case in CASES}
        for injector in INJECTORS:
            summary[injector].update({
                key: statistics.median(figures[injector][key] for figures in at)
                for key in ("webhook_calls_per_pod", "webhook_call_ms")})
        # Each ratio within a round first (a drift in the machine's load touches both sides
        # of it alike), then the median over rounds.
        summary["ours_over_istio_pods_per_s"] = statistics.median(
            f["ours"]["pods_per_s"] / f["istio"]["pods_per_s"] for f in at)
        summary["istio_over_ours_p50"] = statistics.median(
            f["istio"]["p50_ms"] / f["ours"]["p50_ms"] for f in at)
        summary["istio_over_ours_p99"] = statistics.median(
            f["istio"]["p99_ms"] / f["ours"]["p99_ms"] for f in at)
        # CPU time counts in clock ticks (10 ms): a short run's batch may show none of ours,
        # and then has no ratio (None if no round has one).
        cpu_ratios = [f["istio"]["webhook_cpu_ms_per_pod"] / f["ours"]["webhook_cpu_ms_per_pod"]
                      for f in at if f["ours"]["webhook_cpu_ms_per_pod"]]
        summary["istio_over_ours_cpu"] = statistics.median(cpu_ratios) if cpu_ratios else None
        for injector in INJECTORS:
            # What the webhook adds to a create over the floor, and the floor's pods/s kept.
            summary[injector]["added_p50_ms"] = statistics.median(
                f[injector]["p50_ms"] - f["unlabelled"]["p50_ms"] for f in at)
            summary[injector]["pods_per_s_of_floor"] = statistics.median(
                f[injector]["pods_per_s"] / f["unlabelled"]["pods_per_s"] for f in at)
        result[f"c{concurrency}"] = summary
    return result


def _namespaces(cluster: Cluster) -> dict[str, str]:
    return {"unlabelled": cluster.namespace("bench-plain"),
            "ours": cluster.namespace("bench-ours", {NAMESPACE_LABEL: "enabled"}),
            "istio": cluster.namespace("bench-istio", {ISTIO_SELECTOR_LABEL: "istio"})}


def run(workdir: Path) -> dict[str, Any]:
    cluster = start_cluster(workdir / "cluster")
    try:
        # Istio's gRPC CA served as shipped, on a free port rather than the machine's one 15012.
        mesh = install_mesh(cluster, workdir / "mesh",
                            serve_args=("--grpc-port", str(free_port())))
        try:
            assert mesh.injector is not None
            certs = mesh.injector.certs_dir
            istio = start_istio_webhook(workdir, certs)
            try:
                cluster.apply(istio_webhook_configuration(
                    f"{istio.url}/inject", (certs / "root-cert.pem").read_bytes()))
                for process in cluster.processes:
                    _pin(process.process.pid, harness.CLIENT_CPU)
                _pin(mesh.injector.process.pid, harness.SERVER_CPU)
                return measure(cluster, _namespaces(cluster), {
                    "ours": Webhook(mesh.injector.process.pid, OUR_WEBHOOK),
                    "istio": Webhook(istio.process.pid, ISTIO_WEBHOOK)})
            finally:
                istio.stop()
        finally:
            mesh.stop_injector()
    finally:
        cluster.stop()


def report(result: dict[str, Any]) -> None:
    print(f"pod creates through kube-apiserver, {PODS} a batch, {harness.ROUNDS} rounds, "
          "each webhook the only one called: median round; ratios: median of the within-round "
          "ratios; calls, call ms: the API server's calls to the webhook per pod and their mean "
          "time as it waits; cpu: the webhook's own CPU per pod")
    print(f"{'conc':>4} {'namespace':<11} {'pods/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'added p50':>10} {'of floor':>9} {'calls':>6} {'call ms':>8} {'cpu ms':>7}")
    for concurrency in CONCURRENCY:
        summary = result[f"c{concurrency}"]
        for case in CASES:
            figures = summary[case]
            webhook = (f"{figures['added_p50_ms']:>+10.2f} {figures['pods_per_s_of_floor']:>9.2f}"
                       f" {figures['webhook_calls_per_pod']:>6.2f}"
                       f" {figures['webhook_call_ms']:>8.2f}"
                       f" {figures['webhook_cpu_ms_per_pod']:>7.2f}"
                       if case in INJECTORS else "")
            print(f"{concurrency:>4} {case:<11} {figures['pods_per_s']:>8.1f} "
                  f"{figures['p50_ms']:>8.2f} {figures['p99_ms']:>8.2f} {webhook}".rstrip())
        print(f"{concurrency:>4} ours/Istio pods/s {summary['ours_over_istio_pods_per_s']:.2f}; "
              f"Istio/ours p50 {summary['istio_over_ours_p50']:.2f}, "
              f"p99 {summary['istio_over_ours_p99']:.2f}, "
              f"cpu per pod {_figure(summary['istio_over_ours_cpu'])}")
    harness.report_targets({
        **{f"pods/s at concurrency {c} >= 1.0x Istio's webhook":
           result[f"c{c}"]["ours_over_istio_pods_per_s"] >= 1.0 for c in CONCURRENCY},
        **{f"p99 at concurrency {c} no worse than Istio's webhook":
           result[f"c{c}"]["istio_over_ours_p99"] >= 1.0 for c in CONCURRENCY},
    })


def _figure(value: float | None) -> str:
    return "n/a (too short a run)" if value is None else f"{value:.2f}"


def main() -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        result = run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    return result


if __name__ == "__main__":
    main()
