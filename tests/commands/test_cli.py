"""The command line: settings layering and one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from injector.commands.cli import CommandParser, UsageError, main, resolve_settings
from tests.support.servers import Server, free_port, wait_until_serving


def parser() -> CommandParser:
    command = CommandParser(prog="injector test")
    command.option("--port", default=15017, type=int)
    command.option("--dns-name", default=[], multiple=True)
    command.option("--config", default=None)
    command.switch("--dry-run")
    return command


def settings(argv: list[str], monkeypatch: pytest.MonkeyPatch, **env: str) -> argparse.Namespace:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = parser()
    return resolve_settings(command, command.parse_args(argv))


def test_flag_beats_env_beats_config_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("port: 3000\ndnsName: [a.example, b.example]\ntrustDomain: x.org\n")
    assert settings([], monkeypatch).port == 15017
    from_config = settings(["--config", str(config)], monkeypatch)
    assert from_config.port == 3000
    assert from_config.dns_name == ["a.example", "b.example"]
    # What is not an option stays for the command: the mesh config.
    assert from_config.config_data == {"trustDomain": "x.org"}
    from_env = settings([], monkeypatch, INJECTOR_PORT="4000", INJECTOR_CONFIG=str(config),
                        INJECTOR_DNS_NAME="c.example,d.example", INJECTOR_DRY_RUN="true")
    assert (from_env.port, from_env.dns_name, from_env.dry_run) == (
        4000, ["c.example", "d.example"], True)
    from_flag = settings(["--port", "5000", "--dns-name", "e.example"], monkeypatch,
                         INJECTOR_PORT="4000", INJECTOR_CONFIG=str(config))
    assert (from_flag.port, from_flag.dns_name) == (5000, ["e.example"])


@pytest.mark.parametrize(
    ("argv", "env", "config_text", "message"),
    [
        (["--port", "eighty"], {}, None, "--port"),
        ([], {"INJECTOR_PORT": "eighty"}, None, "INJECTOR_PORT"),
        ([], {}, "port: eighty\n", "port"),
        ([], {}, "- just\n- a list\n", "mapping"),
        ([], {}, "port: [unclosed\n", "not valid YAML"),
        ([], {"INJECTOR_DRY_RUN": "perhaps"}, None, "INJECTOR_DRY_RUN"),
    ],
)
def test_bad_settings_are_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str],
    config_text: str | None, message: str,
) -> None:
    if config_text is not None:
        config = tmp_path / "config.yaml"
        config.write_text(config_text)
        argv = [*argv, "--config", str(config)]
    with pytest.raises(UsageError, match=message):
        settings(argv, monkeypatch, **env)


def test_main_reports_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert main(["serve", "--port"]) == 2
    assert main(["serve", "--port", "99999"]) == 2
    assert main(["serve", "--workers", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert "--workers 0: must be 1 to 64" in lines[3]
    assert all(line.startswith("injector") for line in lines)


def test_serve_takes_its_port_and_certs_dir_from_env_and_config(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "injector.yaml"
    config.write_text(f"port: {port}\ntrustDomain: example.org\n")
    certs = tmp_path / "from-env"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "injector", "serve", "--config", str(config)],
            env={"PATH": "/usr/bin:/bin", "INJECTOR_CERTS_DIR": str(certs)},
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    server = Server(f"https://127.0.0.1:{port}", port, certs, process, log_path)
    try:
        wait_until_serving(server)
        assert (certs / "tls.key").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


def test_serve_refuses_a_bad_mesh_config_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "injector.yaml"
    config.write_text("policy: sometimes\nproxyImage: x\n")
    done = subprocess.run(
        [sys.executable, "-m", "injector", "serve", "--config", str(config),
         "--certs-dir", str(tmp_path / "certs")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert "policy" in done.stderr and len(done.stderr.strip().splitlines()) == 1
