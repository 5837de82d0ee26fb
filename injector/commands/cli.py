"""The `injector` command line: subcommand dispatch and layered settings.

Settings come from flags, then environment variables `INJECTOR_<FLAG>`, then the `--config` YAML
file (keys in camelCase, e.g. `certsDir`), then defaults. Every bad argument or input ends in a
one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from injector.errors import ConfigError, InvalidInput

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("injector.commands.serve", "serve the admission webhook and the CA over HTTPS"),
    "kube-inject": ("injector.commands.kube_inject", "inject sidecars into manifests offline"),
    "iptables": ("injector.commands.iptables", "program the pod's traffic redirection"),
    "certs": ("injector.commands.certs", "manage the certificates directory"),
    "agent": ("injector.commands.agent", "the sidecar's agent: certificates and Envoy"),
    "check": ("injector.commands.check", "why a pod is (not) injected; is the webhook healthy"),
}


class UsageError(InvalidInput):
    """A bad argument, setting or input: reported in one line, exit code 2."""


@dataclass(frozen=True)
class _Layered:
    dest: str
    default: Any
    convert: Callable[[str], Any]
    multiple: bool


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and whose options are layered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layered: list[_Layered] = []

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def option(
        self,
        *flags: str,
        default: Any = None,
        type: Callable[[str], Any] = str,
        multiple: bool = False,
        help: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Declare an option whose value is layered (flag, env, config file, default).

        `multiple` options may repeat on the command line; in the environment they are
        comma-separated, in the config file a YAML list.
        """
        action = self.add_argument(
            *flags,
            type=type,
            default=None,
            action="append" if multiple else "store",
            help=help,
            **kwargs,
        )
        self.layered.append(_Layered(action.dest, default, type, multiple))

    def switch(self, *flags: str, help: str | None = None) -> None:
        """A boolean flag; `INJECTOR_<FLAG>=true` or a config `true` turn it on as well."""
        action = self.add_argument(*flags, action="store_const", const=True, default=None,
                                   help=help)
        self.layered.append(_Layered(action.dest, False, _parse_bool, False))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def read_input(filename: str, limit: int, reader: str) -> bytes:
    """The bytes of `filename` (`-`: stdin), read no further than `limit`: `-f /dev/zero` (or an
    endless pipe) is refused once past it, not read until memory runs out. Every failure is a
    one-line UsageError naming the file; `reader` names the command in the size message."""
    name = "stdin" if filename == "-" else filename
    try:
        if filename == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(filename).open("rb") as stream:
                data = stream.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{filename}: no such file") from None
    except OSError as error:
        raise UsageError(f"{name}: cannot read: {error.strerror or error}") from None
    if len(data) > limit:
        raise UsageError(f"{name}: larger than {limit // (1024 * 1024)} MiB, the most "
                         f"{reader} reads")
    return data


def camel_case(dest: str) -> str:
    head, *rest = dest.split("_")
    return head + "".join(word.capitalize() for word in rest)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the `--config` YAML file: a mapping, or an empty file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UsageError(f"config file {path}{line}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a mapping of settings")
    return data


def _convert(layer: _Layered, value: Any, source: str) -> Any:
    try:
        if layer.multiple:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError("expected a list")
            return [layer.convert(str(item).strip()) for item in items if str(item).strip()]
        if isinstance(value, str):
            return layer.convert(value)
        if layer.convert is _parse_bool and isinstance(value, bool):
            return value
        return layer.convert(str(value))
    except (ValueError, TypeError) as error:
        raise UsageError(f"{source}: invalid value {value!r} ({error})") from None


def resolve_settings(parser: CommandParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill every layered option left unset on the command line.

    The config file's own keys that name options are taken out; what remains is left in
    `args.config_data` for the command (the mesh config).
    """
    config_data: dict[str, Any] = {}
    config_layer = next((layer for layer in parser.layered if layer.dest == "config"), None)
    if config_layer is not None:
        config_path = args.config or os.environ.get("INJECTOR_CONFIG") or config_layer.default
        args.config = config_path
        if config_path:
            config_data = load_config_file(config_path)
    for layer in parser.layered:
        if layer.dest == "config":
            continue
        if getattr(args, layer.dest) is not None:
            continue
        env_name = f"INJECTOR_{layer.dest.upper()}"
        key = camel_case(layer.dest)
        if env_name in os.environ:
            value = _convert(layer, os.environ[env_name], env_name)
        elif key in config_data:
            value = _convert(layer, config_data.pop(key), f"config file key {key}")
        else:
            value = layer.default
        setattr(args, layer.dest, value)
    for layer in parser.layered:
        config_data.pop(camel_case(layer.dest), None)
    args.config_data = config_data
    return args


def build_parser(argv: Sequence[str]) -> tuple[CommandParser, dict[str, CommandParser]]:
    """The parser; only the chosen command's module is imported, so each command starts fast."""
    parser = CommandParser(
        prog="injector",
        description="Istio-compatible sidecar injector and SPIFFE CA for Kubernetes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    commands.required = True
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    subparsers: dict[str, CommandParser] = {}
    for name, (module_name, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub)
        subparsers[name] = sub
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, subparsers = build_parser(arguments)
        args = parser.parse_args(arguments)
        sub = subparsers[args.command]
        # A subcommand with nested subcommands (certs init) reports its leaf parser.
        leaf: CommandParser = getattr(args, "leaf_parser", sub)
        resolve_settings(leaf, args)
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except (InvalidInput, ConfigError) as error:  # UsageError among them
        message = str(error)
        prefix = "" if message.startswith("injector") else "injector: "
        print(f"{prefix}{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
