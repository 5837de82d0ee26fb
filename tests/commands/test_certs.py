"""`injector certs init`, run as users run it: a real process, its output and exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509

REPO = Path(__file__).resolve().parents[2]


def _injector(*args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env = {k: v for k, v in full_env.items()
                if not k.startswith("INJECTOR_") or k in (env or {})}
    return subprocess.run([sys.executable, "-m", "injector", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=60, check=False)


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
