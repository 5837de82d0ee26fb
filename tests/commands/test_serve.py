"""`injector serve --revision`: the revision a server injects as, on every pod it injects."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import jsonpatch

from tests.support.pods import pod, review
from tests.support.servers import start_server


def test_a_revision_servers_pods_carry_its_revision(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--revision", "canary")
    try:
        with server.client() as client:
            body = review(pod())
            answer = client.post("/inject", json=body).json()["response"]
    finally:
        server.stop()
    ops = json.loads(base64.b64decode(answer["patch"]))
    injected = jsonpatch.apply_patch(body["request"]["object"], ops)
    annotations = injected["metadata"]["annotations"]
    assert annotations["istio.io/rev"] == "canary"
    assert json.loads(annotations["sidecar.istio.io/status"])["revision"] == "canary"


def test_a_bad_revision_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "injector", "serve", "--revision", "Canary_1",
                           "--certs-dir", str(tmp_path / "certs")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--revision 'Canary_1': not a revision name" in done.stderr
