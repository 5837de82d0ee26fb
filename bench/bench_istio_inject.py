"""In-process injection, ours beside Istio's (issue 17, item 1): the same AdmissionReview bytes to
both injectors, on the core the servers get, one core each, in one run.

The pods: the very pod of Istio's own `BenchmarkInjection` (pkg/kube/inject's inject_test.go,
`podWithEnv(2000)`: pod `foo` in namespace `bar`, one container `app`, image `fake`, env
`something-<i>` = `blah` for i < 2000, as Go's encoding/json writes that corev1.Pod), and from
bench_inject the typical ReplicaSet pod, 10 and 100 containers (10 env each) and a 64 KiB pod;
each is one AdmissionReview as kube-apiserver sends it (compact JSON, v1).

What is timed, on both sides, is a webhook handler from the review's bytes to the answer's
bytes, with no network, TLS or HTTP parsing:
- Istio's: tests/istio/injectbench calls the handler that `inject.NewWebhook` registers at
  `/inject`, as istiod builds it with the default chart's templates, values and mesh config;
  Go's `testing.Benchmark` over an in-memory request (GOMAXPROCS=1, logging at errors only as
  Istio's own benchmark sets it; its doc comment lists what is inside the loop).
- Ours: `webhook.parse` then `webhook.admit` (what `/inject` runs between the body and the
  response; the server's logging and metrics are outside it), the answer's bytes included.
  Ours keeps the sidecar templates and the encoded patches it built (bounded caches, keyed by
  what they depend on: injector.injection.containers and .patch), so that the pods of one
  ReplicaSet after the first cost less; Istio has no such cache. Ours is therefore timed twice:
  `cold`, with both caches emptied before every call (the first pod of its kind, and the figure
  the ratio and the target use), and `warm`, the same pod again (the ReplicaSet's next pods).
Both check, once per pod, that the pod was really injected (a patch adding istio-proxy), so
that a refusal is never timed.

Two clocks: wall time (Go's ns/op; Python's perf_counter) and the process's CPU time over the
same iterations (less disturbed by other work on a shared machine); the ratio (ours / Istio's)
is reported on both and the target (at most 0.5 for every pod) must hold on both. Rounds are
interleaved (Istio's side, then ours, reversed every other round), best of each kept.

Beside them, Istio's own `BenchmarkInjection`, run as its authors run it (`go test -bench`,
compiled once by tests/istio/build.sh as `inject.test`, run in its package directory in the
Go module cache), in every round right after our Go harness: its figure and the harness's on
the same pod should agree (best of the rounds each; wall time only, as `go test` reports it).
They differ by design in two small ways: the harness goes through the HTTP handler (decoding
the AdmissionReview around the pod and encoding the answer, which the Go benchmark skips: its
`webhook.inject` gets the review already decoded and returns the response struct), and the
pod's JSON is compact where BenchmarkInjection's is indented; so the harness makes about 80
allocations more than its 99,000, for the same injection.

Run alone with `python -m bench.bench_istio_inject` (binaries: `make cluster-binaries`);
BENCH_SECONDS (3 by default: a third of it per pod and round, on each side) and BENCH_ROUNDS
shorten it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import bench_inject, harness
from injector.injection import containers, patch, webhook
from injector.mesh import names
from injector.mesh.config import MeshConfig
from tests.support.pods import review

MESH = MeshConfig()
ISTIO_POD = "Istio's BenchmarkInjection pod (2000 env)"
FROM_BENCH_INJECT = ("typical replicaset pod", "10 containers, 10 env each",
                     "100 containers, 10 env each", "64 KiB pod (last-applied)")
TARGET_RATIO = 0.5
# Per pod and round, on each side: Go's -benchtime, and the budget of our loop.
SECONDS_PER_POD = max(harness.SECONDS / 3, 0.2)


def istio_benchmark_pod(env_vars: int = 2000) -> dict[str, Any]:
    """podWithEnv(env_vars) of Istio's inject_test.go, as json.Marshal writes that corev1.Pod:
    no apiVersion or kind (its TypeMeta is empty), the container's empty `resources` and the
    pod's empty `status` present, as Go's encoding leaves them."""
    return {
        "metadata": {"name": "foo", "namespace": "bar"},
        "spec": {"containers": [{
            "name": "app",
            "image": "fake",
            "env": [{"name": f"something-{index}", "value": "blah"} for index in range(env_vars)],
            "resources": {},
        }]},
        "status": {},
    }


def cases() -> dict[str, bytes]:
    """Each pod as one AdmissionReview, the bytes both injectors get."""
    bodies = {ISTIO_POD: orjson.dumps(review(istio_benchmark_pod(), namespace="bar"))}
    sized = bench_inject.cases()
    bodies.update((name, sized[name]) for name in FROM_BENCH_INJECT)
    return bodies


def adds_proxy(answer: bytes) -> bool:
    """Whether an AdmissionReview answer allows the pod with a JSON patch adding istio-proxy."""
    response = orjson.loads(answer).get("response") or {}
    if not response.get("allowed") or not response.get("patch"):
        return False
    for operation in orjson.loads(base64.b64decode(response["patch"])):
        if operation.get("op") != "add" or not operation.get("path", "").startswith(
                "/spec/containers"):
            continue
        value = operation.get("value")
        added = value if isinstance(value, list) else [value]
        if any(isinstance(item, dict) and item.get("name") == names.PROXY_CONTAINER
               for item in added):
            return True
    return False


def _ours(body: bytes) -> bytes:
    return webhook.admit(webhook.parse(body), MESH, _unknown_labels).body


def _unknown_labels(_: str) -> None:
    return None


def _ours_cold(body: bytes) -> bytes:
    """`_ours` with its caches of templates and patches emptied first: what the first pod of
    its kind costs."""
    containers.TEMPLATES = containers.TemplateCache()
    patch.PATCHES = patch.PatchCache()
    return _ours(body)


@contextlib.contextmanager
def _caches_restored() -> Iterator[None]:
    """The injector's own caches put back afterwards (`_ours_cold` replaces them)."""
    saved = containers.TEMPLATES, patch.PATCHES
    try:
        yield
    finally:
        containers.TEMPLATES, patch.PATCHES = saved


