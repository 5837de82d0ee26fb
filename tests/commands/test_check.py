"""`injector check`'s command line, without a cluster: what it refuses before asking one, each in
one line with exit status 2. (The checks themselves, against the real API server:
tests/kube/test_cluster_check.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def check(*args: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # No kubeconfig of the machine's, nor a pod's service account, may leak in.
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
                   and not key.startswith("INJECTOR_")}
    environment["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "injector", "check", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False,
                          env=environment)


@pytest.mark.parametrize(("args", "message"), [
    ((), "injector: check: say what to check: pod NAME -n NS, -f FILE, namespace NS, webhook "
         "or pods"),
    (("pod",), "injector: check pod: the pod's name is required"),
    (("pod", "web"), "injector: check pod: -n NAMESPACE is required"),
    (("namespace",), "injector: check namespace: the namespace's name is required"),
    (("webhook", "extra"), "injector: check webhook: takes no name (pods: -n NAMESPACE)"),
    (("pod", "web", "-n", "shop", "-f", "pod.yaml"),
     "injector: check: -f FILE checks the pod in the file; give no WHAT with it"),
    # (argparse's own words, whose quoting of the choices differs between Python releases)
    (("deployment",), "injector check: argument WHAT: invalid choice: 'deployment' (choose "
                      "from "),
    (("webhook", "-o", "yaml"), "injector check: argument -o/--output: invalid choice: 'yaml' "
                                "(choose from "),
    (("webhook",), "injector: check: no kubeconfig (--kubeconfig, $KUBECONFIG or "
                   "~/.kube/config) and not in a pod"),
], ids=["nothing", "pod-no-name", "pod-no-namespace", "namespace-no-name", "webhook-name",
        "file-and-pod", "unknown-target", "unknown-output", "no-kubeconfig"])
def test_bad_usage_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...],
                                          message: str) -> None:
    done = check(*args, home=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.strip() == message or (message.endswith("(choose from ")
                                              and done.stderr.startswith(message))


def test_a_kubeconfig_that_cannot_be_used_is_exit_2(tmp_path: Path) -> None:
    done = check("webhook", "--kubeconfig", str(tmp_path / "missing"), home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"injector: kubeconfig {tmp_path / 'missing'}: no such file"
    broken = tmp_path / "broken"
    broken.write_text("clusters: [")
    done = check("webhook", "--kubeconfig", str(broken), home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"injector: kubeconfig {broken}: ")
    assert len(done.stderr.splitlines()) == 1


def test_a_cluster_out_of_reach_is_exit_2(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    # A loopback port nothing listens on: refused at once.
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    done = check("webhook", "--kubeconfig", str(kubeconfig), home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("injector: check: the cluster cannot be asked: reading ")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("content", "message"), [
    ("kind: Pod\n---\nkind: Pod\n", "expected one Pod or workload, found 2 documents"),
    ("kind: Service\nspec: {}\n", "a Service has no pod to check"),
    ("{[", "not a YAML or JSON manifest"),
])
def test_a_manifest_that_is_not_one_pod_is_exit_2(tmp_path: Path, content: str,
                                                  message: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    done = check("-f", "-", "--kubeconfig", str(kubeconfig), home=tmp_path, stdin=content)
    assert done.returncode == 2
    assert done.stderr.strip() in (f"injector: check: -: {message}", f"injector: -: {message}")
