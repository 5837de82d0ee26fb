"""Istio's own CA client (tests/istio/caclient, over Istio's Go code) as a peer of the tests:
built by tests/istio/build.sh into a cache outside the work tree, run here as a subprocess."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import ISTIO_SCRIPT, built

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> Path:
    """The path of `name` (caclient, ...); fails the test, saying how to build it, when it is
    not built."""
    return built(ISTIO_SCRIPT, name)


@dataclass
class CaClientResult:
    """What Istio's CA client did: the chain it wrote (PEM, leaf first) or the error it reports
    (one line, as pilot-agent would log it)."""

    returncode: int
    chain_pem: str
    error: str


def istio_ca_client(workdir: Path, *, address: str, root_cert: Path, csr_pem: bytes,
                    token: str | None, ttl_seconds: int = 86400,
                    cluster_id: str = "Kubernetes") -> CaClientResult:
    """Ask the CA at `address` (host:port) for a certificate with Istio's own CA client
    (tests/istio/caclient), as pilot-agent does: the token in a file, the CSR in another."""
    workdir.mkdir(parents=True, exist_ok=True)
    csr_path = workdir / "request.csr"
    csr_path.write_bytes(csr_pem)
    out = workdir / "chain.pem"
    out.unlink(missing_ok=True)
    command = [str(tool("caclient")), "-addr", address, "-root", str(root_cert),
               "-csr", str(csr_path), "-ttl", str(ttl_seconds), "-cluster-id", cluster_id,
               "-out", str(out)]
    if token is not None:
        token_path = workdir / "token"
        token_path.write_text(token)
        token_path.chmod(0o600)
        command += ["-token-file", str(token_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("caclient: ")]
    return CaClientResult(done.returncode, out.read_text() if out.exists() else "",
                          errors[-1] if errors else done.stderr.strip())
