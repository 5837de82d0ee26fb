"""In-process admission time for pods of growing size, against a JSON round trip of the same
review (parse and serialise: the floor of any webhook that reads the pod).

Sizes: the typical ReplicaSet pod; 1, 10 and 100 containers; one container with 10 to 2000
env vars; a 64 KiB pod. The growth must be linear in the review's size: within a family of pods
(more containers, more env vars) the time per KiB falls, and the ratio to the floor (itself
linear) must not rise; the marginal cost of a further KiB over the family's smallest pod is
reported too. Each case is
measured in interleaved rounds with its floor, best of each, on the core the servers get.

Run alone with `python -m bench.bench_inject`.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench import harness
from injector.injection import webhook
from injector.mesh.config import MeshConfig
from tests.support.pods import pod, replicaset_pod, review

MESH = MeshConfig()
ROUNDS = 5
TARGETS_MS = {"typical replicaset pod": 0.3, "1 container, 2000 env": 5.0}


def _unknown(_: str) -> None:
    return None


def _container(index: int, env_vars: int) -> dict[str, Any]:
    return {
        "name": f"app-{index}",
        "image": "registry.local/app:1.0",
        "env": [{"name": f"VAR_{n}", "value": f"value-{n}"} for n in range(env_vars)],
        "ports": [{"containerPort": 8080 + index}],
    }


def _pod_of_kib(kib: int) -> dict[str, Any]:
    """A pod of about `kib` KiB as kubectl apply makes them: three containers, and the
    last-applied-configuration annotation repeating the manifest."""
    containers = [_container(i, 0) for i in range(3)]
    manifest = pod(containers=containers)
    env = 0
    while len(orjson.dumps(review(manifest))) < kib * 1024:
        env += 10
        containers = [_container(i, env) for i in range(3)]
        manifest = pod(containers=containers)
        manifest["metadata"]["annotations"] = {
            "kubectl.kubernetes.io/last-applied-configuration": json.dumps(manifest)}
    return manifest


def cases() -> dict[str, bytes]:
    sized = {
        "typical replicaset pod": replicaset_pod(),
        "1 container, 10 env": pod(containers=[_container(0, 10)]),
        "10 containers, 10 env each": pod(containers=[_container(i, 10) for i in range(10)]),
        "100 containers, 10 env each": pod(containers=[_container(i, 10) for i in range(100)]),
        "1 container, 100 env": pod(containers=[_container(0, 100)]),
        "1 container, 500 env": pod(containers=[_container(0, 500)]),
        "1 container, 2000 env": pod(containers=[_container(0, 2000)]),
        "64 KiB pod (last-applied)": _pod_of_kib(64),
    }
    return {name: orjson.dumps(review(obj)) for name, obj in sized.items()}


# Pods growing along one dimension; the first of each is the reference for the marginal cost.
FAMILIES = (
    ("1 container, 10 env", "10 containers, 10 env each", "100 containers, 10 env each"),
    ("1 container, 10 env", "1 container, 100 env", "1 container, 500 env",
     "1 container, 2000 env"),
)


def _per_call(function: Callable[[], object], budget: float = 0.25) -> float:
    function()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget:
        function()
        calls += 1
    return elapsed / calls


def main() -> dict[str, Any]:
    bodies = cases()
    inject_s = dict.fromkeys(bodies, float("inf"))
    floor_s = dict.fromkeys(bodies, float("inf"))
    with harness.on_server_cpu():
        for _ in range(ROUNDS):
            for name, body in bodies.items():
                def inject(body: bytes = body) -> object:
                    return webhook.admit(webhook.parse(body), MESH, _unknown)

                def floor(body: bytes = body) -> object:
                    return orjson.dumps(orjson.loads(body))

                inject_s[name] = min(inject_s[name], _per_call(inject))
                floor_s[name] = min(floor_s[name], _per_call(floor))

    results: dict[str, Any] = {}
    print(f"{'case':30} {'KiB':>6} {'inject ms':>9} {'floor ms':>8} {'ratio':>6} "
          f"{'us/KiB':>7} {'marginal us/KiB':>15}")
    for name, body in bodies.items():
        kib, seconds, baseline = len(body) / 1024, inject_s[name], floor_s[name]
        first = next((family[0] for family in FAMILIES if name in family[1:]), None)
        marginal = None
        if first is not None:
            marginal = ((seconds - inject_s[first]) * 1e6
                        / ((len(body) - len(bodies[first])) / 1024))
        results[name] = {"kib": kib, "inject_ms": seconds * 1e3, "floor_ms": baseline * 1e3,
                         "ratio_to_floor": seconds / baseline, "us_per_kib": seconds * 1e6 / kib,
                         "marginal_us_per_kib": marginal}
        print(f"{name:30} {kib:6.1f} {seconds * 1e3:9.3f} {baseline * 1e3:8.3f} "
              f"{seconds / baseline:6.2f} {seconds * 1e6 / kib:7.2f} "
              f"{'' if marginal is None else f'{marginal:15.2f}'}")
    # At most linear: within a family, the time against the floor (a linear-time JSON round
    # trip, measured alongside, so the machine's load cancels out) does not rise with the size;
    # a quadratic step would make it rise in proportion. 10% allowed for noise.
    linear = all(results[bigger]["ratio_to_floor"] <= 1.1 * results[smaller]["ratio_to_floor"]
                 for family in FAMILIES for smaller, bigger in itertools.pairwise(family))
    marginals = [row["marginal_us_per_kib"] for row in results.values()
                 if row["marginal_us_per_kib"] is not None]
    print(f"time against the floor never rises with size within a family: {linear}; a KiB more "
          f"costs {min(marginals):.1f} to {max(marginals):.1f} us")
    verdicts = {f"{name} < {limit} ms": results[name]["inject_ms"] < limit
                for name, limit in TARGETS_MS.items()}
    verdicts["growth linear in size"] = linear
    harness.report_targets(verdicts)
    return {"cases": results, "targets": verdicts}


if __name__ == "__main__":
    main()
