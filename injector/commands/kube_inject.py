"""`injector kube-inject`: the webhook's injection applied to manifests offline.

Pods and the pod templates of workloads are injected with the same code as the webhook; every
other document passes through unchanged. Without a cluster the namespace's labels are unknown,
so, as in the webhook without an API, a template counts as coming from an enabled namespace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from injector.commands.cli import CommandParser, UsageError
from injector.errors import ConfigError, InvalidInput
from injector.injection import patch, policy, sidecar
from injector.mesh.config import MeshConfig, load_mesh_config

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})


def add_arguments(parser: CommandParser) -> None:
    parser.option("-f", "--filename", required=False, help="manifest file, or - for stdin")
    parser.option("-o", "--output", default="-", help="output file (default: stdout)")
    parser.option("--config", default=None, help="mesh config YAML file")


class ManifestError(InvalidInput):
    """A document that cannot be injected; the message names it."""


def _pod_template(document: Mapping[str, Any]) -> Any:
    """The pod (a Pod itself, or a workload's template) to inject, or None for other kinds."""
    kind = document.get("kind")
    spec = document.get("spec")
    if kind == "Pod":
        return document
    if not isinstance(spec, dict):
        return None
    if kind in WORKLOAD_KINDS:
        return spec.get("template")
    if kind == "CronJob":
        job = spec.get("jobTemplate")
        job_spec = job.get("spec") if isinstance(job, dict) else None
        return job_spec.get("template") if isinstance(job_spec, dict) else None
    return None


def inject_document(document: Any, mesh: MeshConfig, where: str) -> Any:
    """The document with its pod injected, or the document itself when there is nothing to do."""
    if not isinstance(document, dict):
        return document
    if document.get("kind") == "List" and isinstance(document.get("items"), list):
        items = [
            inject_document(item, mesh, f"{where} item {index + 1}")
            for index, item in enumerate(document["items"])
        ]
        return {**document, "items": items}
    pod = _pod_template(document)
    if not isinstance(pod, dict):
        return document
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    namespace = metadata.get("namespace") or "default"
    name = metadata.get("name") or metadata.get("generateName")
    if not isinstance(pod.get("spec"), dict):
        raise ManifestError(f"{where}: the {document.get('kind')}'s pod has no spec")
    decision = policy.decide(pod, namespace, None, mesh)
    if not decision.inject:
        return document
    try:
        injection = sidecar.build(pod, mesh, name=str(name).rstrip("-") if name else None)
    except (sidecar.InvalidAnnotation, sidecar.NameConflict) as error:
        raise ManifestError(f"{where} ({document.get('kind')} {name}): {error}") from None
    injected = jsonpatch.apply_patch(pod, patch.build(pod, injection))
    if pod is document:
        return injected
    # Put the injected template back where it was found, copying only the path to it.
    if document.get("kind") == "CronJob":
        job = document["spec"]["jobTemplate"]
        job = {**job, "spec": {**job["spec"], "template": injected}}
        return {**document, "spec": {**document["spec"], "jobTemplate": job}}
    return {**document, "spec": {**document["spec"], "template": injected}}


def _read(filename: str) -> str:
    if filename == "-":
        return sys.stdin.read()
    try:
        return Path(filename).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{filename}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{filename}: cannot read: {error}") from None


def run(args: argparse.Namespace) -> int:
    if not args.filename:
        raise UsageError("kube-inject: -f FILE (or -f - for stdin) is required")
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    text = _read(args.filename)
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise UsageError(f"{args.filename}{line}: {problem}") from None
    try:
        injected = [
            inject_document(document, mesh, f"{args.filename} document {index + 1}")
            for index, document in enumerate(documents)
        ]
    except ManifestError as error:
        raise UsageError(str(error)) from None
    output = yaml.safe_dump_all(injected, sort_keys=False, default_flow_style=False)
    if args.output == "-":
        sys.stdout.write(output)
    else:
        try:
            Path(args.output).write_text(output, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"{args.output}: cannot write: {error.strerror}") from None
    return 0
