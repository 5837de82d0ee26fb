"""The shell: one module per `injector` subcommand.

Each module exposes `add_arguments(parser: CommandParser) -> None` and
`run(args: argparse.Namespace) -> int`. Options are declared with `parser.option(...)` so that
their values are layered: flag, then `INJECTOR_<FLAG>` environment variable, then the `--config`
file, then the default.
"""
