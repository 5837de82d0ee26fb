"""`injector check`: is my pod (not) injected, and why; is the webhook healthy.

The shell around `injector.kube.check` (the cluster's reads and probes) and
`injector.injection.explain` (the reasoning): arguments, the kubeconfig, printing the report.
Exit status 0 when all is well, 1 when a problem was found, 2 for bad usage or a check that
could not be made (the cluster out of reach, a pod that does not exist).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from injector.commands.cli import CommandParser, UsageError, read_input
from injector.errors import ConfigError, Unavailable
from injector.injection.explain import Report, render_text
from injector.kube.check import CheckFailed, ClusterCheck, load_pod_manifest
from injector.kube.client import KubeConfigError, Rest, api_client
from injector.mesh.config import load_mesh_config

TARGETS = ("pod", "namespace", "webhook", "pods")
MAX_FILE_BYTES = 1024 * 1024


def add_arguments(parser: CommandParser) -> None:
    parser.description = (
        "Check the cluster of the current kubeconfig: `check pod NAME -n NS`, `check -f "
        "pod.yaml`, `check namespace NS` (would a pod be injected, and the decision's trace), "
        "`check webhook` (the webhook's configuration, caBundle, endpoints, a dry run, "
        "overlapping webhooks), `check pods [-n NS]` (pods to create again). Exit status 0: all "
        "good; 1: problems found; 2: bad usage.")
    parser.add_argument("target", nargs="?", choices=TARGETS, metavar="WHAT",
                        help="pod, namespace, webhook or pods")
    parser.add_argument("name", nargs="?", help="the pod's or the namespace's name")
    parser.add_argument("-n", "--namespace", default=None,
                        help="the pod's namespace (pods: only this one; default: all)")
    parser.add_argument("-f", "--filename", default=None,
                        help="a Pod or workload manifest to check instead of a stored pod "
                             "(- for stdin)")
    parser.add_argument("-o", "--output", default="text", choices=("text", "json"),
                        help="text (default) or json")
    parser.option("--kubeconfig", default=None,
                  help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else the "
                       "in-cluster service account)")
    parser.option("--config", default=None,
                  help="the mesh config YAML file the injector runs with (its policy, "
                       "ignored namespaces, revision and proxy image)")


def _kubeconfig(flag: str | None) -> str | None:
    if flag:
        return flag
    from_env = [path for path in os.environ.get("KUBECONFIG", "").split(os.pathsep) if path]
    if from_env:
        return from_env[0]
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() else None


def _read_manifest(filename: str) -> Any:
    data = read_input(filename, MAX_FILE_BYTES, "check")
    try:
        return list(yaml.safe_load_all(data.decode("utf-8")))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise UsageError(f"{filename}: not a YAML or JSON manifest") from None


def _validate(args: argparse.Namespace) -> None:
    target, name = args.target, args.name
    if args.filename is not None:
        if target is not None:
            raise UsageError("check: -f FILE checks the pod in the file; give no WHAT with it")
        return
    if target is None:
        raise UsageError("check: say what to check: pod NAME -n NS, -f FILE, namespace NS, "
                         "webhook or pods")
    if target in ("pod", "namespace") and not name:
        raise UsageError(f"check {target}: the {target}'s name is required")
    if target == "pod" and not args.namespace:
        raise UsageError("check pod: -n NAMESPACE is required")
    if target in ("webhook", "pods") and name:
        raise UsageError(f"check {target}: takes no name (pods: -n NAMESPACE)")


def _report(args: argparse.Namespace, checker: ClusterCheck) -> Report:
    if args.filename is not None:
        pod = load_pod_manifest(_read_manifest(args.filename), args.filename)
        namespace = args.namespace or (pod.get("metadata") or {}).get("namespace") or "default"
        return checker.check_manifest(pod, namespace)
    if args.target == "pod":
        return checker.check_pod(args.name, args.namespace)
    if args.target == "namespace":
        return checker.check_namespace(args.name)
    if args.target == "webhook":
        return checker.check_webhook()
    return checker.check_pods(args.namespace)


def run(args: argparse.Namespace) -> int:
    _validate(args)
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
        api = api_client(_kubeconfig(args.kubeconfig))
    except (ConfigError, KubeConfigError) as error:
        raise UsageError(str(error)) from None
    if api is None:
        raise UsageError("check: no kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) "
                         "and not in a pod")
    try:
        report = _report(args, ClusterCheck(Rest(api), mesh))
    except CheckFailed as error:
        raise UsageError(f"check: {error}") from None
    except Unavailable as error:
        raise UsageError(f"check: the cluster cannot be asked: {error}") from None
    finally:
        api.close()
    if args.output == "json":
        sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    else:
        sys.stdout.write(render_text(report))
    sys.stdout.flush()
    return 1 if report.problems else 0
