"""bench/bench_istio_inject, run small: Istio's side (tests/istio/injectbench and Istio's own
BenchmarkInjection, as `make bench` runs them) and ours report a figure for every pod and time
only pods they really injected, so that a broken harness fails the suite rather than a benchmark
run. No speed is asserted here (speed belongs in bench/)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import bench_istio_inject as bench
from tests.support.istio_parity import manifests_dir, module_dir
from tests.support.peers import ISTIO_SCRIPT, built
from tests.support.pods import review


def _review_files(directory: Path, bodies: dict[str, bytes]) -> list[Path]:
    files = []
    for index, body in enumerate(bodies.values()):
        path = directory / f"review-{index}.json"
        path.write_bytes(body)
        files.append(path)
    return files


def test_the_go_harness_times_istios_injection_of_every_pod(tmp_path: Path) -> None:
    bodies = bench.cases()
    files = _review_files(tmp_path, bodies)
    figures = bench.istio_figures(built(ISTIO_SCRIPT, "injectbench"), manifests_dir(), files,
                                  "2x")
    assert [figure["file"] for figure in figures] == [str(path) for path in files]
    for figure, body in zip(figures, bodies.values(), strict=True):
        assert figure["iterations"] == 2
        assert figure["ns_per_op"] > 0 and figure["cpu_ns_per_op"] > 0
        assert figure["allocs_per_op"] > 0
        assert figure["review_bytes"] == len(body)
        # Checked by the harness before timing: allowed, with a patch that adds istio-proxy.
        assert figure["patch_bytes"] > 0


def test_the_go_harness_refuses_to_time_a_pod_istio_does_not_inject(tmp_path: Path) -> None:
    skipped = bench.istio_benchmark_pod(3)
    skipped["metadata"]["labels"] = {"sidecar.istio.io/inject": "false"}
    files = _review_files(tmp_path, {"skipped": orjson.dumps(review(skipped, namespace="bar"))})
    with pytest.raises(RuntimeError, match="did not inject it, so it is not timed"):
        bench.istio_figures(built(ISTIO_SCRIPT, "injectbench"), manifests_dir(), files, "1x")


def test_istios_own_benchmark_runs_from_the_module_cache() -> None:
    own = bench.istio_own_benchmark(built(ISTIO_SCRIPT, "inject.test"),
                                    module_dir() / "pkg" / "kube" / "inject", "1x", 1)
    assert own["runs"] == 1
    assert own["ns_per_op"] > 0 and own["allocs_per_op"] > 0


def test_ours_injects_every_pod_and_the_check_sees_a_refusal() -> None:
    for name, body in bench.cases().items():
        assert bench.adds_proxy(bench._ours(body)), name
    skipped = bench.istio_benchmark_pod(3)
    skipped["metadata"]["labels"] = {"sidecar.istio.io/inject": "false"}
    assert not bench.adds_proxy(bench._ours(orjson.dumps(review(skipped, namespace="bar"))))


def test_one_short_run_reports_every_pod_on_both_sides(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bodies = bench.cases()
    measured = bench.measure(bodies, rounds=1, seconds_per_pod=0.01, workdir=tmp_path)
    assert list(measured["cases"]) == list(bodies)
    for row in measured["cases"].values():
        for key in ("istio_us", "ours_us", "ours_warm_us", "istio_cpu_us", "ratio", "cpu_ratio"):
            assert row[key] > 0, key
    verdicts = bench.report(measured)
    assert len(verdicts) == len(bodies)
    printed = capsys.readouterr().out
    assert all(name in printed for name in bodies)
    assert "Istio's own BenchmarkInjection" in printed


def test_the_benchmark_pod_costs_istio_what_its_own_benchmarks_pod_does(tmp_path: Path) -> None:
    """Our copy of podWithEnv(2000) is Istio's pod: Istio's own BenchmarkInjection and our Go
    harness on our copy make the same allocations, to within the harness's decoding of the
    review around the pod (about 80 of 99,000; each env var more or less is about 50)."""
    source = (module_dir() / "pkg" / "kube" / "inject" / "inject_test.go").read_text()
    assert "podWithEnv(2000)" in source
    assert '"something-%d"' in source and '"blah"' in source
    [figure] = bench.istio_figures(
        built(ISTIO_SCRIPT, "injectbench"), manifests_dir(),
        _review_files(tmp_path, {bench.ISTIO_POD: bench.cases()[bench.ISTIO_POD]}), "3x")
    own = bench.istio_own_benchmark(built(ISTIO_SCRIPT, "inject.test"),
                                    module_dir() / "pkg" / "kube" / "inject", "3x", 1)
    assert abs(figure["allocs_per_op"] - own["allocs_per_op"]) < 0.005 * own["allocs_per_op"]
