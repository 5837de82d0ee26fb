"""`injector kube-inject`: the webhook's injection applied to manifests offline.

The command's part is the shell around `injector.injection.manifests`, which decides what in
each document is injected: the arguments, reading the manifest and the mesh config, writing the
result, and every failure as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from injector.commands.cli import CommandParser, UsageError, read_input
from injector.errors import ConfigError
from injector.injection.manifests import MAX_MANIFEST_BYTES, ManifestError, inject_yaml
from injector.mesh.config import load_mesh_config


def add_arguments(parser: CommandParser) -> None:
    parser.option("-f", "--filename", required=False, help="manifest file, or - for stdin")
    parser.option("-o", "--output", default="-", help="output file (default: stdout)")
    parser.option("--config", default=None, help="mesh config YAML file")


def _read(filename: str) -> str:
    """The manifest's text, at most MAX_MANIFEST_BYTES of it."""
    data = read_input(filename, MAX_MANIFEST_BYTES, "kube-inject")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        name = "stdin" if filename == "-" else filename
        raise UsageError(f"{name}: not UTF-8 text (byte {error.start})") from None


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
    # Encoded here, not by the stream: a lone surrogate from a "\ud800" escape in the input
    # is a one-line error, not a traceback halfway through the output.
    try:
        data = output.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{args.filename}: holds text that is not Unicode (a lone surrogate "
                         "escape)") from None
    if args.output == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            Path(args.output).write_bytes(data)
        except OSError as error:
            raise UsageError(f"{args.output}: cannot write: {error.strerror}") from None
    return 0
