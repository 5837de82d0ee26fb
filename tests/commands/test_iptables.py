"""`injector iptables` as a command: flags, bad input, dry run, and how it drives iptables.

The real netfilter stack is exercised in tests/e2e/test_iptables_netns.py; here stand-in
`iptables-save`/`iptables-restore` scripts on PATH record what the command asks of them, so these
tests run anywhere, without root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from injector.commands import cli
from injector.commands import iptables as command
from injector.mesh.network import parse_written_cidrs
from injector.traffic.iptables import TrafficOptions, build_restore_input

GOLDEN = Path(__file__).parents[1] / "golden" / "iptables"

TOOLS = ("iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")


@pytest.fixture(autouse=True)
def loopback_addresses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the addresses an IPv6 run would add to lo: these tests run in the host's own
    namespace, which they must never change (the real thing is tested in network namespaces)."""
    added: list[str] = []
    monkeypatch.setattr(command, "_add_address_to_loopback", added.append)
    return added


@pytest.fixture(autouse=True)
def _no_injector_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the tester's INJECTOR_* variables nor the machine's IPv6 addresses leak in."""
    for name in list(os.environ):
        if name.startswith("INJECTOR_"):
            monkeypatch.delenv(name)
    no_ipv6 = tmp_path / "if_inet6"
    no_ipv6.write_text("00000000000000000000000000000001 01 80 10 80       lo\n")
    monkeypatch.setattr(command, "IF_INET6", no_ipv6)


class FakeIptables:
    """Stand-in iptables tools in a directory that is all of PATH.

    Each records its arguments and stdin; `iptables-save` prints `saved`; a tool named in
    `failing` writes an error to stderr and exits 4.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = directory / "log"
        directory.mkdir()

    def install(self, saved: str = "", failing: tuple[str, ...] = ()) -> None:
        (self.directory / "saved").write_text(saved)
        for tool in TOOLS:
            script = self.directory / tool
            if tool in failing:
                body = (f'echo "{tool}: line 7 failed: No chain/target/match by that name." >&2\n'
                        "exit 4\n")
            elif tool.endswith("-save"):
                body = f'/bin/cat "{self.directory}/saved"\n'
            else:
                body = f'/bin/cat > "{self.directory}/{tool}.stdin"\n'
            script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{self.log}"\n{body}')
            script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stdin_of(self, tool: str) -> str:
        return (self.directory / f"{tool}.stdin").read_text()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIptables:
    tools = FakeIptables(tmp_path / "bin")
    tools.install()
    monkeypatch.setenv("PATH", str(tools.directory))
    return tools


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["iptables", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- dry run --------------------------------------------------------------------------------------

def test_dry_run_prints_the_restore_input_and_runs_nothing(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "--dry-run")
    assert (code, err) == (0, "")
    assert out == (GOLDEN / "default.txt").read_text()
    assert fake.calls() == []


def test_dry_run_of_the_webhooks_flags(capsys: pytest.CaptureFixture[str]) -> None:
    options = TrafficOptions(exclude_outbound_cidrs=parse_written_cidrs("10.96.0.0/12"),
                             exclude_outbound_ports=(5432,))
    code, out, _ = _run(capsys, *options.to_args(), "-n")
    assert code == 0
    assert out == build_restore_input(options)


def test_dry_run_with_ipv6_prints_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--dry-run", "--ipv6")
    assert code == 0
    assert out == build_restore_input(TrafficOptions()) + build_restore_input(
        TrafficOptions(), ipv6=True)


def test_a_pod_with_a_global_ipv6_address_gets_ipv6_rules_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dual_stack = tmp_path / "dual"
    dual_stack.write_text("fd000000000000000000000000000002 02 40 00 00     eth0\n")
    monkeypatch.setattr(command, "IF_INET6", dual_stack)
    _, out, _ = _run(capsys, "--dry-run")
    assert "IPv6" in out and "::6/128" in out
    _, out, _ = _run(capsys, "--dry-run", "--no-ipv6")
    assert "IPv6" not in out


def test_settings_come_from_the_environment_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INJECTOR_PROXY_PORT", "16001")
    monkeypatch.setenv("INJECTOR_DRY_RUN", "true")
    _, out, _ = _run(capsys)
    assert "--to-ports 16001" in out
    _, out, _ = _run(capsys, "-p", "17001")  # the flag wins over the environment
    assert "--to-ports 17001" in out


# --- bad input: one line, exit 2, nothing applied ------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-p", "http"], "-p/--proxy-port: not a port: 'http'"),
        (["-z", "70000"], "-z/--inbound-capture-port: not a port: '70000'"),
        (["-u", "istio-proxy"], "-u/--proxy-uid: not a numeric uid/gid: 'istio-proxy'"),
        (["-g", "-5"], "not a numeric uid/gid"),
        (["-m", "TPROXY"], "-m/--mode: TPROXY is not supported: only REDIRECT is implemented"),
        (["-c", "eth0/1"], "-c/--exclude-interfaces: not a network interface name: 'eth0/1'"),
        (["-k", "a b"], "-k/--reroute-virtual-interfaces: not a network interface name: 'a b'"),
        (["-i", "10.0.0.0/33"], "-i/--include-outbound-cidrs: not a CIDR: '10.0.0.0/33'"),
        (["-x", "*"], "-x/--exclude-outbound-cidrs: not a CIDR: '*'"),
        (["-b", "80,http"], "-b/--include-inbound-ports: not a port: 'http'"),
        (["-d", "0"], "-d/--exclude-inbound-ports: not a port: '0'"),
        (["-o", "22;"], "-o/--exclude-outbound-ports: not a port: '22;'"),
        (["-q", "99999"], "-q/--include-outbound-ports: not a port: '99999'"),
        (["--ipv6", "--no-ipv6"], "--ipv6 and --no-ipv6 contradict each other"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["-p"], "expected one argument"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_is_applied(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("injector"), err
    assert expected in err
    assert fake.calls() == []


def test_bad_environment_value_is_refused_too(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INJECTOR_EXCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8,not-a-cidr")
    code, _, err = _run(capsys)
    assert code == 2
    assert err == "injector: -x/--exclude-outbound-cidrs: not a CIDR: 'not-a-cidr'\n"
    assert fake.calls() == []


# --- a real run, against stand-in tools -----------------------------------------------------------

def test_a_run_reads_the_table_then_applies_everything_in_one_restore(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.install(saved="*nat\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A OUTPUT -j KUBE-X\nCOMMIT\n")
    code, out, err = _run(capsys, "-x", "10.96.0.0/12")
    assert (code, err) == (0, "")
    assert fake.calls() == ["iptables-save -t nat", "iptables-restore --noflush"]
    applied = fake.stdin_of("iptables-restore")
    options = TrafficOptions(exclude_outbound_cidrs=parse_written_cidrs("10.96.0.0/12"))
    # The hook left by the previous run is deleted, the other rule is not mentioned at all.
    assert applied == build_restore_input(options, installed_hooks=[
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT"])
    assert "-D OUTPUT -p tcp -j ISTIO_OUTPUT" in applied
    assert "KUBE-X" not in applied
    assert out == applied  # the init container's log says what was applied


def test_ipv6_goes_through_ip6tables_and_gives_the_proxy_its_passthrough_address(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str], loopback_addresses: list[str]
) -> None:
    code, _, _ = _run(capsys, "--ipv6")
    assert code == 0
    assert fake.calls() == ["iptables-save -t nat", "iptables-restore --noflush",
                            "ip6tables-save -t nat", "ip6tables-restore --noflush"]
    assert fake.stdin_of("ip6tables-restore") == build_restore_input(TrafficOptions(), ipv6=True)
    assert loopback_addresses == ["::6"]


def test_ipv4_only_adds_no_address(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str], loopback_addresses: list[str]
) -> None:
    assert _run(capsys)[0] == 0
    assert loopback_addresses == []


def test_failing_iptables_shows_its_stderr_and_exits_non_zero(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.install(failing=("iptables-restore",))
    code, _, err = _run(capsys)
    assert code != 0
    assert "iptables-restore: line 7 failed: No chain/target/match by that name." in err
    assert "iptables-restore --noflush failed with exit code 4" in err


def test_failing_save_stops_before_anything_is_applied(
    fake: FakeIptables, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.install(failing=("iptables-save",))
    code, _, err = _run(capsys)
    assert code != 0
    assert "iptables-save: line 7 failed" in err
    assert fake.calls() == ["iptables-save -t nat"]


def test_missing_iptables_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    code, out, err = _run(capsys)
    assert code != 0
    assert out == ""
    assert err == "injector: iptables-save not found on PATH: install iptables (Debian: iptables)\n"
