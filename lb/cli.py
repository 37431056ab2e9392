"""lbctl: the command line of the load balancer.

This module only assembles the commands each floor registers. lb's own
(:mod:`lb.commands`) come first; then every floor above lb, found through the
``lbctl.commands`` entry-point group of pyproject.toml, so lb never imports a floor above
it. Each entry point names a ``register(commands, groups)`` that adds its subcommands to
``commands`` and may add actions to a group a floor below made (``groups["config"]``).
setuptools writes entry points sorted by name, not by floor: that is why lb's own
commands, which make the shared groups, are registered directly and first.

A floor whose commands fail to load is named on stderr with the error, and the other
floors' commands still work.

Exit status: 0 success, 1 the operation failed, 2 bad usage or invalid input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from lb.config import Config, ConfigError, load_config

__all__ = ["COMMAND_GROUP", "build_parser", "load_config_or_exit", "main"]

COMMAND_GROUP = "lbctl.commands"  # entry points: NAME = "module:register"


def load_config_or_exit(path: str) -> Config:
    """The config at ``path``; on a ConfigError its message goes to stderr and the
    command exits with status 2."""
    try:
        return load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


def build_parser() -> argparse.ArgumentParser:
    """lbctl's parser: lb's commands, then those of every floor registered in
    :data:`COMMAND_GROUP`."""
    from lb.commands import register  # imported here: lb.commands imports load_config_or_exit from this module

    p = argparse.ArgumentParser(prog="lbctl", description="Katran-compatible L4 load balancer: control and tools.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    register(commands, groups)
    floors = entry_points(group=COMMAND_GROUP)
    if not floors:
        print(f"lbctl: no commands beyond lb's are installed (entry-point group {COMMAND_GROUP!r} is empty); "
              "install the project: pip install -e .", file=sys.stderr)
    for floor in floors:
        try:
            floor.load()(commands, groups)
        except Exception as e:  # noqa: BLE001 - any failure: name the floor, keep the others usable
            print(f"lbctl: the {floor.name} commands ({floor.value}) are unavailable: {type(e).__name__}: {e}",
                  file=sys.stderr)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
