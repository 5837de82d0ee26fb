"""In-process admission time for pods of growing size, against a JSON round trip of the same
review (parse and serialise: the floor of any webhook that reads the pod).

Run alone with `python -m bench.bench_inject`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from injector import webhook
from injector.config import MeshConfig
from tests.pods import pod, replicaset_pod, review

MESH = MeshConfig()


def _unknown(_: str) -> None:
    return None


def _container(index: int, env_vars: int) -> dict[str, Any]:
    return {
        "name": f"app-{index}",
        "image": "registry.local/app:1.0",
        "env": [{"name": f"VAR_{n}", "value": f"value-{n}"} for n in range(env_vars)],
        "ports": [{"containerPort": 8080 + index}],
    }


def cases() -> dict[str, bytes]:
    sized = {
        "typical replicaset pod": replicaset_pod(),
        "1 container, 10 env": pod(containers=[_container(0, 10)]),
        "1 container, 2000 env": pod(containers=[_container(0, 2000)]),
        "10 containers, 100 env each": pod(containers=[_container(i, 100) for i in range(10)]),
        "100 containers, 10 env each": pod(containers=[_container(i, 10) for i in range(100)]),
    }
    return {name: orjson.dumps(review(obj)) for name, obj in sized.items()}


def _per_call(function: Callable[[], object], budget: float = 0.5) -> float:
    function()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget:
        function()
        calls += 1
    return elapsed / calls


def main() -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    print(f"{'case':32} {'KiB':>7} {'inject ms':>10} {'floor ms':>9} {'ratio':>6} {'us/KiB':>7}")
    for name, body in cases().items():
        def inject(body: bytes = body) -> object:
            return webhook.admit(webhook.parse(body), MESH, _unknown)

        def floor(body: bytes = body) -> object:
            return orjson.dumps(orjson.loads(body))

        seconds = _per_call(inject)
        baseline = _per_call(floor)
        kib = len(body) / 1024
        results[name] = {"kib": kib, "inject_ms": seconds * 1e3, "floor_ms": baseline * 1e3,
                         "ratio_to_floor": seconds / baseline, "us_per_kib": seconds * 1e6 / kib}
        print(f"{name:32} {kib:7.1f} {seconds * 1e3:10.3f} {baseline * 1e3:9.3f} "
              f"{seconds / baseline:6.1f} {seconds * 1e6 / kib:7.2f}")
    return results


if __name__ == "__main__":
    main()
