"""docs/cli.md against the commands' own `--help`: every command has its section, and each
section lists exactly the flags its command takes, so the page cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = ROOT / "docs" / "cli.md"
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def help_text(*command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "injector", *command, "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def listed(help_output: str, heading: str) -> list[str]:
    """The subcommands a `--help` lists under its positional `heading` (COMMAND, ACTION)."""
    block = help_output.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0]
    names = [line.split()[0] for line in block.splitlines()
             if re.match(r"^ {4}\S", line)]
    assert names, f"no {heading} listed in:\n{help_output}"
    return names


def commands() -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name in listed(help_text(), "COMMAND"):
        if name == "certs":
            found += [("certs", action) for action in listed(help_text("certs"), "ACTION")]
        else:
            found.append((name,))
    return found


def help_flags(help_output: str) -> set[str]:
    options = help_output.split("options:\n", 1)[1]
    flags = set()
    for line in options.splitlines():
        if re.match(r"^ {2}-", line):
            flags.update(FLAG.findall(line.split("  ")[1] if "   " in line[2:] else line))
    return flags - {"-h", "--help"}


def section(command: tuple[str, ...]) -> str:
    text = CLI_DOC.read_text()
    heading = f"\n## injector {' '.join(command)}\n"
    assert heading in text, f"docs/cli.md has no section `## injector {' '.join(command)}`"
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def documented_flags(text: str) -> set[str]:
    """The flags in the first column of the section's tables."""
    flags = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            flags.update(FLAG.findall(line.split("|")[1]))
    return flags


def test_the_commands_are_those_help_lists() -> None:
    assert [c for c in commands()] == [("serve",), ("kube-inject",), ("iptables",),
                                       ("certs", "init"), ("agent",), ("check",)]


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_each_section_lists_exactly_the_flags_of_its_command(command: tuple[str, ...]) -> None:
    expected = help_flags(help_text(*command))
    assert expected, f"no flags read from injector {' '.join(command)} --help"
    assert documented_flags(section(command)) == expected


def test_the_summary_table_links_every_section() -> None:
    text = CLI_DOC.read_text()
    for command in commands():
        anchor = "injector-" + "-".join(command)
        assert f"(#{anchor})" in text, anchor
