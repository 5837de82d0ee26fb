"""A type-driven mutator: every JSON type, in every position of a valid document.

Random bytes rarely get past a parser, and random documents rarely look like a review; the
bugs are where a field of the right name holds the wrong type (an `apiVersion` that is an
object, a `name` that is a list nested 1,000 deep, digits from another script). So, from one
valid document, this makes every document that differs from it at one place: each position
(the root, every value of every object, every item of every list) holds, in turn, each of
`HOSTILE` (null, booleans, integers small, at the 64-bit edge and past it, floats, strings
empty, huge and of non-ASCII digits, lists, objects, deep nesting), or, in an object, is
missing. Then, for a longer run, random combinations of several such changes at once.

The documents are encoded with `encode` (orjson, with `orjson.Fragment` for what orjson
would refuse to write: integers past 64 bits, nesting past its 1,024 levels), so the same
cases serve as JSON bodies and, JSON being YAML, as manifests.

`cases(document, count)` yields `Case`s: the systematic ones first (all of them when `count`
allows, else an even spread across positions), then random combinations up to `count`, from a
fixed seed: a failure names its case and comes back on the next run.
"""

from __future__ import annotations

import base64
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import jsonpointer
import orjson

from injector.injection.manifests import ManifestError, inject_yaml
from injector.mesh.config import MeshConfig
from tests.support.pods import replicaset_pod, review

# The environment knob: cases per target in a run (`make bench` runs many more).
CASES_VARIABLE = "INJECTOR_FUZZ_CASES"

DEEP = 2_000  # past orjson's 1,024 levels and libyaml's 1,000
HUGE_STRING = 300 * 1024  # past Kubernetes' 256 KiB of annotations


def _deep(opening: bytes, closing: bytes, depth: int = DEEP) -> orjson.Fragment:
    return orjson.Fragment(opening * depth + b"1" + closing * depth)


@dataclass(frozen=True)
class Hostile:
    name: str
    value: Any


