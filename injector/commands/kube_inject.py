"""`injector kube-inject`: the webhook's injection applied to manifests offline.

The command's part is the shell around `injector.injection.manifests`, which decides what in
each document is injected: the arguments, reading the manifest and the mesh config, writing the
result, and every failure as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from injector.commands.cli import CommandParser, UsageError
from injector.errors import ConfigError
from injector.injection.manifests import ManifestError, inject_yaml
from injector.mesh.config import load_mesh_config


def add_arguments(parser: CommandParser) -> None:
    parser.option("-f", "--filename", required=False, help="manifest file, or - for stdin")
    parser.option("-o", "--output", default="-", help="output file (default: stdout)")
    parser.option("--config", default=None, help="mesh config YAML file")


def _read(filename: str) -> str:
    if filename == "-":
        return sys.stdin.read()
    try:
        return Path(filename).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{filename}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{filename}: cannot read: {error}") from None


def run(args: argparse.Namespace) -> int:
    if not args.filename:
        raise UsageError("kube-inject: -f FILE (or -f - for stdin) is required")
    try:
        mesh = load_mesh_config(args.config_data, source=f"config file {args.config}")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    text = _read(args.filename)
    try:
        output = inject_yaml(text, mesh, args.filename)
    except ManifestError as error:
        raise UsageError(str(error)) from None
    if args.output == "-":
        sys.stdout.write(output)
    else:
        try:
            Path(args.output).write_text(output, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"{args.output}: cannot write: {error.strerror}") from None
    return 0