@dataclass(frozen=True)
class Timing:
    """Seconds per call, by the wall clock and by this process's CPU time."""

    wall: float
    cpu: float


def per_call(function: Callable[[], object], budget: float) -> Timing:
    """Call `function` for about `budget` seconds (after one warm-up call); the mean per call
    on both clocks, as Go's testing.Benchmark reports a mean over its iterations."""
    function()
    calls = 0
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall_start < budget:
        function()
        calls += 1
    return Timing((time.perf_counter() - wall_start) / calls,
                  (time.process_time() - cpu_start) / calls)


def _run(command: Sequence[str], cwd: Path | None = None, timeout: float = 600) -> str:
    """Run a Go peer on one core (GOMAXPROCS=1; the caller holds this process on the server
    core, which the child inherits); its stdout, or an error with its stderr."""
    done = subprocess.run(list(command), capture_output=True, text=True, check=False, cwd=cwd,
                          timeout=timeout, env={**os.environ, "GOMAXPROCS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return done.stdout


def istio_figures(binary: Path, manifests: Path, reviews: Sequence[Path],
                  benchtime: str) -> list[dict[str, Any]]:
    """tests/istio/injectbench on each review file, in order: its figures per pod (see its doc
    comment); it fails the run when Istio does not inject one of them."""
    output = _run([str(binary), "--manifests", str(manifests), "--benchtime", benchtime,
                   *map(str, reviews)])
    pods: list[dict[str, Any]] = json.loads(output)["pods"]
    if [pod["file"] for pod in pods] != [str(path) for path in reviews]:
        raise RuntimeError(f"injectbench answered for {[p['file'] for p in pods]}, "
                           f"not for {[str(r) for r in reviews]}")
    return pods


_GO_BENCH_LINE = re.compile(r"^BenchmarkInjection\S*\s+(\d+)\s+([\d.]+) ns/op"
                            r"(?:\s+(\d+) B/op\s+(\d+) allocs/op)?", re.MULTILINE)


def istio_own_benchmark(binary: Path, package_dir: Path, benchtime: str,
                        count: int) -> dict[str, float]:
    """Istio's BenchmarkInjection, `count` runs of `benchtime`: the best ns/op (its B/op and
    allocs/op are the same every run)."""
    output = _run([str(binary), "-test.run", "^$", "-test.bench", "^BenchmarkInjection$",
                   "-test.benchmem", "-test.benchtime", benchtime, "-test.count", str(count)],
                  cwd=package_dir)
    runs = _GO_BENCH_LINE.findall(output)
    if not runs:
        raise RuntimeError(f"no BenchmarkInjection figure in its output:\n{output[-2000:]}")
    best = min(runs, key=lambda run: float(run[1]))
    return {"ns_per_op": float(best[1]), "bytes_per_op": float(best[2] or "nan"),
            "allocs_per_op": float(best[3] or "nan"), "runs": len(runs)}


def _binaries() -> tuple[Path, Path, Path, Path]:
    """injectbench, inject.test, Istio's manifests and its pkg/kube/inject directory; a missing
    one fails saying how to build it."""
    # Imported here: they bring pytest (the failure that names the build command).
    from tests.support.istio_parity import manifests_dir, module_dir
    from tests.support.peers import ISTIO_SCRIPT, built

    return (built(ISTIO_SCRIPT, "injectbench"), built(ISTIO_SCRIPT, "inject.test"),
            manifests_dir(), module_dir() / "pkg" / "kube" / "inject")


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def measure(bodies: Mapping[str, bytes], rounds: int, seconds_per_pod: float,
            workdir: Path) -> dict[str, Any]:
    """Both injectors on every pod, `rounds` interleaved rounds on the server core; the best of
    each side per pod and clock, and Istio's own benchmark."""
    injectbench, inject_test, manifests, package_dir = _binaries()
    files = []
    for index, (name, body) in enumerate(bodies.items()):
        if not adds_proxy(_ours(body)):
            raise RuntimeError(f"{name}: our webhook did not inject it, so it is not timed")
        path = workdir / f"review-{index}.json"
        path.write_bytes(body)
        files.append(path)
    cold: dict[str, list[Timing]] = {name: [] for name in bodies}
    warm: dict[str, list[Timing]] = {name: [] for name in bodies}
    istio: dict[str, list[dict[str, Any]]] = {name: [] for name in bodies}

    own_runs: list[dict[str, float]] = []

    def istio_round() -> None:
        figures = istio_figures(injectbench, manifests, files, _seconds(seconds_per_pod))
        for name, figure in zip(bodies, figures, strict=True):
            istio[name].append(figure)
        # Istio's own benchmark right after our harness, in every round, so that
        # both see the machine alike.
        own_runs.append(istio_own_benchmark(inject_test, package_dir,
                                            _seconds(seconds_per_pod), 1))

    def our_round() -> None:
        for name, body in bodies.items():
            cold[name].append(per_call(functools.partial(_ours_cold, body), seconds_per_pod / 2))
            warm[name].append(per_call(functools.partial(_ours, body), seconds_per_pod / 2))

    with harness.on_server_cpu(), _caches_restored():
        for round_number in range(rounds):
            sides = (istio_round, our_round)
            for side in sides if round_number % 2 == 0 else sides[::-1]:
                side()

    results: dict[str, Any] = {}
    for name, body in bodies.items():
        istio_wall = min(figure["ns_per_op"] for figure in istio[name]) / 1e3
        istio_cpu = min(figure["cpu_ns_per_op"] for figure in istio[name]) / 1e3
        ours_wall = min(timing.wall for timing in cold[name]) * 1e6
        ours_cpu = min(timing.cpu for timing in cold[name]) * 1e6
        last = istio[name][-1]
        results[name] = {
            "kib": len(body) / 1024, "istio_us": istio_wall, "ours_us": ours_wall,
            "ratio": ours_wall / istio_wall, "istio_cpu_us": istio_cpu, "ours_cpu_us": ours_cpu,
            "cpu_ratio": ours_cpu / istio_cpu,
            "ours_warm_us": min(timing.wall for timing in warm[name]) * 1e6,
            "ours_warm_cpu_us": min(timing.cpu for timing in warm[name]) * 1e6,
            "istio_bytes_per_op": last["bytes_per_op"],
            "istio_allocs_per_op": last["allocs_per_op"], "istio_patch_bytes": last["patch_bytes"],
        }
    own = min(own_runs, key=lambda run: run["ns_per_op"])
    return {"cases": results, "istio_own_benchmark": {**own, "runs": len(own_runs)}}


def report(measured: Mapping[str, Any]) -> dict[str, bool]:
    """Print the side-by-side table and the targets; the verdicts."""
    cases: Mapping[str, Mapping[str, float]] = measured["cases"]
    print("wall time and CPU time per admission, us; ours cold (caches emptied before each "
          "call) and warm (the same pod again); ratios: ours cold / Istio's")
    print(f"{'pod':42} {'KiB':>5} {'Istio':>6} {'ours':>5} {'warm':>5} {'ratio':>6} "
          f"{'Istio cpu':>9} {'ours cpu':>8} {'warm cpu':>8} {'cpu ratio':>9}")
    for name, row in cases.items():
        print(f"{name:42} {row['kib']:5.1f} {row['istio_us']:6.0f} {row['ours_us']:5.0f} "
              f"{row['ours_warm_us']:5.0f} {row['ratio']:6.3f} {row['istio_cpu_us']:9.0f} "
              f"{row['ours_cpu_us']:8.0f} {row['ours_warm_cpu_us']:8.0f} "
              f"{row['cpu_ratio']:9.3f}")
    own = measured["istio_own_benchmark"]
    harness_row = cases.get(ISTIO_POD)
    if harness_row is not None:
        print(f"Istio's own BenchmarkInjection (go test -bench, best of {own['runs']}): "
              f"{own['ns_per_op'] / 1e3:.0f} us/op, {own['bytes_per_op']:.0f} B/op, "
              f"{own['allocs_per_op']:.0f} allocs/op; our Go harness on the same pod: "
              f"{harness_row['istio_us']:.0f} us/op, {harness_row['istio_bytes_per_op']:.0f} "
              f"B/op, {harness_row['istio_allocs_per_op']:.0f} allocs/op (the harness also "
              f"decodes the review around the pod and encodes the answer)")
    verdicts = {
        f"{name}: ours <= {TARGET_RATIO}x Istio's time (wall and CPU)":
            row["ratio"] <= TARGET_RATIO and row["cpu_ratio"] <= TARGET_RATIO
        for name, row in cases.items()}
    harness.report_targets(verdicts)
    return verdicts


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-istio-inject-") as directory:
        measured = measure(cases(), harness.ROUNDS, SECONDS_PER_POD, Path(directory))
    verdicts = report(measured)
    return {**measured, "targets": verdicts}


if __name__ == "__main__":
    main()