class _Missing:
    """The mutation that removes a key from its object."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()

HOSTILE: tuple[Hostile, ...] = (
    Hostile("null", None),
    Hostile("true", True),
    Hostile("false", False),
    Hostile("zero", 0),
    Hostile("negative int", -1),
    Hostile("int64 max", 2**63 - 1),
    Hostile("huge int", orjson.Fragment(str(2**80).encode())),
    Hostile("float", 1.5),
    Hostile("huge float", 1.7e308),
    Hostile("empty string", ""),
    Hostile("string", "x"),
    Hostile("huge string", "x" * HUGE_STRING),
    Hostile("non-ASCII digits", "\uff11\uff10\uff10m"),
    Hostile("control characters", "\x00\n\u2028"),
    Hostile("the init container's name", "istio-init"),
    Hostile("empty list", []),
    Hostile("list", [1, "a", None]),
    Hostile("empty object", {}),
    Hostile("object", {"a": 1, "": None}),
    Hostile("deep list", _deep(b"[", b"]")),
    Hostile("deep object", _deep(b'{"a":', b"}")),
    # Within orjson's 1,024 levels at a shallow position: parsed, then met by the code.
    Hostile("nested 1,000 deep", _deep(b'{"a":[', b"]}", 500)),
    Hostile("nested 50 deep", _deep(b"[", b"]", 50)),
)

Path = tuple[str | int, ...]


def positions(document: Any, prefix: Path = ()) -> list[Path]:
    """Every position in `document`: the root, then each value of each object and item of each
    list, depth first (iteratively: the valid documents are shallow, but this is a fuzzer)."""
    found: list[Path] = []
    pending: list[tuple[Path, Any]] = [(prefix, document)]
    while pending:
        path, value = pending.pop()
        found.append(path)
        if isinstance(value, dict):
            pending.extend(((*path, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            pending.extend(((*path, index), item)
                           for index, item in reversed(list(enumerate(value))))
    return found


def _shallow(container: Any) -> Any:
    return dict(container) if isinstance(container, dict) else list(container)


def mutated(document: Any, path: Path, value: Any) -> Any:
    """`document` with `value` at `path` (MISSING: without the key). Only the objects and lists
    on the path are copied: the rest is shared with `document`, which is never changed."""
    if not path:
        return None if value is MISSING else value
    copied = parent = _shallow(document)
    for step in path[:-1]:
        child = _shallow(parent[step])
        parent[step] = child
        parent = child
    if value is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copied


@dataclass(frozen=True)
class Case:
    description: str
    document: Any


def _systematic(document: Any) -> list[Case]:
    made = []
    for path in positions(document):
        where = "/" + "/".join(str(step) for step in path)
        parent_is_object = bool(path) and isinstance(_at(document, path[:-1]), dict)
        values = [*HOSTILE, Hostile("missing", MISSING)] if parent_is_object else list(HOSTILE)
        for hostile in values:
            made.append(Case(f"{hostile.name} at {where}", mutated(document, path, hostile.value)))
    return made


def _at(document: Any, path: Path) -> Any:
    for step in path:
        document = document[step]
    return document


def systematic_count(document: Any) -> int:
    """How many single changes `cases` makes of `document` before random combinations."""
    return sum(len(HOSTILE) + (1 if path and isinstance(_at(document, path[:-1]), dict) else 0)
               for path in positions(document))


def cases(document: Any, count: int, seed: int = 13) -> Iterator[Case]:
    """`count` mutated copies of `document` (see the module's docstring)."""
    single = _systematic(document)
    if count <= len(single):
        # An even spread: every position and every kind of value still shows up.
        step = len(single) / count
        yield from (single[int(index * step)] for index in range(count))
        return
    yield from single
    chooser = random.Random(seed)
    for number in range(count - len(single)):
        current, changes = document, []
        for _ in range(chooser.randint(2, 4)):
            spots = positions(current)
            path = chooser.choice(spots[1:] or spots)
            parent = _at(current, path[:-1]) if path else None
            options = [*HOSTILE, Hostile("missing", MISSING)] if isinstance(parent, dict) \
                else list(HOSTILE)
            hostile = chooser.choice(options)
            current = mutated(current, path, hostile.value)
            changes.append(f"{hostile.name} at /{'/'.join(str(step) for step in path)}")
            if not isinstance(current, dict | list):
                break
        yield Case(f"combination {number}: " + ", ".join(changes), current)


def case_count(default: int) -> int:
    """The cases per target this run makes: `INJECTOR_FUZZ_CASES`, or `default`."""
    text = os.environ.get(CASES_VARIABLE, "")
    return int(text) if text.strip() else default


def encode(document: Any) -> bytes:
    """`document` as JSON (MISSING never appears: `mutated` removed its key)."""
    return orjson.dumps(document)


# --- The targets: a valid document of each, and what makes an answer to a mutation wrong -------


def review_document() -> dict[str, Any]:
    """A ReplicaSet's pod as the API server reviews it, with an override of each kind the
    injector parses (quantity, ProxyConfig YAML, CIDR and port lists), an init container and a
    volume: every place a value is read is a position to mutate."""
    body = review(replicaset_pod())
    pod = body["request"]["object"]
    pod["metadata"]["annotations"] = {
        "sidecar.istio.io/proxyCPU": "200m",
        "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\n",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8,fd00::/8",
        "traffic.sidecar.istio.io/includeInboundPorts": "9080",
    }
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "flyway:10"}]
    return body


def manifest_document() -> dict[str, Any]:
    """A Deployment as kube-inject reads it, with the same overrides on its template."""
    template = review_document()["request"]["object"]
    template["metadata"].pop("generateName")
    template["metadata"].pop("ownerReferences")
    template.pop("apiVersion")
    template.pop("kind")
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "template": template}}


def csr_document(csr_pem: str) -> dict[str, Any]:
    """A certificate request as a sidecar sends it."""
    return {"csr": csr_pem, "ttl_seconds": 3600}


