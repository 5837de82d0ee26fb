"""The Deployment's own command line (copy-cacerts, then serve), run for real on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.support.deploy import find, find_container, mesh_config_of, pod_spec, serve_args
from tests.support.servers import Server, free_port, wait_until_serving


def _secret_volume(directory: Path, files: dict[str, bytes]) -> None:
    """Lay files out as the kubelet does for a Secret volume: symlinks into a ..data dir."""
    data = directory / "..2026_11_27_00_00_00.000000000"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
    (directory / "..data").symlink_to(data.name)
    for name in files:
        (directory / name).symlink_to(f"..data/{name}")


@pytest.mark.parametrize("plugged_in", [False, True], ids=["self-signed", "cacerts-secret"])
def test_deployment_command_line_serves_its_probes(
    objects: list[dict[str, Any]], tmp_path: Path, plugged_in: bool
) -> None:
    """copy-cacerts then `injector serve` with the manifest's exact arguments (paths mapped to
    temporary directories, loopback instead of 0.0.0.0): the probes answer over HTTPS."""
    namespace = find(objects, "Namespace")["metadata"]["name"]
    pod = pod_spec(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    local = {name: tmp_path / name for name in volumes}
    for directory in local.values():
        directory.mkdir()
    data, _ = mesh_config_of(objects)
    config_file = serve_args(objects)["config"][0]
    (local["config"] / Path(config_file).name).write_text(yaml.safe_dump(data))
    plugged: dict[str, bytes] = {}
    if plugged_in:
        ca = tmp_path / "ca"
        subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir", str(ca)],
                       check=True, capture_output=True, timeout=60)
        plugged = {name: (ca / name).read_bytes() for name in (
            "root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem")}
    _secret_volume(local["cacerts"], plugged)

    def mapped(text: str, container: dict[str, Any]) -> str:
        # One pass, longest mount path first, so a mapped path is never mapped again.
        mounts = {m["mountPath"]: str(local[m["name"]]) for m in container["volumeMounts"]}
        pattern = "|".join(re.escape(path) for path in sorted(mounts, key=len, reverse=True))
        text = re.sub(rf"({pattern})(?=/|\b|$)", lambda m: mounts[m[1]], text)
        return text.replace("$(POD_NAMESPACE)", namespace)

    copy = find_container(pod["initContainers"], "copy-cacerts")
    done = subprocess.run([mapped(part, copy) for part in copy["command"]],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    certs = local["certs"]
    for name, content in plugged.items():
        assert (certs / name).read_bytes() == content
        assert (certs / name).stat().st_mode & 0o777 == 0o600
    if not plugged_in:
        assert list(certs.iterdir()) == []

    server_container = find_container(pod["containers"], "injector")
    port = free_port()
    args = []
    for arg in server_container["args"][1:]:
        if arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        args.append(mapped(arg, server_container))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "injector", "serve", *args], stdout=log,
            stderr=subprocess.STDOUT, cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if not k.startswith("INJECTOR_")},
        )
    server = Server(f"https://127.0.0.1:{port}", port, certs, process, log_path)
    try:
        wait_until_serving(server)
        with server.client() as https:
            for probe in ("readinessProbe", "livenessProbe"):
                path = server_container[probe]["httpGet"]["path"]
                response = https.get(path)
                assert response.status_code == 200, f"{probe} {path}: {response.text}"
    finally:
        server.stop()
    if plugged_in:
        assert (certs / "root-cert.pem").read_bytes() == plugged["root-cert.pem"]
    serving = x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes())
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = set(names.get_values_for_type(x509.DNSName))
    assert {f"injector.{namespace}.svc", f"injector.{namespace}.svc.cluster.local"} <= dns_names
