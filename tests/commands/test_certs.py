"""`injector certs init`, run as users run it: a real process, its output and exit code."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

REPO = Path(__file__).resolve().parents[2]


def _injector(*args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env = {k: v for k, v in full_env.items()
                if not k.startswith("INJECTOR_") or k in (env or {})}
    return subprocess.run([sys.executable, "-m", "injector", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=60, check=False,
                          umask=umask)


def test_init_creates_the_directory_and_is_idempotent(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    result = _injector("certs", "init", "--certs-dir", str(certs), "--dns-name", "a.example",
                       "--dns-name", "b.example", "--namespace", "istio-system")
    assert result.returncode == 0, result.stderr
    serving = x509.load_pem_x509_certificates((certs / "tls.crt").read_bytes())[0]
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"a.example", "b.example", "injector.istio-system.svc"} <= set(
        names.get_values_for_type(x509.DNSName))
    root = (certs / "root-cert.pem").read_bytes()
    again = _injector("certs", "init", "--certs-dir", str(certs))
    assert again.returncode == 0, again.stderr
    assert (certs / "root-cert.pem").read_bytes() == root


def test_settings_come_from_the_environment_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"certsDir: {tmp_path / 'from-config'}\ntrustDomain: example.org\n"
                      "injectorNamespace: istio-system\n")
    result = _injector("certs", "init", "--config", str(config),
                       env={"INJECTOR_DNS_NAME": "env-one.example,env-two.example"})
    assert result.returncode == 0, result.stderr
    root = x509.load_pem_x509_certificates(
        (tmp_path / "from-config" / "root-cert.pem").read_bytes())[0]
    assert root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value \
        == "example.org"
    serving = x509.load_pem_x509_certificates(
        (tmp_path / "from-config" / "tls.crt").read_bytes())[0]
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"env-one.example", "env-two.example", "injector.istio-system.svc"} <= set(
        names.get_values_for_type(x509.DNSName))


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ca-key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        ("certs", "init", "--certs-dir", str(corrupt)),
        ("certs", "init", "--certs-dir", str(blocker / "sub")),
        ("certs", "init", "--certs-dir", str(tmp_path / "td"), "--trust-domain", "Upper.Case"),
        ("certs",),
    ]
    for args in cases:
        result = _injector(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("injector")
    assert not (corrupt / "ca-cert.pem").exists()


# --- an existing directory is loaded as serve loads it (issue 13) -------------------------------

def _empty_ca_key(certs: Path) -> None:
    (certs / "ca-key.pem").write_bytes(b"")


def _truncated_ca_cert(certs: Path) -> None:
    pem = (certs / "ca-cert.pem").read_bytes()
    (certs / "ca-cert.pem").write_bytes(pem[: len(pem) // 2])


def _a_ca_key_from_elsewhere(certs: Path) -> None:
    other = certs.parent / "other"
    assert _injector("certs", "init", "--certs-dir", str(other)).returncode == 0
    shutil.copy(other / "ca-key.pem", certs / "ca-key.pem")


def _a_serving_key_from_elsewhere(certs: Path) -> None:
    other = certs.parent / "other"
    assert _injector("certs", "init", "--certs-dir", str(other)).returncode == 0
    shutil.copy(other / "tls.key", certs / "tls.key")


def _empty_serving_cert(certs: Path) -> None:
    (certs / "tls.crt").write_bytes(b"")


@pytest.mark.parametrize(("damage", "message"), [
    (_empty_ca_key, "ca-key.pem: not an unencrypted PEM private key"),
    (_truncated_ca_cert, "ca-cert.pem: not a PEM certificate file"),
    (_a_ca_key_from_elsewhere, "the CA key does not match the CA certificate"),
    (_a_serving_key_from_elsewhere, "tls.key does not match"),
    (_empty_serving_cert, "tls.crt: not a PEM certificate file"),
])
def test_a_broken_existing_directory_is_one_line_and_exit_2(
        tmp_path: Path, damage: Callable[[Path], None], message: str) -> None:
    # Before issue 13, every file existing meant "certificates ready", exit 0, whatever was in
    # them; serve then refused to start.
    certs = tmp_path / "certs"
    assert _injector("certs", "init", "--certs-dir", str(certs)).returncode == 0
    damage(certs)
    result = _injector("certs", "init", "--certs-dir", str(certs))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "ready" not in result.stdout


def test_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    certs = tmp_path / "made" / "certs"
    result = _injector("certs", "init", "--certs-dir", str(certs), umask=0o000)
    assert result.returncode == 0, result.stderr
    for directory in (tmp_path / "made", certs):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for key in ("ca-key.pem", "tls.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600, key
    for cert in ("root-cert.pem", "ca-cert.pem", "cert-chain.pem", "tls.crt"):
        assert stat.S_IMODE((certs / cert).stat().st_mode) == 0o644, cert