def _json_object(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _error_problem(status: int, body: bytes) -> str | None:
    answer = _json_object(body)
    if not isinstance(answer, dict) or not isinstance(answer.get("error"), str) or not answer[
            "error"]:
        return f"HTTP {status} without a JSON error: {body[:200]!r}"
    return None


def inject_problem(sent: bytes, status: int, body: bytes) -> str | None:
    """What is wrong with `/inject`'s answer to `sent`, or None: a 400 or 413 with a JSON
    error, or a review answered in kind whose patch, if any, applies to the pod and leaves its
    container names unique."""
    if status in (400, 413):
        return _error_problem(status, body)
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    answer, request = _json_object(body), orjson.loads(sent)
    if not isinstance(answer, dict) or answer.get("kind") != "AdmissionReview":
        return f"not an AdmissionReview: {body[:200]!r}"
    response = answer.get("response") or {}
    if answer.get("apiVersion") != request["apiVersion"] or response.get("uid") != request[
            "request"]["uid"]:
        return "the answer is not in kind, or not for this uid"
    if not isinstance(response.get("allowed"), bool):
        return f"allowed is {response.get('allowed')!r}"
    if not response["allowed"]:
        message = (response.get("status") or {}).get("message")
        return None if isinstance(message, str) and message and "patch" not in response else (
            f"a refusal without a message, or with a patch: {response}")
    if "patch" not in response:
        return None
    try:
        # In place: the object is this function's own copy, and may nest 1,000 deep (too deep
        # for copy.deepcopy).
        patched = jsonpatch.apply_patch(request["request"]["object"],
                                        orjson.loads(base64.b64decode(response["patch"])),
                                        in_place=True)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, ValueError) as error:
        return f"the patch does not apply: {error}"
    spec = patched.get("spec") or {}
    added = [container for field in ("containers", "initContainers")
             for container in spec.get(field) or ()]
    names = [container.get("name") for container in added]
    if len(names) != len(set(map(repr, names))):
        return f"container names not unique after injection: {names}"
    for container in added:
        if container.get("name") not in ("istio-init", "istio-proxy"):
            continue
        for kind in ("requests", "limits"):
            for quantity in ((container.get("resources") or {}).get(kind) or {}).values():
                if not isinstance(quantity, str) or not _QUANTITY.fullmatch(quantity):
                    return f"{container['name']} has {kind} {quantity!r}, not a quantity"
    return None


# Kubernetes' quantity grammar, written again here rather than imported: what is checked is
# that the injector's own parser agrees with it.
_QUANTITY = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?:[eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE])?")


def certificate_problem(status: int, body: bytes) -> str | None:
    """What is wrong with `/v1/certificates`' answer, or None: a JSON error for any refusal
    (never a 5xx), a certificate chain for a 200."""
    if status in (400, 401, 403, 413, 429):
        return _error_problem(status, body)
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    answer = _json_object(body)
    if not isinstance(answer, dict) or not isinstance(answer.get("certificate_chain"), list):
        return f"a 200 without a certificate chain: {body[:200]!r}"
    return None


def manifest_problem(text: str, mesh: MeshConfig) -> str | None:
    """What is wrong with kube-inject's handling of `text` in-process, or None: YAML out, or a
    one-line ManifestError; any other exception is the problem."""
    try:
        out = inject_yaml(text, mesh, "fuzz.yaml")
    except ManifestError as error:
        return None if "\n" not in str(error) else f"a message of several lines: {error}"
    except Exception as error:  # what the fuzzer is for
        return f"{type(error).__name__}: {str(error)[:200]}"
    return None if isinstance(out, str) else f"not text: {type(out).__name__}"


@dataclass
class Run:
    """A fuzzing run over one target: how many cases, which failed (and how), how long."""

    target: str
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0


def run(target: str, document: Any, count: int,
        problem: Callable[[Case], str | None]) -> Run:
    """Every case of `document` through `problem` (which sends it and judges the answer)."""
    result = Run(target)
    started = time.perf_counter()
    for case in cases(document, count):
        result.cases += 1
        found = problem(case)
        if found is not None:
            result.failures.append(f"{case.description}: {found}")
    result.seconds = time.perf_counter() - started
    return result
