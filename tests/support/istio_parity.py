"""Istio as the oracle of our injector: its test data, its injector, and what both are compared on.

Istio's files are never copied into this repository. Its injector's test data
(pkg/kube/inject/testdata/inject: inputs and their `.injected` goldens) and its charts are read
from the Go module cache, at the version pinned in tests/istio/go.mod; Istio's injector runs as
tests/istio/inject, a program of ours over Istio's pkg/kube/inject, built with the other Istio
tools by tests/istio/build.sh (`make cluster-binaries`) into a cache outside the work tree.

Both sides are reduced to what users and the cluster notice (`observe`): whether a pod is
injected, the init container's capture settings (its arguments read into one form), the app
containers after injection, the proxy's image, resources, ports, probes, security context and
place, the labels and annotations added, and the volumes (`volume.NAME`). The proxy's command,
arguments and environment are not compared: our agent is not pilot-agent, by design.

The differences that remain are listed, with why, in docs/istio-compatibility.md, in tables the
tests read (`documented_differences`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from injector.mesh.quantity import parse_quantity
from tests.support.peers import BUILD_COMMAND, ISTIO_SCRIPT, built

REPO = Path(__file__).resolve().parents[2]
GO_MOD = REPO / "tests" / "istio" / "go.mod"
COMPATIBILITY_DOC = REPO / "docs" / "istio-compatibility.md"

PROXY = "istio-proxy"
INIT = "istio-init"
STATUS_ANNOTATION = "sidecar.istio.io/status"
# The kinds whose pod template is at spec.template (a CronJob's is at spec.jobTemplate.spec...).
TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job",
                            "ReplicationController", "DeploymentConfig"})


def istio_version() -> str:
    """The pseudo-version of istio.io/istio pinned in tests/istio/go.mod."""
    match = re.search(r"^\s*istio\.io/istio\s+(v\S+)", GO_MOD.read_text(), re.MULTILINE)
    if match is None:
        raise AssertionError(f"{GO_MOD} pins no istio.io/istio version")
    return match.group(1)


@functools.cache
def module_dir() -> Path:
    """Istio's module in the Go module cache; an AssertionError naming the fix when it is not
    there (building the Istio tools fetches it)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    try:
        cache = subprocess.run([go, "env", "GOMODCACHE"], check=True, capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        raise AssertionError(f"cannot ask Go for its module cache ({error}); "
                             f"run `{BUILD_COMMAND}`") from None
    path = Path(cache) / f"istio.io/istio@{istio_version()}"
    if not path.is_dir():
        raise AssertionError(f"Istio's module is not in the Go module cache ({path}); "
                             f"run `{BUILD_COMMAND}`")
    return path


# The prefixes of the annotations and labels that concern sidecar injection, and istio.io/rev.
INJECTION_NAME = re.compile(r"^((sidecar|traffic\.sidecar|proxy|status\.sidecar|"
                            r"readiness\.status\.sidecar|inject)\.istio\.io/.+|istio\.io/rev)$")


def injection_names() -> list[str]:
    """Every annotation and label of Istio's API (istio.io/api, at the version tests/istio/go.mod
    pins) that concerns sidecar injection (INJECTION_NAME)."""
    match = re.search(r"^\s*istio\.io/api\s+(v\S+)", GO_MOD.read_text(), re.MULTILINE)
    if match is None:
        raise AssertionError(f"{GO_MOD} pins no istio.io/api version")
    api = module_dir().parent / f"api@{match.group(1)}"
    names: set[str] = set()
    for listing, key in (("annotation/annotations.yaml", "annotations"),
                         ("label/labels.yaml", "labels")):
        path = api / listing
        if not path.exists():
            raise AssertionError(f"{path} is missing; run `{BUILD_COMMAND}`")
        for entry in yaml.safe_load(path.read_text())[key]:
            if INJECTION_NAME.match(str(entry["name"])):
                names.add(str(entry["name"]))
    return sorted(names)


def testdata_dir() -> Path:
    """Istio's injector test data: inputs `X.yaml` and goldens `X.yaml.injected`."""
    return module_dir() / "pkg" / "kube" / "inject" / "testdata" / "inject"


def manifests_dir() -> Path:
    """Istio's charts, whose istio-discovery chart holds the default injection templates."""
    return module_dir() / "manifests"


def inputs() -> list[str]:
    """Every input of Istio's injector test data (not the install settings, `*.iop.yaml`)."""
    return sorted(path.name for path in testdata_dir().glob("*.yaml")
                  if not path.name.endswith(".iop.yaml"))


def inject_binary() -> Path:
    """tests/istio/inject, built; the test fails, naming the command that builds it."""
    return built(ISTIO_SCRIPT, "inject")


def istio_inject_each(documents: Sequence[Any], *, native_sidecars: bool,
                      timeout: float = 120.0) -> list[list[Any] | str]:
    """Each document injected by Istio's own injector, all in one run of the program: per
    document, the documents Istio wrote, or its error message (a string) when it refuses it."""
    stream = yaml.safe_dump_all(list(documents), sort_keys=False)
    env = {**os.environ, "ENABLE_NATIVE_SIDECARS": "true" if native_sidecars else "false"}
    result = subprocess.run(
        [str(inject_binary()), "--manifests", str(manifests_dir()), "--json"],
        input=stream, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"Istio's injector failed: {result.stderr.strip()[-2000:]}")
    answers: list[list[Any] | str] = []
    for line in result.stdout.splitlines():
        answer = json.loads(line)
        if "error" in answer:
            answers.append(str(answer["error"]))
        else:
            answers.append([document for document in yaml.safe_load_all(answer["injected"])
                            if document is not None])
    if len(answers) != len(documents):
        raise AssertionError(f"Istio's injector answered {len(answers)} of {len(documents)} "
                             f"documents: {result.stderr.strip()[-2000:]}")
    return answers


# --- What is compared ---------------------------------------------------------------------------


def pod_templates(document: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, pod) for every pod in a document: a Pod, a workload's template, a List's items."""
    if not isinstance(document, Mapping):
        return
    kind = document.get("kind")
    if kind == "List":
        for index, item in enumerate(document.get("items") or []):
            for where, pod in pod_templates(item):
                yield f"items[{index}].{where}", pod
        return
    spec = document.get("spec") or {}
    if kind == "Pod":
        yield "Pod", document
    elif kind in TEMPLATE_KINDS and isinstance(spec.get("template"), Mapping):
        yield str(kind), spec["template"]
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        if isinstance(template, Mapping):
            yield "CronJob", template


def _flag_values(args: Sequence[str]) -> dict[str, str]:
    """istio-iptables' flags by name (short or long; `-x v`, `--x=v` or `--x v`)."""
    values: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-"):
            continue
        name, equals, value = arg.lstrip("-").partition("=")
        if not equals:
            if index < len(args) and not args[index].startswith("-"):
                value = args[index]
                index += 1
            else:
                value = "true"
        values[name] = value
    return values


# istio-iptables' flags by meaning: short name, long name. `injector iptables` takes the same.
_CAPTURE_FLAGS = {
    "proxy_port": ("p", "envoy-port"),
    "inbound_port": ("z", "inbound-capture-port"),
    "uid": ("u", "proxy-uid"),
    "gid": ("g", "proxy-gid"),
    "mode": ("m", "istio-inbound-interception-mode"),
    "include_cidrs": ("i", "istio-service-cidr"),
    "exclude_cidrs": ("x", "istio-service-exclude-cidr"),
    "include_inbound_ports": ("b", "istio-inbound-ports"),
    "exclude_inbound_ports": ("d", "istio-local-exclude-ports"),
    "include_outbound_ports": ("q", "istio-include-outbound-ports"),
    "exclude_outbound_ports": ("o", "istio-local-outbound-ports-exclude"),
    "exclude_interfaces": ("c", "istio-exclude-interfaces"),
    "reroute_interfaces": ("k", "istio-inbound-virtual-interfaces"),
}
_LIST_KEYS = frozenset({"include_cidrs", "exclude_cidrs", "include_inbound_ports",
                        "exclude_inbound_ports", "include_outbound_ports",
                        "exclude_outbound_ports", "exclude_interfaces", "reroute_interfaces"})


def capture_settings(init: Mapping[str, Any]) -> dict[str, Any]:
    """The init container's capture settings, one form for istio-iptables and ours: lists sorted
    (their order means nothing to the rules), the gid the uid when not given (Istio's default),
    the mode REDIRECT when not given."""
    args = [str(arg) for arg in (init.get("command") or []) + (init.get("args") or [])]
    flags = _flag_values(args)
    settings: dict[str, Any] = {}
    for key, names in _CAPTURE_FLAGS.items():
        value = next((flags[name] for name in names if name in flags), None)
        if key in _LIST_KEYS:
            settings[key] = sorted(part for part in (value or "").split(",") if part)
        else:
            settings[key] = value
    if settings["gid"] is None:
        settings["gid"] = settings["uid"]
    if settings["mode"] is None:
        settings["mode"] = "REDIRECT"
    return settings


def _without_noise(value: Any) -> Any:
    """Empty maps and lists dropped, recursively: `resources: {}` means nothing to anyone."""
    if isinstance(value, Mapping):
        cleaned = {key: _without_noise(item) for key, item in value.items()}
        return {key: item for key, item in cleaned.items() if item not in ({}, [], None)}
    if isinstance(value, list):
        return [_without_noise(item) for item in value]
    return value


def _resources(resources: Any) -> Any:
    """Requests and limits as numbers, so that `2000m` and `2` (the same CPU) compare equal."""
    if not isinstance(resources, Mapping):
        return resources
    return {
        kind: {name: format(parse_quantity(str(value)).normalize(), "f")
               for name, value in amounts.items()}
        if isinstance(amounts, Mapping) else amounts
        for kind, amounts in _without_noise(resources).items()
    }


def _probe(probe: Any) -> Any:
    """A probe without what the API server fills in when absent (`scheme: HTTP`)."""
    probe = _without_noise(probe)
    if isinstance(probe, Mapping) and isinstance(probe.get("httpGet"), Mapping):
        action = {key: value for key, value in probe["httpGet"].items()
                  if (key, value) != ("scheme", "HTTP")}
        probe = {**probe, "httpGet": action}
    return probe


def _status(value: str) -> Any:
    """The status annotation's record of containers (its volumes are compared on their own)."""
    try:
        record = json.loads(value)
    except ValueError:
        return value
    if not isinstance(record, dict):
        return value
    return {key: record.get(key) or [] for key in ("initContainers", "containers")}


def _added(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, Any]:
    before, after = before or {}, after or {}
    return {key: value for key, value in after.items() if before.get(key) != value}


def observe(original: Mapping[str, Any], injected: Mapping[str, Any]) -> dict[str, Any]:
    """What users and the cluster notice of one pod's injection, as {field: value}; each label
    and annotation added (or changed) is a field of its own, `label.KEY`, `annotation.KEY`."""
    metadata = injected.get("metadata") or {}
    spec = injected.get("spec") or {}
    containers = list(spec.get("containers") or [])
    init_containers = list(spec.get("initContainers") or [])
    annotations = metadata.get("annotations") or {}
    is_injected = STATUS_ANNOTATION in annotations
    seen: dict[str, Any] = {"injected": is_injected}
    if not is_injected:
        return seen
    init = next((c for c in init_containers if c.get("name") == INIT), None)
    seen["init.present"] = init is not None
    if init is not None:
        for key, value in capture_settings(init).items():
            seen[f"init.{key}"] = value
    proxy = next((c for c in containers + init_containers if c.get("name") == PROXY), None)
    if proxy is not None:
        seen["proxy.native"] = proxy in init_containers and proxy.get("restartPolicy") == "Always"
        seen["proxy.image"] = proxy.get("image")
        seen["proxy.resources"] = _resources(proxy.get("resources") or {})
        seen["proxy.ports"] = sorted(
            (_without_noise(port) for port in proxy.get("ports") or []),
            key=lambda port: (port.get("containerPort", 0), port.get("name", "")))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            seen[f"proxy.{probe}"] = _probe(proxy.get(probe))
        seen["proxy.securityContext"] = _without_noise(proxy.get("securityContext") or {})
    seen["order.containers"] = [c.get("name") for c in containers]
    seen["order.initContainers"] = [c.get("name") for c in init_containers]
    for container in containers + init_containers:
        if container.get("name") not in (PROXY, INIT):
            seen[f"app.{container.get('name')}"] = _without_noise(container)
    original_metadata = original.get("metadata") or {}
    added = _added(original_metadata.get("annotations"), annotations)
    if STATUS_ANNOTATION in added:
        added[STATUS_ANNOTATION] = _status(added[STATUS_ANNOTATION])
    for key, value in added.items():
        seen[f"annotation.{key}"] = value
    for key, value in _added(original_metadata.get("labels"), metadata.get("labels")).items():
        seen[f"label.{key}"] = value
    for volume in spec.get("volumes") or []:
        seen[f"volume.{volume.get('name')}"] = True  # by name: what is in it is ours to choose
    seen["pod.securityContext"] = _without_noise(spec.get("securityContext") or {})
    return seen


def observe_documents(originals: Iterable[Any], injected: Iterable[Any]) -> list[dict[str, Any]]:
    """`observe` for every pod of a file, pairing the pods of the input and the output in order."""
    before = [pod for document in originals for _, pod in pod_templates(document)]
    after = [pod for document in injected for _, pod in pod_templates(document)]
    if len(before) != len(after):
        raise AssertionError(f"{len(before)} pods in, {len(after)} out")
    return [observe(old, new) for old, new in zip(before, after, strict=True)]


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (ours, Istio's)} for every field that differs."""
    return {field: (ours.get(field), theirs.get(field)) for field in sorted(set(ours) | set(theirs))
            if ours.get(field) != theirs.get(field)}


# --- What is documented -------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """A row of a differences table: where (names separated by commas, or `*` for everywhere),
    which field (exact, or a prefix ending in `*`; a lone `*` is every field), and why."""

    where: str
    field: str
    why: str

    def covers(self, where: str, field: str) -> bool:
        if self.where != "*" and where not in {part.strip() for part in self.where.split(",")}:
            return False
        if self.field.endswith("*"):
            return field.startswith(self.field[:-1])
        return field == self.field


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def section_rows(section: str) -> list[list[str]]:
    """The body rows of the table under `## {section}` in docs/istio-compatibility.md, cells
    without their back-quotes."""
    lines = COMPATIBILITY_DOC.read_text().splitlines()
    try:
        start = lines.index(f"## {section}")
    except ValueError:
        raise AssertionError(f"{COMPATIBILITY_DOC} has no section '## {section}'") from None
    rows: list[list[str]] = []
    header_seen = False
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            continue
        if not header_seen:
            header_seen = True
            continue
        cells = [cell.replace("`", "") for cell in _cells(line)]
        if set("".join(cells)) <= {"-", " "}:
            continue
        rows.append(cells)
    if not rows:
        raise AssertionError(f"the section '## {section}' of {COMPATIBILITY_DOC} has no rows")
    return rows


def documented_differences(section: str) -> list[Difference]:
    """The rows (where, field, why) of a differences table of docs/istio-compatibility.md."""
    return [Difference(cells[0], cells[1], cells[2]) for cells in section_rows(section)
            if len(cells) >= 3]


# --- Istio's injector, kept running -------------------------------------------------------------


class IstioInjector:
    """tests/istio/inject (`--json`) kept running, sent one document at a time: the program's
    start (rendering Istio's chart) is paid once, however many pods a test injects."""

    def __init__(self, *, native_sidecars: bool, timeout: float = 60.0) -> None:
        env = {**os.environ, "ENABLE_NATIVE_SIDECARS": "true" if native_sidecars else "false"}
        self._timeout = timeout
        # Kept open as long as the process runs, closed by close().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            [str(inject_binary()), "--manifests", str(manifests_dir()), "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)

    def _died(self) -> AssertionError:
        self._stderr.seek(0)
        return AssertionError("Istio's injector stopped answering: "
                              + self._stderr.read().decode(errors="replace")[-2000:])

    def inject(self, document: Any) -> list[Any] | str:
        """The documents Istio writes for `document`, or its error message when it refuses it."""
        assert self._process.stdin is not None and self._process.stdout is not None
        # The reader hands a document over when the next one begins: hence the "---" after it.
        text = yaml.safe_dump(document, sort_keys=False) + "---\n"
        try:
            self._process.stdin.write(text.encode())
            self._process.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        ready, _, _ = select.select([self._process.stdout], [], [], self._timeout)
        line = self._process.stdout.readline() if ready else b""
        if not line:
            raise self._died()
        answer = json.loads(line)
        if "error" in answer:
            return str(answer["error"])
        return [doc for doc in yaml.safe_load_all(answer["injected"]) if doc is not None]

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._stderr.close()
