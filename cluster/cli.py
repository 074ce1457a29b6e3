"""The `batonserve` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from batonserve.cluster.placement import StartupError

# Each module has register(subparsers), adding its subcommand with args.func set.
COMMANDS = (
    "cli_generate",
    "cli_scale",
    "cli_plan",
    "cli_serve",
    "cli_stop",
    "cli_status",
    "cli_profile",
    "cli_bench",
    "cli_train_predictor",
)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; each part of the project registers its own in its module."""
    parser = argparse.ArgumentParser(prog="batonserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"batonserve.cluster.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # user errors carry a message naming the field
        print(f"batonserve: error: {e}", file=sys.stderr)
        return 2
    except StartupError as e:  # the cluster cannot run the config: says which pool and why
        print(f"batonserve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
