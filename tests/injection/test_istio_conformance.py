"""Istio's own injector test data as the oracle of kube-inject.

Every input of Istio's pkg/kube/inject/testdata/inject (read from the Go module cache at the
version tests/istio/go.mod pins; never copied here) is injected in-process, as `injector
kube-inject` does, and compared with Istio's golden `X.yaml.injected` on what users and the
cluster notice (`tests.support.istio.observe`). Every difference must be listed, with why, in
the "Differences from Istio's golden files" table of docs/istio-compatibility.md; and every row
there must still be a difference, so that the table shrinks as the gaps close. Inputs without a
golden are those Istio refuses: we must refuse them too, naming the annotation.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from injector.injection.manifests import ManifestError, inject_yaml
from injector.mesh.config import MeshConfig
from tests.support import istio_parity as istio

SECTION = "Differences from Istio's golden files"
MESH = MeshConfig()


def _inputs() -> list[str]:
    """The inputs, or one placeholder that fails saying why (never a skip: Go fetches them)."""
    try:
        return istio.inputs()
    except AssertionError as error:
        return [f"<missing: {error}>"]


def _documents(text: str) -> list[Any]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def _found_differences(name: str) -> dict[str, tuple[Any, Any]]:
    """{field: (ours, Istio's)} over every pod of the input; `outcome` when one side refuses."""
    path = istio.testdata_dir() / name
    text = path.read_text()
    golden = path.with_name(name + ".injected")
    try:
        ours = _documents(inject_yaml(text, MESH, name))
    except ManifestError as error:
        if not golden.exists():
            return {}
        return {"outcome": (f"refused: {error}", "injected")}
    if not golden.exists():
        return {"outcome": ("injected", "refused")}
    originals = _documents(text)
    found: dict[str, tuple[Any, Any]] = {}
    pairs = zip(istio.observe_documents(originals, ours),
                istio.observe_documents(originals, _documents(golden.read_text())), strict=True)
    for our_pod, their_pod in pairs:
        for field, values in istio.differences(our_pod, their_pod).items():
            found.setdefault(field, values)
    return found


@pytest.fixture(scope="module")
def documented() -> list[istio.Difference]:
    return istio.documented_differences(SECTION)


@pytest.mark.parametrize("name", _inputs())
def test_input_matches_istio_golden_or_the_difference_is_documented(
        name: str, documented: list[istio.Difference]) -> None:
    assert not name.startswith("<missing"), name
    undocumented = {field: values for field, values in _found_differences(name).items()
                    if not any(row.covers(name, field) for row in documented)}
    rows = "\n".join(f"| `{name}` | `{field}` | (why) |  ours: {ours!r:.300}  "
                     f"Istio: {theirs!r:.300}" for field, (ours, theirs) in undocumented.items())
    assert not undocumented, (
        f"{name}: differences from Istio's golden not listed in docs/istio-compatibility.md "
        f"({SECTION}); fix them or add rows saying why:\n{rows}")


def test_every_documented_difference_is_still_needed(documented: list[istio.Difference]) -> None:
    """A row that covers no difference the other rows leave (a gap closed) must go: the table
    is what is left, not what once was."""
    found = [(name, field) for name in istio.inputs() for field in _found_differences(name)]
    unneeded = [row for index, row in enumerate(documented)
                if not any(row.covers(name, field)
                           and not any(other.covers(name, field)
                                       for other in documented[:index] + documented[index + 1:])
                           for name, field in found)]
    assert not unneeded, "rows of docs/istio-compatibility.md no difference needs any more " \
        "(remove them, or narrow them):\n" + "\n".join(f"| `{row.where}` | `{row.field}` |"
                                                       for row in unneeded)


def test_inputs_istio_refuses_are_refused_naming_the_annotation() -> None:
    """Istio has no golden for an input it refuses (a malformed traffic annotation): neither
    do we inject it, and our message names the annotation as Istio's does."""
    refused = [name for name in istio.inputs()
               if not (istio.testdata_dir() / f"{name}.injected").exists()]
    assert len(refused) >= 5, refused
    for name in refused:
        document = _documents((istio.testdata_dir() / name).read_text())[0]
        annotations = document["spec"]["template"]["metadata"]["annotations"]
        with pytest.raises(ManifestError) as refusal:
            inject_yaml((istio.testdata_dir() / name).read_text(), MESH, name)
        assert any(key in str(refusal.value) for key in annotations), (name, refusal.value)


def test_every_istio_input_is_compared() -> None:
    """Istio's test data is all there (the 94 pod and workload inputs of the issue and more):
    a module cache that lost it must not pass as an empty comparison."""
    assert len(istio.inputs()) >= 94


def _documented_names(cell: str) -> set[str]:
    """The names a row of the annotations table is about: `a/x, y, z` is a/x, a/y and a/z."""
    names: set[str] = set()
    prefix = ""
    for part in (part.strip() for part in cell.split(",")):
        if "/" in part:
            prefix = part.rsplit("/", 1)[0] + "/"
            names.add(part)
        else:
            names.add(prefix + part)
    return names


def test_every_injection_annotation_and_label_of_istio_has_a_row() -> None:
    """docs/istio-compatibility.md says, for each of Istio's injection annotations and labels
    (read from Istio's API module), whether it is supported, supported differently or not."""
    statuses = ("supported", "supported differently", "not supported")
    documented: set[str] = set()
    for cells in istio.section_rows("Annotations and labels"):
        assert len(cells) >= 3 and cells[1] in statuses, cells
        assert cells[1] == "supported" or cells[2], f"{cells[0]}: say why"
        documented |= _documented_names(cells[0])
    expected = istio.injection_names()
    assert len(expected) >= 40, expected
    missing = sorted(set(expected) - documented)
    assert not missing, f"no row in docs/istio-compatibility.md for {missing}"


# A value Istio would take for each annotation the page says is not supported.
_SAMPLE_VALUES = {
    "sidecar.istio.io/bootstrapOverride": "custom-bootstrap",
    "sidecar.istio.io/discoveryAddress": "istiod.istio-system.svc:15012",
    "sidecar.istio.io/extraStatTags": "request_host",
    "sidecar.istio.io/statsCompression": "gzip",
    "sidecar.istio.io/statsEvictionInterval": "60s",
    "sidecar.istio.io/statsFlushInterval": "10s",
    "sidecar.istio.io/statsHistogramBins": "cluster.upstream_rq_time:1,5,10",
    "sidecar.istio.io/statsHistogramBuckets": '{"cluster.upstream_rq_time":[1,5,10]}',
    "sidecar.istio.io/statsInclusionPrefixes": "cluster.outbound",
    "sidecar.istio.io/statsInclusionRegexps": "http.*",
    "sidecar.istio.io/statsInclusionSuffixes": "upstream_rq_total",
    "proxy.istio.io/overrides": '{"containers":[{"name":"istio-proxy"}]}',
    "prometheus.istio.io/secure-port": "15091",
    "inject.istio.io/templates": "gateway",
    "istio.io/rev": "canary",
}


def _injected_without(annotation: str | None) -> Any:
    metadata: dict[str, Any] = {"name": "shop", "annotations": {}}
    if annotation is not None:
        metadata["annotations"][annotation] = _SAMPLE_VALUES[annotation]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
           "spec": {"containers": [{"name": "shop", "image": "shop:1"}]}}
    injected = _documents(inject_yaml(yaml.safe_dump(pod), MESH, "pod.yaml"))[0]
    injected["metadata"]["annotations"].pop(annotation, None)
    return injected


def test_what_the_page_says_is_not_supported_has_no_effect() -> None:
    """A "not supported" row is true: the annotation changes nothing of what is injected. When
    one starts to, its row must say how it is supported now."""
    plain = _injected_without(None)
    for cells in istio.section_rows("Annotations and labels"):
        if cells[1] != "not supported":
            continue
        for name in sorted(_documented_names(cells[0])):
            assert name in _SAMPLE_VALUES, f"no sample value of {name} to check its row with"
            assert _injected_without(name) == plain, (
                f"{name} has an effect now: its row in docs/istio-compatibility.md says "
                "'not supported'")
